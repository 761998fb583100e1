"""Long real text for evaluations (Jane Austen's six novels, Moby Dick), offline after one fetch.

Long-context evaluations need natural text far longer than a model's pretrained window, with a
licence that lets us use it freely and a source that locked-down machines reach. Debian packages
two R packages carrying public-domain Project Gutenberg books, which :mod:`lampe.eval.debian`
finds or fetches:

* ``r-cran-janeaustenr`` -- the six Austen novels, one character vector per book (one element
  per printed line);
* ``r-cran-tokenizers`` -- ``mobydick``, the whole novel as a single string.

Both keep them in the package's R lazy-load database ``data/Rdata.rdb`` + ``data/Rdata.rdx``.
This module cuts a book's record out of the ``.rdb`` and hands it to the ``rdata`` library (R's
serialization formats; imported only when a text is first extracted, as it pulls in pandas).
The extracted text is cached as UTF-8, so later calls just read a file:

    >>> from lampe.eval import texts
    >>> texts.available()                      # cheap: never downloads
    >>> text = texts.book("persuasion")        # first call may run apt-get download
    >>> train = texts.austen()                 # the other five novels, Persuasion held out
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import zlib
from pathlib import Path
from typing import NamedTuple

from .._cache import cache_dir
from . import debian

__all__ = ["BOOKS", "AUSTEN", "book", "austen", "text_file", "available"]


class Source(NamedTuple):
    deb: str        # Debian package name (what apt-get download takes)
    rpkg: str       # R package name (its directory under an R library)
    rname: str      # object name inside the package's data


BOOKS: dict[str, Source] = {
    # Order = publication order, which is also the order austen() concatenates them in.
    "sense_and_sensibility": Source("r-cran-janeaustenr", "janeaustenr", "sensesensibility"),
    "pride_and_prejudice": Source("r-cran-janeaustenr", "janeaustenr", "prideprejudice"),
    "mansfield_park": Source("r-cran-janeaustenr", "janeaustenr", "mansfieldpark"),
    "emma": Source("r-cran-janeaustenr", "janeaustenr", "emma"),
    "northanger_abbey": Source("r-cran-janeaustenr", "janeaustenr", "northangerabbey"),
    "persuasion": Source("r-cran-janeaustenr", "janeaustenr", "persuasion"),
    "moby_dick": Source("r-cran-tokenizers", "tokenizers", "mobydick"),
}
AUSTEN = tuple(n for n, s in BOOKS.items() if s.rpkg == "janeaustenr")


def _text_cache(name: str) -> Path:
    return cache_dir("texts", f"{name}.txt")


def _key(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def book(name: str) -> str:
    """The full text of one book of :data:`BOOKS`, lines joined with ``\\n``, ending in one newline.

    The first call for a Debian package may fetch it (see :mod:`lampe.eval.debian`)."""
    key = _key(name)
    if key not in BOOKS:
        raise KeyError(f"unknown book {name!r}; choose one of {sorted(BOOKS)}")
    cached = _text_cache(key)
    if not cached.is_file():
        _extract_package_books(BOOKS[key])
    return cached.read_text(encoding="utf-8")


def austen(exclude: tuple[str, ...] | list[str] | str = ("persuasion",), sep: str = "\n\n\n") -> str:
    """Austen's novels in publication order, joined by ``sep``, minus ``exclude``.

    Persuasion is excluded by default: it is the held-out text of our evaluations, so anything
    fitted on ``austen()`` (a calibration, the tiny model) never saw it."""
    excl = {_key(e) for e in ((exclude,) if isinstance(exclude, str) else exclude)}
    unknown = excl - set(AUSTEN)
    if unknown:
        raise KeyError(f"cannot exclude {sorted(unknown)}: not an Austen novel; choose from {AUSTEN}")
    return sep.join(book(n) for n in AUSTEN if n not in excl)


def text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """Any text file of yours, for evaluating on one's own documents.

    Bytes that are not valid in ``encoding`` are replaced rather than raising (one stray byte
    should not stop an evaluation); ``.gz``/``.bz2``/``.xz`` files, by suffix, are decompressed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(p.suffix.lower(), open)
    with opener(p, "rb") as f:
        return f.read().decode(encoding, errors="replace")


def available() -> dict[str, bool]:
    """For each book, whether :func:`book` can return it without the network (never downloads)."""
    return {name: _text_cache(name).is_file() or debian.on_disk(src.deb, src.rpkg) for name, src in BOOKS.items()}


def _extract_package_books(src: Source) -> None:
    """Write every book of ``src``'s package to the text cache (one package read serves them all)."""
    wanted = {s.rname: n for n, s in BOOKS.items() if s.deb == src.deb}
    data = debian.package_dir(src.deb, src.rpkg) / "data"
    objects = read_lazyload(data / "Rdata", set(wanted))
    out_dir = cache_dir("texts")
    out_dir.mkdir(parents=True, exist_ok=True)
    for rname, name in wanted.items():
        if rname not in objects:
            raise RuntimeError(f"{data}/Rdata.rdb has no object {rname!r} (it has {sorted(objects)})")
        text = _as_text(objects[rname], rname)
        # Write then rename, so a reader never sees half a book (and a crash leaves no stub).
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, _text_cache(name))


def read_lazyload(stem: Path, names: set[str]) -> dict:
    """The objects ``names`` of the R lazy-load database ``stem.rdb`` + ``stem.rdx``, converted by rdata.

    The ``.rdx`` (an .rds file) maps each variable to (offset, length) in the ``.rdb``; each
    record there is a 4-byte big-endian length and a compressed serialization of one object."""
    import rdata  # lazily: it imports pandas and xarray

    index = rdata.read_rds(stem.with_suffix(".rdx"))
    compressed = int(index["compressed"][0])
    out = {}
    with open(stem.with_suffix(".rdb"), "rb") as f:
        for name, (offset, length) in index["variables"].items():
            if name in names:
                f.seek(int(offset))
                raw = _rdb_record(f.read(int(length)), compressed)
                out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
    return out


# R's compress = 2 and 3 records start with a type byte (R's R_decompress2/3):
# 'Z' raw LZMA2 with R's filter settings (preset 6), '2' bzip2, '1' zlib, '0' stored.
_R_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_RECORD_TYPES = {b"Z": lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=_R_LZMA),
                 b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}


def _rdb_record(blob: bytes, compressed: int) -> bytes:
    """One serialized object out of a .rdb record (R's lazy-load format, compress = 0, 1, 2 or 3):
    a 4-byte big-endian length, then a zlib stream (1) or a type byte and its stream (2, 3)."""
    if compressed == 0:
        return blob
    size, body = int.from_bytes(blob[:4], "big"), blob[4:]
    if compressed == 1:
        raw = zlib.decompress(body)
    else:
        unpack = _RECORD_TYPES.get(body[:1])
        if unpack is None:
            raise ValueError(f"unknown lazy-load record type {body[:1]!r}")
        raw = unpack(body[1:])
    if len(raw) != size:
        raise ValueError(f"lazy-load record holds {len(raw)} bytes, its header says {size}")
    return raw


def _as_text(value, what: str) -> str:
    """A book object (character vector of lines, or of one whole text) as one clean string."""
    if isinstance(value, str):
        value = [value]
    if not (hasattr(value, "__len__") and all(v is None or isinstance(v, str) for v in value)):
        raise RuntimeError(f"data object {what!r} is {type(value).__name__}, not a character vector")
    text = "\n".join("" if s is None else s for s in value)
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
    return re.sub(r"\A\s*Produced by[^\n]*(\n[^\n]+)*\n", "", body)
