"""Finding, fetching and unpacking the Debian packages that carry the evaluation texts.

An R package's directory is taken from, in order: an installed R library (``apt-get install
r-cran-...``), a copy already unpacked in the cache, or a ``.deb`` in ``<cache>/debs/`` (put
there by hand, or fetched once with ``apt-get download``) unpacked with Debian's ``dpkg-deb``.
Only this module touches the network, and only when a text is asked for and nothing is on disk.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .._cache import cache_dir

# Where Debian (and a hand-installed R) put package libraries.
R_LIBRARY_ROOTS = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library",
                   "/usr/share/R/site-library")
# The same places inside an unpacked .deb.
_DEB_LIBRARY_DIRS = ("usr/lib/R/site-library", "usr/lib/R/library", "usr/share/R/site-library")


def has_lazyload_data(package_dir: Path) -> bool:
    return (package_dir / "data" / "Rdata.rdx").is_file() and (package_dir / "data" / "Rdata.rdb").is_file()


def local_package(deb: str, rpkg: str) -> Optional[Path]:
    """R package ``rpkg``'s directory in an installed R library, or in ``deb`` already unpacked in the cache."""
    for root in R_LIBRARY_ROOTS:
        if has_lazyload_data(Path(root) / rpkg):
            return Path(root) / rpkg
    return _unpacked_package(deb, rpkg)


def _unpacked_package(deb: str, rpkg: str) -> Optional[Path]:
    for sub in _DEB_LIBRARY_DIRS:
        if has_lazyload_data(cache_dir("debs", deb, sub, rpkg)):
            return cache_dir("debs", deb, sub, rpkg)
    return None


def cached_deb(deb: str) -> Optional[Path]:
    """A .deb of ``deb`` in the cache (fetched by apt-get, or downloaded by hand on another system)."""
    debs = sorted(cache_dir("debs").glob(f"{deb}_*.deb"))
    return debs[-1] if debs else None


def on_disk(deb: str, rpkg: str) -> bool:
    """Whether :func:`package_dir` can answer without the network."""
    return local_package(deb, rpkg) is not None or cached_deb(deb) is not None


def package_dir(deb: str, rpkg: str) -> Path:
    """The directory of R package ``rpkg`` (Debian package ``deb``), fetching and unpacking it if needed."""
    found = local_package(deb, rpkg)
    if found is not None:
        return found
    deb_file = cached_deb(deb) or apt_download(deb)
    unpack(deb_file, cache_dir("debs", deb))
    found = _unpacked_package(deb, rpkg)
    if found is None:
        raise how_to_get(deb, f"{deb_file} holds no R lazy-load data for package {rpkg!r}")
    return found


def how_to_get(deb: str, why: str) -> RuntimeError:
    debs = cache_dir("debs")
    return RuntimeError(
        f"cannot get the text of Debian package {deb!r}: {why}\n"
        f"Any one of these fixes it:\n"
        f"  * install it: sudo apt-get install {deb}\n"
        f"  * fetch it: (mkdir -p {debs} && cd {debs} && apt-get download {deb})\n"
        f"  * on a system without apt, download {deb}_*.deb from https://packages.debian.org/{deb} into {debs}\n"
        f"    (unpacking it needs dpkg-deb, from the dpkg package of most distributions and of Homebrew)\n"
        f"  * or evaluate on a text of your own: lampe.eval.texts.text_file(path)")


def apt_download(deb: str) -> Path:
    """Fetch ``deb`` into the cache with ``apt-get download`` (no root needed unless lists are missing)."""
    if shutil.which("apt-get") is None:
        raise how_to_get(deb, "apt-get is not available on this machine")
    dest = cache_dir("debs")
    dest.mkdir(parents=True, exist_ok=True)

    def download():
        return subprocess.run(["apt-get", "download", deb], cwd=dest, capture_output=True, text=True, timeout=600)

    r = download()
    if r.returncode != 0 and ("Unable to locate package" in r.stderr or "no installation candidate" in r.stderr):
        # Fresh containers ship without package lists; refreshing them needs root, so only try
        # it when the download has shown it is needed.
        u = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
        if u.returncode != 0:
            raise how_to_get(deb, f"package lists are missing and `apt-get update` failed:\n{u.stderr.strip()}")
        r = download()
    if r.returncode != 0:
        raise how_to_get(deb, f"`apt-get download {deb}` failed:\n{r.stderr.strip()}")
    got = cached_deb(deb)
    if got is None:
        raise how_to_get(deb, f"`apt-get download {deb}` reported success but left no .deb in {dest}")
    return got


def unpack(deb_file: Path, dest: Path) -> None:
    """Unpack ``deb_file`` into ``dest`` with ``dpkg-deb -x``, atomically (a half-unpacked tree is
    never left where it would be taken for a good one)."""
    deb = deb_file.name.split("_")[0]
    if shutil.which("dpkg-deb") is None:
        raise how_to_get(deb, f"unpacking {deb_file} needs dpkg-deb, which is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o755 & ~mask)  # mkdtemp's 0700 would hide the cache from other users
    try:
        r = subprocess.run(["dpkg-deb", "-x", str(deb_file), str(tmp)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise how_to_get(deb, f"`dpkg-deb -x {deb_file}` failed:\n{r.stderr.strip()}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
