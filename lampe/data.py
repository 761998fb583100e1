"""Long real text for evaluations (Jane Austen's six novels, Moby Dick), offline after one fetch.

Long-context evaluations need natural text far longer than a model's pretrained window, with a
licence that lets us use it freely and a source that is reachable from locked-down machines.
Debian packages two R packages carrying public-domain Project Gutenberg books:

* ``r-cran-janeaustenr`` -- the six Austen novels, one character vector per book (one element
  per printed line), in the R lazy-load database ``data/Rdata.rdb`` + ``data/Rdata.rdx``;
* ``r-cran-tokenizers`` -- ``mobydick``, the whole novel as a single string, stored the same way.

The Debian archive is one of the few networks our machines reach, so the books are taken from
there: an installed package if present, otherwise a ``.deb`` fetched once with
``apt-get download`` into the cache directory and unpacked there. No R is needed: this module
carries a small reader of R's XDR serialization format (enough for character vectors, lists,
data frames, pairlists and .rda/.rds files). The extracted plain text is cached as UTF-8 so that
later calls just read a file.

    >>> from lampe import data
    >>> data.available()                       # cheap: never downloads
    >>> text = data.book("persuasion")         # first call may run apt-get download
    >>> train = data.austen()                  # the other five novels, Persuasion held out

Cache directory: ``$LAMPE_CACHE`` if set, else ``$XDG_CACHE_HOME/lampe``, else ``~/.cache/lampe``.
Nothing touches the network at import time.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BOOKS", "AUSTEN", "book", "austen", "text_file", "available", "cache_dir",
           "RObject", "unserialize", "read_rds", "read_rda", "read_lazyload_db", "RFormatError"]


# ----------------------------------------------------------------------------------------------
# Catalogue
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    deb: str        # Debian package name (what apt-get download takes)
    rpkg: str       # R package name (its directory under an R library)
    rname: str      # object name inside the package's data


BOOKS: dict[str, _Source] = {
    # Order = publication order, which is also the order austen() concatenates them in.
    "sense_and_sensibility": _Source("r-cran-janeaustenr", "janeaustenr", "sensesensibility"),
    "pride_and_prejudice": _Source("r-cran-janeaustenr", "janeaustenr", "prideprejudice"),
    "mansfield_park": _Source("r-cran-janeaustenr", "janeaustenr", "mansfieldpark"),
    "emma": _Source("r-cran-janeaustenr", "janeaustenr", "emma"),
    "northanger_abbey": _Source("r-cran-janeaustenr", "janeaustenr", "northangerabbey"),
    "persuasion": _Source("r-cran-janeaustenr", "janeaustenr", "persuasion"),
    "moby_dick": _Source("r-cran-tokenizers", "tokenizers", "mobydick"),
}
AUSTEN = tuple(n for n, s in BOOKS.items() if s.rpkg == "janeaustenr")

# Where Debian (and a hand-installed R) put package libraries.
_R_LIBRARY_ROOTS = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library",
                    "/usr/share/R/site-library")


def cache_dir(*parts: str) -> Path:
    """The lampe cache directory (created on demand), joined with ``parts``."""
    root = os.environ.get("LAMPE_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lampe"
    return base.joinpath(*parts)


def _text_cache(name: str) -> Path:
    return cache_dir("texts", f"{name}.txt")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def book(name: str) -> str:
    """The full text of one book, lines joined with ``\\n``.

    ``name`` is one of :data:`BOOKS`: ``emma``, ``persuasion``, ``pride_and_prejudice``,
    ``sense_and_sensibility``, ``mansfield_park``, ``northanger_abbey``, ``moby_dick``.
    The first call for a Debian package may run ``apt-get download`` (see module docs).
    """
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key not in BOOKS:
        raise KeyError(f"unknown book {name!r}; choose one of {sorted(BOOKS)}")
    cached = _text_cache(key)
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    _extract_package_books(BOOKS[key].deb)
    return cached.read_text(encoding="utf-8")


def austen(exclude: tuple[str, ...] | list[str] | str = ("persuasion",), sep: str = "\n\n\n") -> str:
    """Austen's novels in publication order, joined by ``sep``, minus ``exclude``.

    Persuasion is excluded by default: it is the held-out text of our evaluations, so anything
    fitted on ``austen()`` (e.g. a calibration or a tiny model) never saw it.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    excl = {e.lower().replace("-", "_").replace(" ", "_") for e in exclude}
    unknown = excl - set(AUSTEN)
    if unknown:
        raise KeyError(f"cannot exclude {sorted(unknown)}: not an Austen novel; choose from {AUSTEN}")
    return sep.join(book(n) for n in AUSTEN if n not in excl)


