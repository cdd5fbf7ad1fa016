"""Scaled sign (Karimireddy et al., 2019, "Error Feedback Fixes SignSGD"): C(x) = (||x||_1 / d) sign(x), per row or
per bucket (d = the bucket's length), with sign(0) := +1 so that one bit per entry encodes it exactly.

Biased. ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d exactly (for every x, zeros included, since sum_i sign(x_i) x_i =
||x||_1), which is at most (1 - 1/d) ||x||^2. Bits: d sign bits + 32 per bucket (the scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, bucket_lengths, check_positive_int, expand_buckets, num_buckets

__all__ = ["ScaledSign"]


class ScaledSign(Compressor):
    """(||x||_1 / d) sign(x) per row or per bucket of ``bucket_size`` entries (see the module docstring)."""

    config_name = "sign"
    config_options = ("bucket_size", "error_feedback")

    unbiased = False
    norm = "l1"

    def __init__(self, bucket_size: int | None = None, error_feedback: str | None = None) -> None:
        super().__init__(error_feedback)
        self.bucket_size = check_positive_int(bucket_size, "ScaledSign bucket_size", allow_none=True)

    def scales(self, norms: Tensor, d: int) -> Tensor:
        """||x_b||_1 / len(b) per row and bucket, fp32 [rows, buckets] (the numbers the fused kernels use)."""
        return norms / bucket_lengths(d, self.bucket_size, norms.device).to(norms.dtype)

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        d = x.shape[1]
        scale = expand_buckets(self.scales(norms, d), d, self.bucket_size).to(x.dtype)
        return torch.where(x >= 0, scale, -scale)

    def error_bound(self, d: int) -> float:
        b = int(d) if self.bucket_size is None else min(self.bucket_size, int(d))
        return 1.0 - 1.0 / b if b else 0.0

    def bits(self, d: int) -> int:
        return int(d) + 32 * num_buckets(int(d), self.bucket_size)

    def _options(self) -> list[str]:
        return [f"bucket_size={self.bucket_size}"] if self.bucket_size is not None else []
