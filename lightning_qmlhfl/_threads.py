"""One process-wide pool of worker threads for the CPU paths that run torch work in parallel (seeded draws in
:mod:`.aggregation`, the devices of the ``loop`` executor). torch operators and autograd release the GIL, so
these threads run on separate cores."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["thread_pool"]

_POOL: ThreadPoolExecutor | None = None


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool, grown to at least ``workers`` threads."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001 - grow when more threads are asked for
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmlhfl")
    return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL
    _POOL = None  # a forked child (a DataLoader worker) has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