def text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """Any user text file, for evaluating on one's own documents.

    Bytes that are not valid in ``encoding`` are replaced rather than raising, since one stray
    byte in a long document should not stop an evaluation; ``.gz``/``.bz2``/``.xz`` files are
    decompressed transparently.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    raw = p.read_bytes()
    # Trust the suffix, not magic bytes: a plain text may well begin with "BZh".
    if p.suffix.lower() in (".gz", ".bz2", ".xz"):
        raw = _decompress_any(raw)
    return raw.decode(encoding, errors="replace")


def available() -> dict[str, bool]:
    """For each book, whether :func:`book` can return it without the network.

    Cheap: only looks at the text cache, installed R libraries and already-fetched ``.deb`` files.
    """
    out = {}
    for name, src in BOOKS.items():
        out[name] = (_text_cache(name).is_file() or _find_local_library(src) is not None
                     or _cached_deb(src.deb) is not None)
    return out


# ----------------------------------------------------------------------------------------------
# Finding, fetching and unpacking the Debian packages
# ----------------------------------------------------------------------------------------------

def _has_data(libdir: Path) -> bool:
    d = libdir / "data"
    return (d / "Rdata.rdx").is_file() or any(d.glob("*.rda")) or any(d.glob("*.RData"))


def _find_local_library(src: _Source) -> Path | None:
    """An R package directory already on disk: installed, or unpacked in the cache."""
    for root in _R_LIBRARY_ROOTS:
        cand = Path(root) / src.rpkg
        if _has_data(cand):
            return cand
    return _unpacked_library(src)


def _unpacked_library(src: _Source) -> Path | None:
    root = cache_dir("debs", src.deb)
    for sub in ("usr/lib/R/site-library", "usr/lib/R/library", "usr/share/R/site-library"):
        cand = root / sub / src.rpkg
        if _has_data(cand):
            return cand
    return None


def _cached_deb(deb: str) -> Path | None:
    # A .deb placed by hand (e.g. downloaded from packages.debian.org on a non-Debian machine)
    # counts as well as one fetched by apt-get.
    debs = sorted(cache_dir("debs").glob(f"{deb}_*.deb"))
    return debs[-1] if debs else None


def _how_to_get(deb: str, why: str) -> RuntimeError:
    return RuntimeError(
        f"cannot get the text of Debian package {deb!r}: {why}\n"
        f"Any one of these fixes it:\n"
        f"  * install it: sudo apt-get install {deb}\n"
        f"  * fetch it: (cd {cache_dir('debs')} && apt-get download {deb})\n"
        f"  * on a non-Debian machine, download {deb}_*.deb from https://packages.debian.org/{deb} "
        f"into {cache_dir('debs')}\n"
        f"  * or use lampe.data.text_file(path) with a text of your own.")


def _apt_download(deb: str) -> Path:
    """Fetch ``deb`` into the cache with ``apt-get download`` (no root needed unless lists are missing)."""
    if shutil.which("apt-get") is None:
        raise _how_to_get(deb, "apt-get is not available on this machine")
    dest = cache_dir("debs")
    dest.mkdir(parents=True, exist_ok=True)

    def download():
        return subprocess.run(["apt-get", "download", deb], cwd=dest, capture_output=True, text=True,
                              timeout=600)

    r = download()
    if r.returncode != 0 and ("Unable to locate package" in r.stderr or "no installation candidate" in r.stderr):
        # Fresh containers ship without package lists; refreshing them needs root, so only try
        # it when the download has shown it is needed.
        u = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
        if u.returncode != 0:
            raise _how_to_get(deb, f"package lists are missing and `apt-get update` failed:\n{u.stderr.strip()}")
        r = download()
    if r.returncode != 0:
        raise _how_to_get(deb, f"`apt-get download {deb}` failed:\n{r.stderr.strip()}")
    got = _cached_deb(deb)
    if got is None:
        raise _how_to_get(deb, f"`apt-get download {deb}` reported success but left no .deb in {dest}")
    return got


def _unpack_deb(deb_file: Path, dest: Path) -> None:
    """Unpack a .deb into ``dest`` (dpkg-deb if present, else a pure-Python ar + tar reader)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o755 & ~mask)  # mkdtemp's 0700 would hide the cache from other users
    try:
        if shutil.which("dpkg-deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb_file), str(tmp)], check=True, capture_output=True,
                           timeout=600)
        else:
            _unpack_deb_python(deb_file, tmp)
        # Rename into place so that a half-unpacked directory is never mistaken for a good one.
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _unpack_deb_python(deb_file: Path, dest: Path) -> None:
    # A .deb is an ar archive: "!<arch>\n", then members with 60-byte headers, 2-byte aligned.
    blob = deb_file.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb_file} is not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise RuntimeError(f"{deb_file}: data.tar.zst needs dpkg-deb (install dpkg) to unpack")
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python without extraction filters: refuse anything escaping dest ourselves
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                        continue
                    tar.extract(m, dest)
        return
    raise RuntimeError(f"{deb_file}: no data.tar member found")


