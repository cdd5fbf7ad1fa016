"""Every rank of a sharded simulation in a thread of this process, with the in-process communicator."""

from __future__ import annotations

import threading
from typing import Any, Callable

from lightning_qmlhfl.distribution.comm import thread_group


def run_ranks(world: int, work: Callable[[int, Any], Any], timeout: float = 30) -> tuple[list[Any], list[Any]]:
    """``work(rank, comm)`` in one thread per rank; returns (their results, their exceptions or None)."""
    comms = thread_group(world, timeout=timeout)
    results, errors = [None] * world, [None] * world

    def run(r: int) -> None:
        try:
            results[r] = work(r, comms[r])
        except BaseException as err:  # noqa: BLE001 - reported to the test
            errors[r] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
