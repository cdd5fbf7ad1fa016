"""Sparsifiers: top-k (biased; Aji & Heafield 2017, Stich et al. 2018) and random-k (unbiased; Wangni et al. 2018).

``k`` is given directly or as ``ratio`` of the row length d: k = ceil(ratio * d) (at least 1).

TopK keeps the k entries of largest magnitude of each row, the others become 0; ties at the k-th magnitude are
broken towards the lower index, so the choice is deterministic. ||C(x) - x||^2 = ||x||^2 - sum of the kept x_i^2
<= (1 - k/d) ||x||^2 (biased: a contraction, not Assumption 1). Bits: the kept values at 32 bits plus their
positions, as indices or as a d-bit mask, whichever is smaller: min(k (32 + ceil(log2 d)), d + 32 k).

RandomK keeps k entries chosen uniformly at random without replacement and scales them by d / k, so
E[C(x)] = x and E||C(x) - x||^2 = (d/k - 1) ||x||^2. The k entries are those with the k smallest of the row's
counter-based U[0, 1) draws (ties towards the lower index): a uniformly random k-subset that the receiver can
regenerate from the same public seed (run seed, round, layer, event, sender), so only the values travel:
32 k bits.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .base import Compressor, _log2_ceil

__all__ = ["TopK", "RandomK"]


def _check_k(ratio: object, k: object, name: str, allow_k: bool = True) -> tuple[float | None, int | None]:
    if (ratio is None) == (k is None):
        raise ValueError(f"{name}: give exactly one of ratio (0 < ratio <= 1) or k (an integer >= 1)"
                         if allow_k else f"{name} needs a ratio in (0, 1]")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < float(ratio) <= 1:
            raise ValueError(f"{name} ratio must be a number in (0, 1], got {ratio!r}")
        return float(ratio), None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{name} k must be an integer >= 1, got {k!r}")
    return None, int(k)


def _first_k_mask(key: Tensor, k: int, largest: bool) -> Tensor:
    """bool [rows, d]: per row the k entries with the largest (or smallest) ``key``, ties towards the lower index."""
    thr = torch.topk(key, k, dim=1, largest=largest, sorted=False).values
    thr = thr.amin(dim=1, keepdim=True) if largest else thr.amax(dim=1, keepdim=True)
    strict = key > thr if largest else key < thr
    need = k - strict.sum(dim=1, keepdim=True)
    tie = key == thr
    return strict | (tie & (torch.cumsum(tie, dim=1) <= need))


class _Sparsifier(Compressor):
    config_options = ("ratio", "k", "error_feedback")

    def __init__(self, ratio: float | None = None, k: int | None = None, error_feedback: str | None = None) -> None:
        super().__init__(error_feedback)
        self.ratio, self.k = _check_k(ratio, k, type(self).__name__)

    def k_for(self, d: int) -> int:
        """The number of entries kept of a d-entry row."""
        if self.k is not None:
            return self.k
        return max(1, min(int(d), math.ceil(self.ratio * int(d) - 1e-9)))

    def check_dims(self, d: int) -> None:
        if self.k is not None and self.k > d:
            raise ValueError(f"{self!r}: k = {self.k} is larger than the upload's d = {d} numbers (need 1 <= k <= d)")

    def _options(self) -> list[str]:
        return [f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"]


class TopK(_Sparsifier):
    """Keep the k largest-magnitude entries of each row (biased; see the module docstring)."""

    config_name = "topk"

    unbiased = False

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        k = self.k_for(x.shape[1])
        if k >= x.shape[1]:
            return x
        return x.mul_(_first_k_mask(x.abs(), k, largest=True))

    def error_bound(self, d: int) -> float:
        return 1.0 - self.k_for(d) / int(d) if d else 0.0

    def bits(self, d: int) -> int:
        d, k = int(d), self.k_for(d)
        return min(k * (32 + _log2_ceil(d)), d + 32 * k)


class RandomK(_Sparsifier):
    """Keep k uniformly random entries of each row, scaled by d / k (unbiased; see the module docstring)."""

    config_name = "randomk"

    unbiased = True
    uses_uniforms = True

    def __init__(self, ratio: float | None = None, k: int | None = None, error_feedback: str | None = None) -> None:
        super().__init__(ratio, k, error_feedback)

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        d = x.shape[1]
        k = self.k_for(d)
        if k >= d:
            return x
        keep = _first_k_mask(uniforms, k, largest=False)
        return x.mul_(torch.tensor(d / k, dtype=x.dtype, device=x.device)).mul_(keep)

    def error_bound(self, d: int) -> float:
        return int(d) / self.k_for(d) - 1.0 if d else 0.0

    def bits(self, d: int) -> int:
        return 32 * self.k_for(d)
