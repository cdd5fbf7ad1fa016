"""Whether a data file can be trusted: :class:`DatasetError`, md5 checks (cached per process) and the restricted
unpickler that reads CIFAR-10 batches without letting a tampered pickle run code."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_ENV_VAR", "DatasetError", "RestrictedUnpickler", "md5_of_file", "verify_md5"]

DATA_ENV_VAR = "QMLHFL_DATA"
_HINT = f"set {DATA_ENV_VAR} or data_dir=... to a directory holding the dataset, or pass dataset.download=true"


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt, unsafe or cannot be obtained; the message says what to do."""


# (absolute path, size in bytes, mtime in ns) -> md5 hex digest. Filled once per file per process.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def md5_of_file(path: str | os.PathLike[str], data: bytes | None = None) -> str:
    """Hex md5 of the file at ``path``, cached per process (keyed by path, size and mtime).

    ``data``, if given, must be the file's full contents already read by the caller; it is hashed
    instead of re-reading the file.
    """
    path = Path(path)
    key = _cache_key(path)
    digest = _MD5_CACHE.get(key)
    if digest is None:
        if data is None:
            h = hashlib.md5()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        else:
            digest = hashlib.md5(data).hexdigest()
        _MD5_CACHE[key] = digest
    return digest


def verify_md5(
    path: str | os.PathLike[str],
    accepted: Sequence[str],
    data: bytes | None = None,
    *,
    name: str | os.PathLike[str] | None = None,
    remedy: str | None = None,
) -> None:
    """Raise :class:`DatasetError` unless the md5 of ``path`` is one of ``accepted``.

    ``name`` is the file named in the message (default ``path``); ``remedy`` replaces the default advice.
    """
    digest = md5_of_file(path, data)
    if digest not in accepted:
        if remedy is None:
            remedy = (
                f"the file is corrupt, truncated or a different version: replace it ({_HINT}), "
                f"or load with verify=False if you modified it on purpose"
            )
        raise DatasetError(
            f"{name if name is not None else path}: md5 mismatch: got {digest}, "
            f"accepted {', '.join(accepted)}; {remedy}."
        )


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: missing ({what}); {_HINT}.")
    return path.read_bytes()


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2; avoids the deprecated numpy.core shim
    if core is not None:
        return core.multiarray._reconstruct
    return np.core.multiarray._reconstruct  # pragma: no cover - numpy 1.x


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 python batch needs.

    The official batches reference exactly ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype`` (the ``data`` field is a numpy array; everything else is dicts, lists, bytes and
    ints, which need no globals). ``numpy._core.multiarray._reconstruct`` (numpy >= 2 pickles) is also
    admitted, and so is ``_codecs.encode``, which Python 3 uses for ``bytes`` in protocol <= 2 pickles
    (a batch re-saved with ``pickle.dump(..., protocol=2)``); it only turns a str into bytes. Any other
    global raises :class:`DatasetError` *before* it is imported or called.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, source: str | os.PathLike[str] = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED))
            raise DatasetError(
                f"{self.source}: pickle references the global {module}.{name}, which a CIFAR-10 batch never "
                f"needs; refusing to load it (a tampered pickle can run code). Allowed globals: {allowed}. "
                f"Replace the file with the official release ({_HINT})."
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if name == "encode":
            return codecs.encode
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self.source}: pickle uses persistent id {pid!r}, which CIFAR-10 batches never do.")
