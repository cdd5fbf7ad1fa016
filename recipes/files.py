"""Atomic file writes for the recipes (downloaded data files, checkpoints, summary.json, history.json): write under
a temporary name in the final directory, then ``os.replace`` onto the final name; and the removal of the temporary
files a killed write leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TEMP_SUFFIXES", "remove_stale_temps", "temp_file_beside", "write_json_atomic", "write_text_atomic"]

TEMP_SUFFIXES = (".part", ".tmp")
"""The suffixes of :func:`temp_file_beside`'s names."""

_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(?:\.part|\.tmp)$")  # .NAME.XXXXXXXX.part (mkstemp's 8 characters)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never a part of it."""
    path = Path(path)
    tmp = temp_file_beside(path, suffix=".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """``json.dumps(data, indent=2)`` written atomically to ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2))


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files of writes that never finished (a process killed while writing a checkpoint or a
    summary) from ``directory`` (not its subdirectories). Only call this while holding the directory (its run lock):
    nobody else may be writing there. Returns the removed paths."""
    removed = []
    for p in Path(directory).iterdir():
        if p.is_file() and _TEMP_NAME.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
