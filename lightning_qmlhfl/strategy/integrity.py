"""Checkpoints that are safe to load and honest when they are damaged.

- A checksum of every tensor a checkpoint holds (with its key path, dtype and shape) is written with it
  (``"qmlhfl_checksum"``) and checked on load: flipped bytes inside tensor data, which unpickle without error,
  are caught. CRC-32 (``zlib``) rather than a cryptographic hash: the threat is damage (a bad disk, a partial copy),
  not forgery (anyone can recompute any checksum), and CRC-32 runs at memory speed on large stacked states.
- Any failure to read a checkpoint becomes one :class:`CorruptCheckpointError` naming the file; in particular the
  message never suggests turning the safe loader off (``weights_only=False``).
- A full disk while writing becomes one line naming the file and "no space left on device".
- The metadata of a sharded checkpoint (``torch.distributed.checkpoint``'s ``.metadata``, which its own reader
  unpickles with plain ``pickle``) is read by :class:`SafeFileSystemReader`, whose unpickler admits only the
  classes that format is made of: a crafted file cannot run code.
"""

from __future__ import annotations

import errno
import io
import pickle
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata

__all__ = ["CorruptCheckpointError", "CHECKSUM_KEY", "payload_checksum", "verify_checksum", "SafeFileSystemReader",
           "no_space_error", "read_error"]

CHECKSUM_KEY = "qmlhfl_checksum"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or whose contents do not match the checksum written with it."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"checkpoint {path} is corrupt or incomplete ({reason})")


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under ``value`` with its key path, in the container's own order (pickle keeps dict order)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k != CHECKSUM_KEY:
                yield from _tensors(v, f"{path}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}/{i}")


def payload_checksum(checkpoint: dict[str, Any]) -> str:
    """CRC-32 over every tensor of ``checkpoint`` (key path, dtype, shape and bytes), as 8 hex digits."""
    crc = 0
    for path, t in _tensors(checkpoint, ""):
        crc = zlib.crc32(f"{path}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        if t.numel():
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(memoryview(data), crc)
    return f"{crc:08x}"


def verify_checksum(checkpoint: dict[str, Any], path: Any) -> None:
    """Raise :class:`CorruptCheckpointError` when ``checkpoint`` carries a checksum that its tensors do not match
    (checkpoints written before checksums existed carry none and are accepted)."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        return
    actual = payload_checksum(checkpoint)
    if stored != actual:
        raise CorruptCheckpointError(path, f"its tensors do not match the checksum written with it: {actual} != "
                                           f"{stored}")


def read_error(path: Any, error: BaseException) -> CorruptCheckpointError:
    """The one-line error for a checkpoint file that could not be read (empty, truncated, not a checkpoint)."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    what = "the file is empty" if size == 0 else f"it cannot be read as a checkpoint: {type(error).__name__}"
    return CorruptCheckpointError(path, what)


def no_space_error(error: BaseException, path: Any) -> OSError | None:
    """A one-line OSError when ``error`` (or what caused it) is a full disk, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return OSError(errno.ENOSPC, f"no space left on device: could not write checkpoint {path}")
        seen = seen.__cause__ or seen.__context__
    return None


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint metadata without plain pickle
# ---------------------------------------------------------------------------------------------------------------
def _allowed(module: str, name: str) -> bool:
    if module == dcp_metadata.__name__:
        return isinstance(getattr(dcp_metadata, name, None), type)
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name == "_get_layout"
    if module == "pathlib":
        return name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    if module == "collections":
        return name == "OrderedDict"
    return False


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes of ``torch.distributed.checkpoint``'s metadata (and the torch and pathlib values in
    it); anything else (``os.system``, ``builtins.eval``, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"the metadata names {module}.{name}, which a sharded checkpoint's "
                                         f"metadata does not contain")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """``torch.distributed.checkpoint``'s file-system reader with the metadata read by a restricted unpickler
    (the tensor files themselves are read by torch's ``weights_only`` loader already)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(self.path, f"unreadable sharded metadata: {e}") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CorruptCheckpointError(self.path, f"the sharded metadata is a {type(metadata).__name__}, not "
                                                    f"Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