def _library_for(deb: str) -> Path:
    src = next(s for s in BOOKS.values() if s.deb == deb)
    lib = _find_local_library(src)
    if lib is not None:
        return lib
    deb_file = _cached_deb(deb) or _apt_download(deb)
    _unpack_deb(deb_file, cache_dir("debs", deb))
    lib = _unpacked_library(src)
    if lib is None:
        raise _how_to_get(deb, f"{deb_file} holds no R data for package {src.rpkg!r}")
    return lib


def _extract_package_books(deb: str) -> None:
    """Write every book that ``deb`` carries to the text cache (one package read serves them all)."""
    lib = _library_for(deb)
    wanted = {s.rname: n for n, s in BOOKS.items() if s.deb == deb}
    objects = _read_package_data(lib, set(wanted))
    out_dir = cache_dir("texts")
    out_dir.mkdir(parents=True, exist_ok=True)
    for rname, name in wanted.items():
        if rname not in objects:
            raise RuntimeError(f"R package {lib} has no data object {rname!r} (found {sorted(objects)})")
        text = _as_text(objects[rname], rname)
        # Write then rename, so a reader never sees half a book (and a crash leaves no stub).
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, _text_cache(name))


def _read_package_data(lib: Path, names: set[str]) -> dict[str, Any]:
    data = lib / "data"
    if (data / "Rdata.rdx").is_file():
        return read_lazyload_db(data / "Rdata", names)
    # Packages installed without lazy data keep .rda/.RData files; an object's name need not match
    # its file's, so read them all (they are small) and keep what was asked for.
    out: dict[str, Any] = {}
    for f in sorted(list(data.glob("*.rda")) + list(data.glob("*.RData"))):
        out.update({k: v for k, v in read_rda(f).items() if not names or k in names})
    return out


def _as_text(obj: Any, what: str) -> str:
    """A book object (character vector of lines, or of one whole text) as one clean string."""
    if not (isinstance(obj, RObject) and obj.sexptype == STRSXP):
        raise RuntimeError(f"data object {what!r} is {obj!r}, not a character vector")
    text = "\n".join("" if s is None else s for s in obj.value)
    # Moby Dick comes as the raw Gutenberg file: BOM, CRLF line ends and the licence around the
    # book. Evaluations should measure the novel, not boilerplate, so cut to the book proper.
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return _strip_gutenberg(text).strip("\n") + "\n"


