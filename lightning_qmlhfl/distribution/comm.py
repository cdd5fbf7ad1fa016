"""The collectives a sharded simulation needs, behind one small interface.

- :class:`TorchComm`: ``torch.distributed`` (gloo on CPU, NCCL on GPU) on the default process group, which Lightning's
  DDP launcher initialises (with its ``timeout``, so a dead rank fails a collective instead of hanging it).
- :class:`ThreadComm`: the same collectives between threads of one process, for tests that run every shard of an
  engine side by side (:func:`thread_group`).

``all_gather`` takes tensors whose first dimension may differ between ranks (they are padded to the largest and
trimmed: one small exchange of the row counts, then the payload), and returns the per-rank tensors in rank order.
Every communicator counts, per kind of collective, the calls and the bytes this rank contributes (``stats``; the
padded payload; ``"sizes"`` for the row counts), for the scale-out benchmark and its formula
(:meth:`lightning_qmlhfl.distribution.shard.Shard.exchange_bytes`).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Communicator", "TorchComm", "ThreadComm", "thread_group"]


class Communicator(ABC):
    rank: int
    world: int

    def __init__(self) -> None:
        self.stats: dict[str, list[int]] = {}  # kind -> [calls, bytes contributed by this rank]

    def _count(self, kind: str, nbytes: int) -> None:
        entry = self.stats.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank contributed to every collective so far."""
        return sum(b for _, b in self.stats.values())

    @property
    def calls(self) -> int:
        return sum(c for c, _ in self.stats.values())

    @abstractmethod
    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (same shape apart from the first dimension), in rank order."""

    @abstractmethod
    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """The element-wise sum over the ranks (a new tensor)."""

    @abstractmethod
    def all_reduce_max(self, t: Tensor) -> Tensor:
        """The element-wise maximum over the ranks (a new tensor)."""


class TorchComm(Communicator):
    """``torch.distributed`` collectives on the default process group."""

    def __init__(self) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised torch.distributed process group")
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_gather(self, t: Tensor) -> list[Tensor]:
        dist = self.dist
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        self._count("sizes", n.numel() * n.element_size())
        dist.all_gather(sizes, n)
        sizes_i = [int(s) for s in sizes]
        width = max(sizes_i)
        padded = t
        if t.shape[0] < width:
            padded = torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))])
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._count("all_gather", padded.numel() * padded.element_size())
        dist.all_gather(out, padded.contiguous())
        return [o[:s] for o, s in zip(out, sizes_i)]

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        out = t.clone()
        self._count("all_reduce_sum", out.numel() * out.element_size())
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM)
        return out

    def all_reduce_max(self, t: Tensor) -> Tensor:
        out = t.clone()
        self._count("all_reduce_max", out.numel() * out.element_size())
        self.dist.all_reduce(out, op=self.dist.ReduceOp.MAX)
        return out


class _ThreadHub:
    def __init__(self, world: int, timeout: float) -> None:
        self.world, self.timeout = world, timeout
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots: list = [None] * world


class ThreadComm(Communicator):
    """Collectives between ``world`` threads of one process (tests); a missing thread times out the others."""

    def __init__(self, hub: _ThreadHub, rank: int) -> None:
        super().__init__()
        self.hub, self.rank, self.world = hub, rank, hub.world

    def _exchange(self, t: Tensor) -> list[Tensor]:
        hub = self.hub
        hub.barrier.wait()  # everyone has read the previous exchange
        hub.slots[self.rank] = t.clone()
        hub.barrier.wait()  # everyone has written
        out = list(hub.slots)
        return out

    def all_gather(self, t: Tensor) -> list[Tensor]:
        parts = self._exchange(t)
        width = max(p.shape[0] for p in parts)  # counted as TorchComm sends it: the row counts, then padded
        self._count("sizes", 8)
        self._count("all_gather", width * math.prod(t.shape[1:]) * t.element_size())
        return parts

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        self._count("all_reduce_sum", t.numel() * t.element_size())
        parts = self._exchange(t)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_reduce_max(self, t: Tensor) -> Tensor:
        self._count("all_reduce_max", t.numel() * t.element_size())
        parts = self._exchange(t)
        out = parts[0].clone()
        for p in parts[1:]:
            out = torch.maximum(out, p)
        return out


def thread_group(world: int, timeout: float = 60.0) -> list[ThreadComm]:
    """One :class:`ThreadComm` per rank of an in-process group of ``world`` threads."""
    hub = _ThreadHub(world, timeout)
    return [ThreadComm(hub, r) for r in range(world)]
