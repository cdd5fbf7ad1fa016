"""MNIST and CIFAR-10 as in-memory tensors, plus batched on-device preprocessing.

The two datasets are read straight from their official on-disk formats (no torchvision):

* MNIST: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, gzip-compressed IDX files.
* CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``, the "python version" pickles.
  They are unpickled with :class:`~recipes.integrity.RestrictedUnpickler`, which admits only the numpy globals the format
  needs, so a tampered file cannot run code.

Every file is checked against a list of accepted md5s (the official release and the lossless local
rebuild described in ``/work/shared/data/README.md``). A file's digest is computed once per process
and cached, keyed by path, size and modification time.

Loaders return ``uint8`` images ``[n, C, H, W]`` and ``int64`` labels ``[n]``. Normalisation and
augmentation (:func:`normalize`, :func:`random_crop_flip`, in :mod:`recipes.transforms`) then run on whole batches on whatever device
the tensors live on, in the style of airbench: the data sits on the device and mini-batches are gathered
by indexing, with no DataLoader and no per-sample Python.

Data directory: :func:`resolve_data_dir` (config value, else ``$QMLHFL_DATA``, else ``./data``).

Download (``get_dataset(..., download=True)``; the recipes' ``dataset.download``, true by default;
:mod:`recipes.downloads`): missing files are fetched from the mirrors (:func:`~recipes.downloads.mirror_urls`: ``mirror=`` / the recipes' ``dataset.mirror``, else
``$QMLHFL_MNIST_MIRROR`` / ``$QMLHFL_CIFAR10_MIRROR``, else the official locations) into the data directory, which
must be writable (a read-only directory is never written to). Every file is written under a unique temporary name
in its final directory, md5-checked and only then renamed into place, so an interrupted or corrupt download never
leaves a file that looks complete, and concurrent runs downloading the same file do not clobber each other.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from recipes.integrity import _HINT, _MD5_CACHE, DATA_ENV_VAR, DatasetError, RestrictedUnpickler  # noqa: F401
from recipes.integrity import md5_of_file, verify_md5  # noqa: F401 (part of this module's API)
from recipes.transforms import crop_flip, normalize, random_crop_flip  # noqa: F401 (part of this module's API)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "DatasetError",
    "DatasetSplits",
    "MNIST_MEAN",
    "MNIST_STD",
    "RestrictedUnpickler",
    "crop_flip",
    "dataset_stats",
    "get_dataset",
    "load_cifar10",
    "load_mnist",
    "md5_of_file",
    "normalize",
    "random_crop_flip",
    "resolve_data_dir",
    "verify_md5",
]

# ----------------------------------------------------------------------------------------------
# Constants: statistics, file names, checksums (the download locations: recipes.downloads)
# ----------------------------------------------------------------------------------------------

MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)

DATASET_NAMES: tuple[str, ...] = ("mnist", "cifar10")

MNIST_SUBDIR = Path("MNIST") / "raw"
MNIST_FILES: dict[tuple[bool, str], str] = {
    (True, "images"): "train-images-idx3-ubyte.gz",
    (True, "labels"): "train-labels-idx1-ubyte.gz",
    (False, "images"): "t10k-images-idx3-ubyte.gz",
    (False, "labels"): "t10k-labels-idx1-ubyte.gz",
}
# The local copy is byte-identical to the official release, so one md5 per file.
MNIST_MD5: dict[str, tuple[str, ...]] = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",),
}

CIFAR10_SUBDIR = Path("cifar-10-batches-py")
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)
# (official md5, md5 of the local lossless rebuild whose `filenames` field differs)
CIFAR10_MD5: dict[str, tuple[str, ...]] = {
    "data_batch_1": ("c99cafc152244af753f735de768cd75f", "62860871cf64e923465134dd0fae1c2f"),
    "data_batch_2": ("d4bba439e000b95fd0a9bffe97cbabec", "9ce228b7f23fd11d1736f1899a0f5c7d"),
    "data_batch_3": ("54ebc095f3ab1f0389bbae665268c751", "efc4ca8f461f2de2e4217ececeea76d8"),
    "data_batch_4": ("634d18415352ddfa80567beed471001a", "161ff5f3adffe7fbb785ed1ef8d090de"),
    "data_batch_5": ("482c414d41f54cd18b22e5b47cb7c3cb", "8fae555b775334e85ffdf17cb6315ebd"),
    "test_batch": ("40351d587109b95175f43aff81a1287e", "81dcfca5ee9f17a826e3916eaa0a5681"),
    "batches.meta": ("5ff9c542aee3614f3951f8cda6e48888",),
}

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: missing ({what}); {_HINT}.")
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------
# MNIST (IDX, gzip)
# ----------------------------------------------------------------------------------------------


def _parse_idx(path: Path, raw: bytes, expected_magic: int) -> tuple[tuple[int, ...], memoryview]:
    """Return (dims, payload) of an uncompressed IDX file, checking magic number and payload size."""
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(raw)} bytes after gunzip); {_HINT}.")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images: ubyte, 3 dims' if expected_magic == _IDX_IMAGES_MAGIC else 'labels: ubyte, 1 dim'}); "
            f"the file is not the MNIST file it is named after. {_HINT}."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated ({len(raw)} < {header} bytes); {_HINT}.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: wrong size: header says dims {tuple(dims)} -> {expected} bytes, but the file has "
            f"{len(raw)} bytes after gunzip; the file is truncated or corrupt. {_HINT}."
        )
    return tuple(dims), memoryview(raw)[header:]


def _read_idx_gz(path: Path, expected_magic: int, verify: bool) -> tuple[tuple[int, ...], np.ndarray]:
    compressed = _read_file(path, "MNIST IDX file")
    if verify:
        verify_md5(path, MNIST_MD5[path.name], compressed)
    try:
        raw = gzip.decompress(compressed)
    except (EOFError, OSError, zlib.error) as e:
        raise DatasetError(
            f"{path}: not a valid gzip stream ({type(e).__name__}: {e}); the file is truncated or corrupt. "
            f"{_HINT}."
        ) from e
    dims, payload = _parse_idx(path, raw, expected_magic)
    # Copy so that the tensor owns writable memory.
    return dims, np.frombuffer(payload, dtype=np.uint8).copy()


def load_mnist(root: str | os.PathLike[str], train: bool, verify: bool = True) -> tuple[Tensor, Tensor]:
    """Load one MNIST split from ``root/MNIST/raw``.

    Args:
        root: data directory holding ``MNIST/raw/*.gz``.
        train: the 60,000-image training split if True, else the 10,000-image test split.
        verify: check each file's md5 against the accepted list (cached per process).

    Returns:
        ``(images, labels)``: ``uint8`` ``[n, 1, 28, 28]`` (0..255) and ``int64`` ``[n]`` (0..9).
    """
    raw_dir = Path(root) / MNIST_SUBDIR
    img_path = raw_dir / MNIST_FILES[(train, "images")]
    lbl_path = raw_dir / MNIST_FILES[(train, "labels")]
    (n, rows, cols), pixels = _read_idx_gz(img_path, _IDX_IMAGES_MAGIC, verify)
    (n_labels,), labels = _read_idx_gz(lbl_path, _IDX_LABELS_MAGIC, verify)
    if n != n_labels:
        raise DatasetError(f"{img_path} has {n} images but {lbl_path} has {n_labels} labels; {_HINT}.")
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{lbl_path}: label {int(labels.max())} out of range 0..9; {_HINT}.")
    images = torch.from_numpy(pixels).view(n, 1, rows, cols)
    return images, torch.from_numpy(labels).to(torch.int64)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, read with recipes.integrity.RestrictedUnpickler)
# ----------------------------------------------------------------------------------------------


def _get(d: dict[Any, Any], key: str) -> Any:
    # encoding="bytes" keeps the Python 2 str keys as bytes; accept str keys too (re-pickled batches).
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _load_cifar_batch(path: Path, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (data uint8 [n, 3072], labels int64 [n])."""
    raw = _read_file(path, "CIFAR-10 python batch")
    if verify:
        verify_md5(path, CIFAR10_MD5[path.name], raw)
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), source=path).load()
    except DatasetError:
        raise
    except Exception as e:  # any parse failure of untrusted bytes: EOFError, UnpicklingError, ValueError, ...
        raise DatasetError(
            f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is truncated or corrupt. {_HINT}."
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict with 'data' and 'labels', got {type(obj).__name__}.")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array [n, 3072], got {desc}.")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}.") from e
    if labels_arr.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: 'labels' has shape {labels_arr.shape}, expected ({data.shape[0]},) to match 'data'."
        )
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise DatasetError(f"{path}: labels out of range 0..9 (min {labels_arr.min()}, max {labels_arr.max()}).")
    return data, labels_arr


def load_cifar10(root: str | os.PathLike[str], train: bool, verify: bool = True) -> tuple[Tensor, Tensor]:
    """Load one CIFAR-10 split from ``root/cifar-10-batches-py``.

    Args:
        root: data directory holding ``cifar-10-batches-py/``.
        train: the 50,000-image training split (``data_batch_1..5``) if True, else ``test_batch``.
        verify: check each file's md5 against the official or the local-copy md5 (cached per process).

    Returns:
        ``(images, labels)``: ``uint8`` ``[n, 3, 32, 32]`` (RGB, 0..255) and ``int64`` ``[n]`` (0..9).
    """
    batch_dir = Path(root) / CIFAR10_SUBDIR
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    parts = [_load_cifar_batch(batch_dir / name, verify) for name in names]
    data = np.concatenate([d for d, _ in parts])  # a fresh, writable array
    labels = np.concatenate([lbl for _, lbl in parts])
    images = torch.from_numpy(data).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------
# Data directory, the combined entry point
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(cfg_value: str | os.PathLike[str] | None) -> Path:
    """The data directory: ``cfg_value`` if given (non-empty), else ``$QMLHFL_DATA``, else ``./data``."""
    if cfg_value is not None and str(cfg_value) != "":
        return Path(cfg_value).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("data")


def _where_files_go(name: str, root: Path) -> str:
    """The exact paths the loader reads, for error messages."""
    return ", ".join(str(p) for p in _required_files(name, root))


def _layout(name: str) -> str:
    return f"{MNIST_SUBDIR.as_posix()}/*-ubyte.gz" if name == "mnist" else f"{CIFAR10_SUBDIR.as_posix()}/"


def _required_files(name: str, root: Path) -> list[Path]:
    if name == "mnist":
        return [root / MNIST_SUBDIR / f for f in MNIST_FILES.values()]
    return [root / CIFAR10_SUBDIR / f for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES]


@dataclass(frozen=True)
class DatasetSplits:
    """A whole dataset in memory.

    Attributes:
        name: ``"mnist"`` or ``"cifar10"``.
        train_images, test_images: ``uint8`` ``[n, C, H, W]`` (0..255).
        train_labels, test_labels: ``int64`` ``[n]`` (0..num_classes-1).
        mean, std: per-channel statistics of the training pixels in [0, 1] units, for :func:`normalize`.
        num_classes: number of classes (10 for both).
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel, in [0, 1] pixel units, of the named dataset's training split."""
    name = _check_name(name)
    return (MNIST_MEAN, MNIST_STD) if name == "mnist" else (CIFAR10_MEAN, CIFAR10_STD)


def _check_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    return key


def get_dataset(
    name: Literal["mnist", "cifar10"] | str,
    root: str | os.PathLike[str],
    download: bool = False,
    verify: bool = True,
    mirror: str | Sequence[str] | None = None,
) -> DatasetSplits:
    """Load both splits of ``name`` from ``root``, downloading the official files first if asked.

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        root: data directory (see :func:`resolve_data_dir`).
        download: if files are missing, fetch them into ``root`` (which must be writable; a read-only directory
            is never written to), verify their md5 and, for CIFAR-10, extract the archive. The recipes pass
            ``dataset.download`` (true by default).
        verify: check md5s when loading (once per file per process).
        mirror: where to download from (see :func:`recipes.downloads.mirror_urls`); default: ``$QMLHFL_MNIST_MIRROR`` /
            ``$QMLHFL_CIFAR10_MIRROR``, else the official locations.

    Raises:
        ValueError: unknown ``name``.
        DatasetError: a file is missing (and ``download`` is false), corrupt or cannot be downloaded; the message
            names the exact paths the files must have and the settings that change where they are looked for.
    """
    key = _check_name(name)
    root = Path(root)
    missing = [p for p in _required_files(key, root) if not p.is_file()]
    if missing:
        if not download:
            raise DatasetError(
                f"{key}: missing {', '.join(str(p) for p in missing)}; the files must be at: "
                f"{_where_files_go(key, root)}. Set data_dir=DIR on the command line (or the environment variable "
                f"{DATA_ENV_VAR}=DIR) to a directory DIR holding {_layout(key)}, or allow the download into "
                f"{root} with dataset.download=true (the recipes' default)."
            )
        from recipes.downloads import download  # the readers never need it

        download(key, root, mirror)
    loader = load_mnist if key == "mnist" else load_cifar10
    train_x, train_y = loader(root, train=True, verify=verify)
    test_x, test_y = loader(root, train=False, verify=verify)
    mean, std = dataset_stats(key)
    return DatasetSplits(key, train_x, train_y, test_x, test_y, mean, std)