def _strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START/END markers (unchanged if there are none)."""
    start = re.search(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    if start is None:
        return text
    body = text[start.end():]
    end = re.search(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG)",
                    body, re.M | re.I)
    body = body[:end.start()] if end else body
    # Transcriber credits sit between the marker and the title; drop a leading "Produced by" paragraph.
    body = re.sub(r"\A\s*Produced by[^\n]*(\n[^\n]+)*\n", "", body)
    return body


# ----------------------------------------------------------------------------------------------
# R serialization (XDR, format versions 2 and 3)
# ----------------------------------------------------------------------------------------------

class RFormatError(ValueError):
    """The bytes are not R serialization this reader understands."""


# SEXP types (R's Rinternals.h) and the pseudo-types used only in serialized streams (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
_REFSXP, _NILVALUE, _GLOBALENV, _UNBOUNDVALUE, _MISSINGARG, _BASENAMESPACE = 255, 254, 253, 252, 251, 250
_NAMESPACESXP, _PACKAGESXP, _PERSISTSXP = 249, 248, 247
_EMPTYENV, _BASEENV, _ATTRLANGSXP, _ATTRLISTSXP, _ALTREP = 242, 241, 240, 239, 238

_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
# CHARSXP encoding bits, carried in the "levels" field of the flags word.
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6
_NA_INT = -(2 ** 31)


@dataclass
class RObject:
    """One R value.

    ``value`` by type: STRSXP -> list of ``str | None`` (None = NA); INTSXP/LGLSXP -> list of
    ``int | None``; REALSXP -> list of float; CPLXSXP -> list of complex; RAWSXP -> bytes;
    VECSXP/EXPRSXP -> list of values; LISTSXP/LANGSXP (pairlists) -> list of ``(tag, value)``;
    SYMSXP -> the name; ENVSXP -> dict of bindings; anything else -> whatever could be read.
    ``attrs`` maps attribute names (``names``, ``class``, ``row.names``...) to values.
    """
    sexptype: int
    value: Any
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        n = self.attrs.get("names")
        return n.value if isinstance(n, RObject) else None

    def to_dict(self) -> dict[str, Any]:
        """A named list / data frame / pairlist as ``{name: value}``."""
        if self.sexptype in (LISTSXP, LANGSXP):
            return {t: v for t, v in self.value}
        if self.sexptype in (VECSXP, EXPRSXP) and self.names is not None:
            return dict(zip(self.names, self.value))
        raise TypeError(f"R object of type {self.sexptype} has no names")

    def __repr__(self) -> str:
        v = self.value
        if isinstance(v, (list, bytes)) and (len(v) > 4 or len(repr(v)) > 200):
            shown = f"<{len(v)} items>"
        else:
            shown = repr(v)
        return f"RObject(type={self.sexptype}, value={shown}, attrs={sorted(self.attrs)})"


@dataclass
class _Persist:
    """A reference the writer's persistence hook replaced by strings (e.g. lazy-load env refs)."""
    names: list[str | None]


