"""Atomic file writes for the recipes (downloaded data files, checkpoints): write under a temporary name in the
final directory, then ``os.replace`` onto the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temp_file_beside"]


def temp_file_beside(dest: Path, suffix: str = ".part") -> Path:
    """A fresh, unique, empty temporary file next to ``dest`` (``.NAME.XXXX.part``), with the permissions a new file
    gets under the umask: never the final name, so a partial file never looks complete, two processes writing at
    once do not share it, and ``os.replace`` onto ``dest`` is atomic (one filesystem)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    return Path(tmp)
