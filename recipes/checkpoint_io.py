"""The recipes' checkpoint writer (a Lightning ``CheckpointIO`` plugin, ``trainer.plugins`` in
``conf/trainer/default.yaml``): every checkpoint is written atomically."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from recipes.files import temp_file_beside

__all__ = ["AtomicCheckpointIO"]

_LOW_SPACE = 16 << 20  # bytes free below which a failed write is taken for a full disk


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but every checkpoint is written to a temporary file in its directory, flushed
    to disk and renamed into place: a crash while saving never leaves a truncated checkpoint (the temporary file it
    may leave is removed when a run next starts in that directory, :func:`recipes.files.remove_stale_temps`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path, suffix=".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except RuntimeError as e:
            Path(tmp).unlink(missing_ok=True)
            # torch's zip writer reports a full disk as "unexpected pos ..." without the OS error: name it
            if shutil.disk_usage(path.parent).free < _LOW_SPACE:
                raise OSError(errno.ENOSPC, f"no space left on device: could not write checkpoint {path}") from e
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
