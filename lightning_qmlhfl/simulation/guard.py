"""The non-finite guard: an upload holding NaN or Inf stops the simulation before the poisoned update is applied
(docs/algorithm.md#nan-guard), with an error that names the layer, the sending node and the round, the same on
every rank of a multi-process run."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["NonFiniteUpdateError", "NonFiniteGuard"]


class NonFiniteUpdateError(FloatingPointError):
    """An upload held NaN or Inf. Carries ``layer`` (the receiving layer n), ``node`` (the sender's index in
    layer n-1), ``round`` (0-based global round) and ``step`` (1-based local step inside the round)."""

    def __init__(self, layer: int, node: int, round_idx: int, step: int, what: str = "parameters") -> None:
        self.layer, self.node, self.round, self.step = layer, node, round_idx, step
        super().__init__(
            f"non-finite (NaN/Inf) {what} upload from node {node} of layer {layer - 1} to layer {layer} in global "
            f"round {round_idx} (0-based), local step {step}: training stopped before the poisoned update was "
            f"applied. Lower the learning rate or check the loss for overflow."
        )


class NonFiniteGuard:
    """Checks the uploads of an aggregation (their norms, or their rows) and raises
    :class:`NonFiniteUpdateError` for the first bad sender, on every rank alike (``comm``: the collectives of a
    multi-process run, or None). ``rows``: every rank's global row ids of each layer; ``clock``: a callable giving
    (round, step) for the message."""

    def __init__(self, rows: list[Tensor], comm: Any, clock: Any) -> None:
        self.rows, self.comm, self.clock = rows, comm, clock

    def check_norms(self, n: int, norms: Tensor, uploads: Tensor | None, what: str = "parameters") -> None:
        """``norms`` [uploads, buckets] of the uploads into layer n (in the order of ``uploads``, the local sender
        rows; None: all)."""
        self.check_rows(n, ~torch.isfinite(norms).all(dim=1), uploads, what)

    def check_rows(self, n: int, bad: Tensor, uploads: Tensor | None, what: str = "parameters") -> None:
        """``bad`` (bool per upload) marks the non-finite uploads into layer n."""
        i = int(bad.nonzero()[0]) if bool(bad.any()) else -1
        local = i if uploads is None or i < 0 else int(uploads[i])
        node = -1 if local < 0 else int(self.rows[n - 1][local])
        if self.comm is not None:  # every rank learns the first bad node of any rank
            flag = torch.tensor([float(node >= 0), -float(node if node >= 0 else 2**52)], dtype=torch.float64)
            flag = self.comm.all_reduce_max(flag)
            node = int(-flag[1]) if flag[0] > 0 else -1
        if node >= 0:
            round_idx, step = self.clock()
            raise NonFiniteUpdateError(n, node, round_idx, step, what)
