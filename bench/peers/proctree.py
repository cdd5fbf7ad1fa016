"""The processes around each run of bench/peers/run.py (Linux: ``/proc``, ``prctl``): the driver made a child
subreaper, so that what a runner leaves behind or double-forks (Ray) stays in its tree; :class:`TreeMemory`, which
samples the tree's peak memory during a run (the summed RSS of every descendant every 0.2 s, their PSS, which counts
shared pages once, every 2 s), leaving out the competing load; :func:`clean_up`, which waits for a run's leftovers
(Ray shutting down) and ends those that stay, by pid and only among this script's descendants; and the competing
load itself (``--competing-load``): :func:`start_load` starts one busy-loop process pinned to each of the run's
cores, in this script's session or, with ``--load-session own``, one of its own per hog, and :func:`stop_load`
ends them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------- process-tree memory
def set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux): processes that a runner leaves behind
    or that double-fork (Ray's) stay in this tree, so the memory sampler and the clean-up see them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        out[int(name)] = int(fields[1])
    return out


def descendants(root: int, exclude: set[int] = frozenset()) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in exclude:
                out.append(c)
                todo.append(c)
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak summed RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) of this process's
    descendants, except ``exclude`` (the competing load) and their children."""

    def __init__(self, exclude: set[int], interval: float = 0.2, pss_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.exclude, self.interval, self.pss_every = exclude, interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_procs = self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = descendants(os.getpid(), self.exclude)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
        if self.samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def kill(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def clean_up(exclude: set[int], grace: float = 10.0) -> int:
    """Wait for the run's leftover processes (Ray's shutting down) and end those that stay; returns how many
    had to be ended. Only this script's descendants are touched, by pid."""
    deadline = time.time() + grace
    while time.time() < deadline:
        _reap()
        left = descendants(os.getpid(), exclude)
        if not left:
            return 0
        time.sleep(0.2)
    left = descendants(os.getpid(), exclude)
    kill(left, signal.SIGTERM)
    time.sleep(2)
    _reap()
    kill(descendants(os.getpid(), exclude), signal.SIGKILL)
    time.sleep(0.2)
    _reap()
    return len(left)


# -------------------------------------------------------------------------------------- competing load
def start_load(cores: list[int], own_session: bool = False) -> list[subprocess.Popen]:
    procs = []
    for c in cores:
        procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                      preexec_fn=lambda c=c: os.sched_setaffinity(0, {c}),
                                      start_new_session=own_session))
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
