"""The loop executor's worker threads and the two ways its rows are shared among them: in turn (the forwards in row
order, :func:`turn_taking`) or first-free (any order, :func:`first_free`). Torch operators and autograd release the
GIL, so the workers run on separate cores."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["turn_taking", "first_free"]

_POOL: ThreadPoolExecutor | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The loop executor's worker threads (torch operators and autograd release the GIL, so they run on separate
    cores), created once and grown when more workers are asked for."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmlhfl-loop")
    return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL
    _POOL = None  # a forked child (a DataLoader worker) has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run(workers: int, work: Callable[[int], None]) -> None:
    """work(k) for k = 0 .. workers - 1 on the pool; waits for all, then re-raises the first exception."""
    futures = [_thread_pool(workers).submit(work, k) for k in range(workers)]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def turn_taking(rows: int, workers: int, forward: Callable, backward: Callable) -> None:
    """Rows i = k, k + workers, ... on worker k; forward(i) starts only after forward(i - 1) has returned (so the
    forwards run in row order), backward(i, *forward(i)) overlaps with the other workers' forwards. The first
    exception stops every worker and is re-raised here."""
    cond = threading.Condition()
    turn = [0]
    failed = [False]
    intra_op = torch.get_num_threads()

    def work(k: int) -> None:
        # An equal share of the intra-op threads per worker. With torch's default each worker would start its own
        # OpenMP team as wide as the machine, and the oversubscribed teams made the step slower than the plain
        # loop (bench/RESULTS.md). The count is per thread; it is put back before returning.
        torch.set_num_threads(max(1, intra_op // workers))
        try:
            for i in range(k, rows, workers):
                with cond:
                    cond.wait_for(lambda: turn[0] == i or failed[0])
                    if failed[0]:
                        return
                out = forward(i)
                with cond:
                    turn[0] = i + 1
                    cond.notify_all()
                backward(i, *out)
        except BaseException:
            with cond:
                failed[0] = True
                cond.notify_all()
            raise
        finally:
            torch.set_num_threads(intra_op)

    _run(workers, work)


def first_free(rows: int, workers: int, start: Callable[[int], None], forward: Callable, backward: Callable) -> None:
    """Rows in any order: each of the workers (k = 0 .. workers - 1; ``start(k)`` first) takes the next row not yet
    taken, until none is left, so a worker slowed by another process takes fewer rows. The first exception stops
    every worker and is re-raised here."""
    taken = itertools.count()  # next() of a count is atomic under the GIL
    failed = [False]
    intra_op = torch.get_num_threads()

    def work(k: int) -> None:
        torch.set_num_threads(max(1, intra_op // workers))  # as turn_taking, for the same reason
        try:
            start(k)
            while not failed[0]:
                i = next(taken)
                if i >= rows:
                    return
                backward(i, *forward(i))
        except BaseException:
            failed[0] = True
            raise
        finally:
            torch.set_num_threads(intra_op)

    _run(workers, work)