class _Reader:
    def __init__(self, buf: bytes):
        self.buf = memoryview(buf)
        self.pos = 0
        self.refs: list[Any] = []

    # -- primitives ---------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise RFormatError(f"truncated R serialization: need {n} bytes at offset {self.pos}, "
                               f"have {len(self.buf) - self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: the length follows as two 32-bit halves
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        elif n < -1:
            raise RFormatError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    def string(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = bytes(self._take(n))
        if levels & _LATIN1:
            return raw.decode("latin-1")
        # UTF-8, ASCII, and "native" strings: R packages built on Debian write UTF-8; an odd
        # latin-1 byte in a native string should still not abort reading a whole book.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    # -- header -------------------------------------------------------------------------------
    def header(self) -> int:
        fmt = bytes(self._take(2))
        if fmt != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt, repr(fmt))
            raise RFormatError(f"unsupported R serialization format {kind}: only XDR ('X\\n') is read")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version that can read it
        if version == 3:
            n = self.int()
            self._take(n)  # native encoding name
        elif version != 2:
            raise RFormatError(f"unsupported R serialization version {version}")
        return version

    # -- items --------------------------------------------------------------------------------
    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & _HAS_ATTR)
        has_tag = bool(flags & _HAS_TAG)

        if t == _NILVALUE:
            return None
        if t == _REFSXP:
            idx = flags >> 8 or self.int()
            if not 1 <= idx <= len(self.refs):
                raise RFormatError(f"bad back-reference {idx} (have {len(self.refs)})")
            return self.refs[idx - 1]
        if t in (_GLOBALENV, _EMPTYENV, _BASEENV, _BASENAMESPACE):
            return RObject(ENVSXP, {}, {"special": t})
        if t in (_UNBOUNDVALUE, _MISSINGARG):
            return RObject(t, None)
        if t in (_PERSISTSXP, _NAMESPACESXP, _PACKAGESXP):
            if self.int() != 0:
                raise RFormatError("string-vector reference with nonzero tag")
            n = self.int()
            obj = _Persist([self.item_string() for _ in range(n)])
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            obj = RObject(SYMSXP, self.item_string())
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            obj = RObject(ENVSXP, {})
            self.refs.append(obj)
            self.int()  # locked
            enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            attrib = self.item()
            obj.attrs = _attr_dict(attrib)
            obj.attrs["enclos"] = enclos
            bindings: dict[str, Any] = {}
            for part in (frame, *(hashtab.value if isinstance(hashtab, RObject) else [])):
                if isinstance(part, RObject) and part.sexptype == LISTSXP:
                    bindings.update(part.to_dict())
            obj.value = bindings
            return obj
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP):
            return self._pairlist(t, has_attr, has_tag)
        if t == _ALTREP:
            return self._altrep()
        if t == CHARSXP:
            return self.string(levels)
        if t in (SPECIALSXP, BUILTINSXP):
            obj = RObject(t, bytes(self._take(self.int())).decode("ascii"))
        elif t == S4SXP:
            obj = RObject(S4SXP, None)
        elif t == EXTPTRSXP:
            obj = RObject(t, None)
            self.refs.append(obj)
            obj.value = (self.item(), self.item())  # protected value, tag
        elif t == WEAKREFSXP:
            obj = RObject(t, None)
            self.refs.append(obj)
        else:
            obj = RObject(t, self._vector(t))
        if has_attr:
            obj.attrs = _attr_dict(self.item())
        return obj

    def item_string(self) -> str | None:
        s = self.item()
        if s is not None and not isinstance(s, str):
            raise RFormatError(f"expected a CHARSXP, got {s!r}")
        return s

    def _vector(self, t: int) -> Any:
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            return [None if v == _NA_INT else v for v in vals]
        if t == REALSXP:
            n = self.length()
            return list(struct.unpack(f">{n}d", self._take(8 * n)))
        if t == CPLXSXP:
            n = self.length()
            d = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return [complex(d[i], d[i + 1]) for i in range(0, 2 * n, 2)]
        if t == RAWSXP:
            return bytes(self._take(self.length()))
        if t == STRSXP:
            return [self.item_string() for _ in range(self.length())]
        if t in (VECSXP, EXPRSXP):
            return [self.item() for _ in range(self.length())]
        if t == BCODESXP:
            raise RFormatError("byte-compiled R code is not supported by this reader")
        raise RFormatError(f"unsupported SEXP type {t} at offset {self.pos - 4}")

    def _pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RObject:
        # Pairlists chain through their CDR; walk the chain in a loop so that a long one (e.g. a
        # big environment frame) cannot exhaust Python's recursion limit.
        # ATTRLANGSXP/ATTRLISTSXP are the stream's spelling of a LANGSXP/LISTSXP with attributes.
        if t in (_ATTRLANGSXP, _ATTRLISTSXP):
            t, has_attr = (LANGSXP if t == _ATTRLANGSXP else LISTSXP), True
        head = RObject(t, [])
        cells = head.value
        first = True
        while True:
            attrs = _attr_dict(self.item()) if has_attr else {}
            tag = self.item() if has_tag else None
            # Tags are symbols for lists; closures and promises put an environment there instead.
            tag = tag.value if isinstance(tag, RObject) and tag.sexptype == SYMSXP else None
            car = self.item()
            if first:
                head.attrs = attrs
                first = False
            cells.append((tag, car))
            flags = self.int()
            nt = flags & 0xFF
            if nt in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP):
                has_attr = bool(flags & _HAS_ATTR) or nt in (_ATTRLANGSXP, _ATTRLISTSXP)
                has_tag = bool(flags & _HAS_TAG)
                continue
            if nt != _NILVALUE:
                # A dotted pair ending in a non-NIL value: rewind and read it as an item.
                self.pos -= 4
                cells.append((None, self.item()))
            return head

    def _altrep(self) -> RObject:
        # ALTREP objects carry (class info, state, attributes). Expand the classes R itself
        # writes for ordinary data; anything else has to be re-serialized by R without ALTREP.
        info = self.item()
        state = self.item()
        attrib = self.item()
        cls = info.value[0][1].value if isinstance(info, RObject) and info.value else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value[:3]
            n = int(n)
            vals = [start + i * step for i in range(n)]
            obj = RObject(INTSXP if cls == "compact_intseq" else REALSXP,
                          [int(v) for v in vals] if cls == "compact_intseq" else vals)
        elif cls and cls.startswith("wrap_"):
            obj = state.value[0]
            obj = RObject(obj.sexptype, obj.value, dict(obj.attrs))
        elif cls == "deferred_string":
            arg = state.value[0][1]
            obj = RObject(STRSXP, [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v))
                                   for v in arg.value])
        else:
            raise RFormatError(f"unsupported ALTREP class {cls!r}")
        if attrib is not None:
            obj.attrs.update(_attr_dict(attrib))
        return obj


