"""Counter-based seeds: every random draw of a run is keyed by global ids, never by a shared generator's position.

A seed is a 63-bit integer mixed from the run's seed and the ids of what draws (global round, layer, aggregation
event, node, ...). Draws made from such seeds do not depend on chunking, backend, executor, or which process holds
a row, and a resumed run redraws them exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mix", "row_seeds", "Stream", "generator"]

_MASK63 = (1 << 63) - 1
_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix(*values: int) -> int:
    """SplitMix64-style mixing of integers into one 63-bit seed (deterministic, platform-independent)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & _MASK63


class Stream:
    """Named purposes of the strategy's seeds, so two purposes never share a stream: ``mix(seed, Stream.X)``."""

    PARTITION = 1
    SAMPLER = 2
    AUGMENT = 3
    TORCH_RNG = 4
    PARTICIPATION = 5
    AVAILABILITY = 6
    DROPOUT = 7
    MOBILITY = 8
    DEVICE_RNG = 9
    SOLVER = 10  # the draws that compress a local solver's extra uploads (SCAFFOLD's variate deltas)
    PRIVACY = 11  # the Gaussian noise of differential privacy (and the noised counts of adaptive clipping)
    ATTACK = 12  # the draws of Byzantine senders' messages
    THEORY = 13  # the devices sampled to measure the constants of Theorem 1


def row_seeds(seed: int, round_idx: int, layer: int, event: int, num_rows: int) -> Tensor:
    """int64 [num_rows]: the seed of each child row's uniforms for one aggregation event of one layer.

    ``event`` numbers the aggregations of this layer within the global round (0-based).
    """
    base = mix(seed, round_idx, layer, event)
    return torch.tensor([mix(base, i) for i in range(num_rows)], dtype=torch.int64)


def generator(*values: int) -> torch.Generator:
    """A CPU torch generator seeded with ``mix(*values)``: for draws keyed by global ids (e.g. one layer's
    participation draw of one aggregation period)."""
    return torch.Generator().manual_seed(mix(*values))
