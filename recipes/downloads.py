"""Fetching MNIST and CIFAR-10 into the data directory (:func:`recipes.datasets.get_dataset` with ``download=True``;
the recipes' ``dataset.download``, true by default).

Missing files are fetched from the mirrors (:func:`mirror_urls`: ``mirror=`` / the recipes' ``dataset.mirror``,
else ``$QMLHFL_MNIST_MIRROR`` / ``$QMLHFL_CIFAR10_MIRROR``, else the official locations) into the data directory,
which must be writable (a read-only directory is never written to). Every file is written under a unique temporary
name in its final directory, md5-checked against :mod:`recipes.datasets`' tables and only then renamed into place,
so an interrupted or corrupt download never leaves a file that looks complete, and concurrent runs downloading the
same file do not clobber each other. The CIFAR-10 archive is extracted member by member: only the known batch
files, regular files, no paths outside the folder.

The file names, layouts and md5 tables belong to the readers (:mod:`recipes.datasets`) and are read from there
when a download runs.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from recipes import datasets as ds
from recipes.files import temp_file_beside
from recipes.integrity import DATA_ENV_VAR, DatasetError, verify_md5

__all__ = ["download", "fetch_url", "mirror_urls", "MNIST_MIRROR", "MNIST_FALLBACK_MIRRORS", "CIFAR10_URL",
           "CIFAR10_ARCHIVE", "CIFAR10_ARCHIVE_MD5", "MIRROR_ENV_VARS"]

MIRROR_ENV_VARS: dict[str, str] = {"mnist": "QMLHFL_MNIST_MIRROR", "cifar10": "QMLHFL_CIFAR10_MIRROR"}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # tried first (torchvision's primary mirror)
MNIST_FALLBACK_MIRRORS: tuple[str, ...] = ("http://yann.lecun.com/exdb/mnist/",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5: tuple[str, ...] = ("c58f30108f718f92721af3b95e74349a",)


def download(name: str, root: Path, mirror: str | Sequence[str] | None = None) -> None:
    """Fetch the missing files of ``name`` (``"mnist"`` or ``"cifar10"``) into ``root`` (module docstring)."""
    (_download_mnist if ds._check_name(name) == "mnist" else _download_cifar10)(Path(root), mirror)


def fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Download ``url`` (http(s):// or file://) to ``dest`` with urllib. Tests may replace this function."""
    request = urllib.request.Request(url, headers={"User-Agent": "lightning-qmlhfl-recipes"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def mirror_urls(name: str, mirror: str | Sequence[str] | None = None) -> list[str]:
    """The URLs the files of ``name`` are fetched from, in the order they are tried.

    MNIST: base URLs that hold the four ``*-ubyte.gz`` files; CIFAR-10: URLs of ``cifar-10-python.tar.gz`` (a URL
    ending in ``/`` is a directory holding the archive). ``mirror`` (the recipes' ``dataset.mirror``: one URL or a
    list) wins, else the environment variable ``QMLHFL_MNIST_MIRROR`` / ``QMLHFL_CIFAR10_MIRROR`` (one URL or
    several separated by commas), else the official locations (:data:`MNIST_MIRROR`, then
    :data:`MNIST_FALLBACK_MIRRORS`; :data:`CIFAR10_URL`).
    """
    key = ds._check_name(name)
    if mirror is None or (isinstance(mirror, str) and not mirror.strip()):
        env = os.environ.get(MIRROR_ENV_VARS[key], "")
        urls = [u.strip() for u in env.split(",") if u.strip()]
        if not urls:
            urls = [MNIST_MIRROR, *MNIST_FALLBACK_MIRRORS] if key == "mnist" else [CIFAR10_URL]
    elif isinstance(mirror, str):
        urls = [mirror.strip()]
    else:
        urls = [str(u).strip() for u in mirror]
        if not urls or not all(urls):
            raise ValueError(f"dataset.mirror must be a URL or a non-empty list of URLs, got {list(mirror)!r}")
    if key == "mnist":
        return [u if u.endswith("/") else u + "/" for u in urls]
    return [u + CIFAR10_ARCHIVE if u.endswith("/") else u for u in urls]


def _offline_advice(name: str, root: Path, urls: Sequence[str]) -> str:
    files = "the four *-ubyte.gz files" if name == "mnist" else f"{CIFAR10_ARCHIVE}, extracted"
    return (
        f"the files must be at: {ds._where_files_go(name, root)}. Without network, fetch {files} by hand (from "
        f"{', '.join(urls)}) and put them there, or point data_dir=DIR on the command line (or the environment "
        f"variable {DATA_ENV_VAR}=DIR) at a directory DIR that already holds {ds._layout(name)}; "
        f"dataset.mirror=URL (or ${MIRROR_ENV_VARS[name]}) fetches from another mirror, and dataset.download=false "
        f"never downloads"
    )


def _ensure_writable(directory: Path, name: str | None = None, root: Path | None = None) -> None:
    """Raise unless ``directory`` (or, if it does not exist yet, its nearest existing ancestor) is writable.
    Nothing is created or written here."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        where = f" The files must be at: {ds._where_files_go(name, root)}." if name and root is not None else ""
        raise DatasetError(
            f"{directory}: cannot download here: {probe} is not a writable directory (shared data folders are "
            f"read-only and are never written to).{where} Set data_dir=... on the command line or the environment "
            f"variable {DATA_ENV_VAR} to a writable directory (the files are downloaded there) or to one that "
            f"already holds them, or copy the files there; dataset.download=false never downloads."
        )


def _download_verified(url: str, dest: Path, accepted: Sequence[str]) -> None:
    """Fetch ``url`` to a temporary file beside ``dest``, check its md5 and rename it to ``dest`` (atomic on one
    filesystem); on any failure or md5 mismatch the temporary file is removed and ``dest`` is not touched."""
    part = temp_file_beside(dest)
    try:
        try:
            fetch_url(url, part)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{dest}: download from {url} failed ({type(e).__name__}: {e}).") from e
        verify_md5(
            part, accepted, name=dest,
            remedy=f"the download from {url} is corrupt or a different file and was removed; retry later, "
            f"or fetch the file by hand into {dest.parent}",
        )
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)


def _download_from_mirrors(name: str, root: Path, dest: Path, filename: str, urls: Sequence[str],
                           accepted: Sequence[str]) -> None:
    """Try every mirror in turn; raise one :class:`~recipes.integrity.DatasetError` naming every failure and what to do."""
    errors = []
    for base in urls:
        url = base + filename if name == "mnist" else base
        try:
            _download_verified(url, dest, accepted)
            return
        except DatasetError as e:
            errors.append(str(e))
    raise DatasetError(f"{name}: could not download {dest.name}: {' | '.join(errors)} "
                       f"So {_offline_advice(name, root, urls)}.")


def _download_mnist(root: Path, mirror: str | Sequence[str] | None = None) -> None:
    raw_dir = root / ds.MNIST_SUBDIR
    _ensure_writable(raw_dir, "mnist", root)
    urls = mirror_urls("mnist", mirror)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in ds.MNIST_FILES.values():
        dest = raw_dir / name
        if not dest.is_file():
            _download_from_mirrors("mnist", root, dest, name, urls, ds.MNIST_MD5[name])


def _extract_cifar(archive: Path, root: Path) -> None:
    """Extract the known batch files of the official archive into ``root/cifar-10-batches-py``.

    Only regular files named in :data:`recipes.datasets.CIFAR10_MD5` directly under ``cifar-10-batches-py/`` are written
    (no path traversal, links or other members), each via a temporary name and checked against its md5.
    """
    out_dir = root / ds.CIFAR10_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{ds.CIFAR10_SUBDIR.as_posix()}/{name}": name for name in ds.CIFAR10_MD5}
    found: set[str] = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None or not member.isreg():
                    continue
                src = tar.extractfile(member)
                assert src is not None
                dest = out_dir / name
                tmp = temp_file_beside(dest)
                try:
                    with src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
                    verify_md5(
                        tmp, ds.CIFAR10_MD5[name], name=f"{archive}:{member.name}",
                        remedy=f"the archive is not the official release; delete {archive} and retry",
                    )
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, dest)
                found.add(name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{archive}: cannot extract ({type(e).__name__}: {e}); delete it and retry.") from e
    missing = sorted(set(ds.CIFAR10_TRAIN_FILES + ds.CIFAR10_TEST_FILES) - found)
    if missing:
        raise DatasetError(f"{archive}: archive lacks {', '.join(missing)}; delete it and retry.")


def _download_cifar10(root: Path, mirror: str | Sequence[str] | None = None) -> None:
    _ensure_writable(root, "cifar10", root)
    urls = mirror_urls("cifar10", mirror)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        verify_md5(archive, CIFAR10_ARCHIVE_MD5, remedy=f"delete {archive} and retry")
    else:
        _download_from_mirrors("cifar10", root, archive, CIFAR10_ARCHIVE, urls, CIFAR10_ARCHIVE_MD5)
    _extract_cifar(archive, root)
    archive.unlink()  # the extracted, verified batches are all that is needed