def _attr_dict(attrib: Any) -> dict[str, Any]:
    if isinstance(attrib, RObject) and attrib.sexptype == LISTSXP:
        return {t: v for t, v in attrib.value}
    return {}


def unserialize(buf: bytes) -> Any:
    """Parse one R object serialized in XDR format (what ``serialize()`` / ``saveRDS()`` write)."""
    r = _Reader(buf)
    r.header()
    return r.item()


def _decompress_any(raw: bytes) -> bytes:
    """Undo gzip/bzip2/xz compression, recognised by magic bytes; other bytes pass through."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def read_rds(path: str | os.PathLike) -> Any:
    """Read an ``.rds`` file (one serialized object, usually gzip-compressed)."""
    return unserialize(_decompress_any(Path(path).read_bytes()))


def read_rda(path: str | os.PathLike) -> dict[str, Any]:
    """Read an ``.rda``/``.RData`` file (``save()`` output) as ``{name: object}``."""
    raw = _decompress_any(Path(path).read_bytes())
    if raw[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RFormatError(f"{path}: not an XDR .rda file (starts with {raw[:5]!r})")
    obj = unserialize(raw[5:])
    if not (isinstance(obj, RObject) and obj.sexptype == LISTSXP):
        raise RFormatError(f"{path}: expected a pairlist of saved objects, got {obj!r}")
    return obj.to_dict()


def _lazyload_blob(blob: bytes, compressed: int) -> bytes:
    """Decompress one lazy-load DB record: 4-byte big-endian output length, then the stream."""
    if compressed in (0, False):
        return blob
    (n,) = struct.unpack(">I", blob[:4])
    if compressed in (1, True):
        out = zlib.decompress(blob[4:])
    else:
        # compress = 2 (bzip2) / 3 (xz) records add a type byte: Z zlib, 2 bzip2, X xz, 0 stored.
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body, format=lzma.FORMAT_XZ)
        elif kind == b"0":
            out = body
        else:
            raise RFormatError(f"unknown lazy-load compression type {kind!r}")
    if len(out) != n:
        raise RFormatError(f"lazy-load record decompressed to {len(out)} bytes, header says {n}")
    return out


def read_lazyload_db(stem: str | os.PathLike, names: set[str] | None = None) -> dict[str, Any]:
    """Read objects from an R lazy-load database ``stem.rdb`` + ``stem.rdx`` (e.g. ``data/Rdata``).

    The ``.rdx`` index (an .rds file) lists each variable's (offset, length) in the ``.rdb``,
    whose records are separately compressed serializations. ``names`` limits what is read.
    """
    stem = Path(stem)
    index = read_rds(stem.with_suffix(".rdx")).to_dict()
    variables = index["variables"].to_dict()
    compressed = index.get("compressed")
    compressed = compressed.value[0] if isinstance(compressed, RObject) else 1
    if isinstance(compressed, float):
        compressed = int(compressed)
    out: dict[str, Any] = {}
    with open(stem.with_suffix(".rdb"), "rb") as f:
        for name, where in variables.items():
            if names is not None and name not in names:
                continue
            offset, length = (int(x) for x in where.value[:2])
            f.seek(offset)
            blob = f.read(length)
            out[name] = unserialize(_lazyload_blob(blob, compressed))
    return out
