"""Placement of one simulation over W processes: every rank owns whole subtrees.

A *cut layer* c (0 <= c < N) is chosen; its nodes are split into W contiguous blocks (in row order), and rank r owns
block r and every row below it (their descendants, at layers 0..c-1). The layers above the cut (c+1..N) are small and
replicated on every rank. Everything below the cut is computed where it lives; the aggregation into layer c+1 needs
the uploads of every rank: each rank compresses its own children's uploads, the weighted uploads are gathered, and
every rank sums them in global child order, exactly as one process would (bit-identical), or, as a documented faster
option (``exchange="all_reduce"``), every rank sums its own children and the partial sums are all-reduced (equal to
float tolerance: float addition does not associate).

``choose_cut`` picks the highest layer whose nodes can be split into W blocks of balanced device counts (the largest
block at most ``tolerance`` x the ideal N_tot / W), falling back to lower layers, down to the devices themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..hierarchy import Hierarchy, aggregations_per_round

__all__ = ["Shard", "choose_cut", "EXCHANGES"]

EXCHANGES = ("gather", "all_reduce")


def _blocks(counts: Tensor, world: int) -> list[tuple[int, int]] | None:
    """Contiguous blocks [start, stop) of nodes with device counts ``counts``, W of them, each non-empty, as
    balanced as a greedy cut at the ideal prefix sums makes them; None when there are fewer nodes than W."""
    M = counts.numel()
    if M < world:
        return None
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    total = int(prefix[-1])
    cuts = [0]
    for r in range(1, world):
        target = total * r / world
        j = int(torch.argmin((prefix.double() - target).abs()))
        j = max(j, cuts[-1] + 1)  # every block non-empty
        j = min(j, M - (world - r))  # leave one node for each later rank
        cuts.append(j)
    cuts.append(M)
    return [(cuts[i], cuts[i + 1]) for i in range(world)]


def choose_cut(hierarchy: Hierarchy, world: int, tolerance: float = 1.25) -> int:
    """The cut layer for ``world`` ranks (module docstring)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    ideal = hierarchy.num_devices / world
    for c in range(hierarchy.num_layers - 1, -1, -1):
        blocks = _blocks(hierarchy.device_counts[c], world)
        if blocks is None:
            continue
        largest = max(int(hierarchy.device_counts[c][a:b].sum()) for a, b in blocks)
        if largest <= tolerance * ideal or c == 0:
            return c
    raise ValueError(f"cannot place {hierarchy.num_devices} devices on {world} ranks: fewer devices than ranks")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world``: the global rows it holds at every layer (module docstring)."""

    hierarchy: Hierarchy
    world: int
    rank: int
    cut: int
    exchange: str = "gather"
    _rows: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        h = self.hierarchy
        blocks = _blocks(h.device_counts[self.cut], self.world)
        assert blocks is not None
        object.__setattr__(self, "_blocks_cache", blocks)
        start, stop = blocks[self.rank]
        rows = []
        for m in range(h.num_layers + 1):
            if m > self.cut:
                rows.append(torch.arange(h.nodes_per_layer[m]))
            else:
                anc = h.ancestor_index(m, self.cut)
                rows.append(torch.nonzero((anc >= start) & (anc < stop)).flatten())
        object.__setattr__(self, "_rows", rows)

    @classmethod
    def build(cls, hierarchy: Hierarchy, world: int, rank: int, cut: int | None = None, exchange: str = "gather"
              ) -> "Shard":
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be 'gather' (bit-identical) or 'all_reduce' (faster, equal to float "
                             f"tolerance), got {exchange!r}")
        c = choose_cut(hierarchy, world) if cut is None else int(cut)
        if not 0 <= c < hierarchy.num_layers:
            raise ValueError(f"cut_layer must be in [0, {hierarchy.num_layers - 1}] (a layer below the cloud), got "
                             f"{cut!r}")
        if hierarchy.nodes_per_layer[c] < world:
            raise ValueError(f"cut layer {c} has {hierarchy.nodes_per_layer[c]} nodes, fewer than the {world} ranks: "
                             f"choose a lower cut_layer")
        return cls(hierarchy, world, rank, c, exchange)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """Per rank, the block [start, stop) of cut-layer nodes it owns."""
        return self._blocks_cache  # type: ignore[attr-defined]

    def rows(self, m: int) -> Tensor:
        """int64: the global rows of layer m this rank holds (sorted)."""
        return self._rows[m]

    def rows_of(self, rank: int, m: int) -> Tensor:
        """The global rows of layer m that rank ``rank`` holds."""
        return Shard(self.hierarchy, self.world, rank, self.cut, self.exchange).rows(m)

    def sharded(self, m: int) -> bool:
        """Whether layer m is split over the ranks (at or below the cut) rather than replicated."""
        return m <= self.cut

    @property
    def num_local_devices(self) -> int:
        return int(self.rows(0).numel())

    def local_index(self, m: int) -> Tensor:
        """int64 [nodes of layer m]: the local row of every global row of layer m (-1 where not held)."""
        out = torch.full((self.hierarchy.nodes_per_layer[m],), -1, dtype=torch.long)
        rows = self.rows(m)
        out[rows] = torch.arange(rows.numel())
        return out

    def memory_fraction(self) -> float:
        """The share of all stacked rows this rank holds (about 1 / W for a balanced cut)."""
        h = self.hierarchy
        mine = sum(int(self.rows(m).numel()) for m in range(h.num_layers + 1))
        return mine / sum(h.nodes_per_layer)

    def exchange_bytes(self, width: int, elem_bytes: int = 4) -> int:
        """Payload bytes this rank contributes to one exchange at the cut of rows ``width`` entries wide: with
        "gather", one weighted upload per cut-layer node of the largest block (every rank pads to it; nodes that do
        not upload send zero rows); with "all_reduce", one partial sum per node of layer cut + 1."""
        if self.exchange == "gather":
            rows = max(b - a for a, b in self.blocks)
        else:
            rows = self.hierarchy.nodes_per_layer[self.cut + 1]
        return rows * int(width) * int(elem_bytes)

    def exchange_bytes_per_round(self, taus: "list[int] | tuple[int, ...]", num_params: int,
                                 num_buffer_elems: int = 0, elem_bytes: int = 4) -> int:
        """Payload bytes per global round this rank contributes at the cut: :meth:`exchange_bytes` of the
        parameters (and of the float buffers, when the model has any) at every aggregation into layer cut + 1
        (:func:`~lightning_qmlhfl.hierarchy.aggregations_per_round`). The small control messages (row counts, the
        non-finite flags) come on top."""
        per_event = self.exchange_bytes(num_params, elem_bytes)
        if num_buffer_elems:
            per_event += self.exchange_bytes(num_buffer_elems, elem_bytes)
        return aggregations_per_round(taus, self.cut + 1) * per_event

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}/{self.world}, cut_layer={self.cut}, exchange={self.exchange!r})"

