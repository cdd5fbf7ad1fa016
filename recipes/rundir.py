"""A run's directory: claimed with a lock for as long as the run lives, cleaned of the temporary files of killed
writes, given the run's ``config.yaml``; a resumed run claims the directory of its checkpoint.

The lock (:class:`RunLock`, ``run.lock`` in the directory) is an exclusive ``flock`` on that file: the operating
system drops it when the process ends however it ends, so a killed run never leaves a stale lock, and a second run
into a directory in use fails at once with a message naming the holder (process, host, start time, command).
``ckpt_path=last`` passes over directories in use (:func:`in_use`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["LOCK_FILE", "RunDirectory", "RunDirectoryInUse", "RunLock", "in_use", "is_global_zero"]

LOCK_FILE = "run.lock"

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its run (a single process is): Lightning's DDP launcher starts the other
    ranks as copies of the command with ``LOCAL_RANK`` / ``NODE_RANK`` set; only rank 0 claims and writes the run
    directory."""
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


class RunLock:
    """The exclusive lock of one run directory, held by this process until :meth:`release` or its end."""

    _held: dict[Path, "RunLock"] = {}

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @classmethod
    def claim(cls, directory: Path) -> "RunLock":
        """The lock of ``directory``, taken now (or the one this process already holds).

        Raises:
            RunDirectoryInUse: another process holds it (the message names the holder).
        """
        key = Path(directory).resolve()
        if key in cls._held:
            return cls._held[key]
        lock = cls(key)
        lock._acquire()
        cls._held[key] = lock
        return lock

    def _acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunDirectoryInUse(
                    f"run directory {self.directory} is in use by another run ({_holder_text(self.path)}); wait "
                    f"for it to finish or choose another directory (hydra.run.dir=...)") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the directory up (the lock file stays; it is free once no process holds its lock)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        RunLock._held.pop(self.directory, None)


def _command() -> str:
    """This process's command line, as typed (``python -m recipes.mnist seed=1 ...``)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)[:500]


def _holder_text(path: Path) -> str:
    h: dict[str, Any] = {}
    for _ in range(20):  # a holder that has just taken the lock writes who it is a moment later
        try:
            h = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            h = {}
        if h:
            break
        time.sleep(0.05)
    if not h:
        return "holder unknown"
    return f"pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}: {h.get('command')}"


def in_use(directory: Path) -> str | None:
    """Who holds ``directory``'s lock if another process does (a description), else None."""
    directory = Path(directory).resolve()
    path = directory / LOCK_FILE
    if fcntl is None or directory in RunLock._held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder_text(path)
    finally:
        os.close(fd)  # also drops the shared lock taken to test
    return None


class RunDirectory:
    """Where a run writes, claimed for the run's lifetime (a context manager).

    Resolves ``cfg.ckpt_path`` (a resumed run continues in its checkpoint's directory, :mod:`recipes.resume`),
    takes the directory's lock (rank 0 of a multi-process run only), removes the temporary files of killed writes
    and writes ``config.yaml`` (kept when resuming).

    Attributes:
        path: the run directory.
        checkpoint: the checkpoint this run resumes (None: a fresh run).
    """

    def __init__(self, cfg: Any, run_dir: str | os.PathLike | None, config: Mapping[str, Any]) -> None:
        from recipes.resume import resolve_ckpt_path, resume_ignored, warn_config_changes

        path = Path(run_dir or os.getcwd()).resolve()
        ignore = resume_ignored(cfg)
        self.checkpoint = resolve_ckpt_path(cfg.get("ckpt_path"), config, [path.parent], ignore)
        if self.checkpoint is not None:
            if self.checkpoint.parent != path:
                print(f"resuming {self.checkpoint}: writing into its run directory {self.checkpoint.parent}")
            path = self.checkpoint.parent
            warn_config_changes(self.checkpoint, config, ignore)
        self.path = path
        self.config = config
        self._lock: RunLock | None = None

    def __enter__(self) -> "RunDirectory":
        from recipes.files import remove_stale_temps
        from recipes.resume import write_run_config

        if is_global_zero():
            held = self.path.resolve() in RunLock._held
            lock = RunLock.claim(self.path)
            self._lock = None if held else lock  # a lock the entry point took is released by the process's end
            for p in remove_stale_temps(self.path):
                print(f"removed {p.name}: the temporary file of a write that did not finish", file=sys.stderr)
            write_run_config(self.path, self.config, overwrite=self.checkpoint is None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.release()
