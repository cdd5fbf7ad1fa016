"""QSGD with s levels (Alistarh et al., 2017), the quantizer the paper's analysis matches (ALGORITHM.md section 4).

For a vector x (a row, or a bucket of ``bucket_size`` consecutive entries) with ||x||_2 > 0:

    Q(x)_j = ||x|| * sign(x_j) * xi_j / s,   l = floor(s |x_j| / ||x||),
    xi_j = l + 1 with probability s |x_j| / ||x|| - l, else l.

Unbiased, E[Q(x)] = x, with E||Q(x) - x||^2 <= min(b / s^2, sqrt(b) / s) ||x||^2 (b = bucket length; Theorem 3.2
of the QSGD paper), and Q(0) = 0 exactly. Arithmetic is fp32 whatever the input dtype; norms are accumulated in
fp64 so tiny and huge inputs neither underflow nor overflow.

Bits per upload (the paper's naive encoding, **ours**): 32 per norm + d * (1 + ceil(log2(s + 1))): one sign bit and
the level of every entry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Compressor, Encoded, _as_rows, check_positive_int, expand_buckets, num_buckets, row_norms

__all__ = ["QSGD", "quantize_levels"]


class QSGD(Compressor):
    """QSGD with ``levels`` = s quantization levels per sign, optionally per bucket of ``bucket_size`` entries."""

    config_name = "qsgd"
    config_options = ("levels", "bucket_size", "error_feedback")

    unbiased = True
    uses_uniforms = True
    norm = "l2"

    def __init__(self, levels: int, bucket_size: int | None = None, error_feedback: str | None = None) -> None:
        super().__init__(error_feedback)
        self.levels = check_positive_int(levels, "QSGD levels")
        self.bucket_size = check_positive_int(bucket_size, "QSGD bucket_size", allow_none=True)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int16 if self.levels < 2**15 else torch.int32

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        """Level * (norm / s) per entry, in place on x, the operations of the fused kernels in their order."""
        s = float(self.levels)
        nfull = self.expand_norms(norms, x.shape[1]).to(x.dtype)
        safe = torch.where(nfull > 0, nfull, torch.ones_like(nfull))
        t = x.abs()
        t.div_(safe).clamp_(max=1.0).mul_(s)  # r = |x| / ||x|| <= 1, scaled = r * s
        level = torch.floor(t)
        t.sub_(level)  # fractional part
        level.add_(uniforms.to(x.dtype) < t)  # stochastic rounding up with probability frac; <= s because r <= 1
        # A zero norm means every entry of its row/bucket is 0, so level is already 0 there (Q(0) = 0 exactly).
        level.copysign_(x)  # sign(x) * xi (a zero level stays zero, whatever its sign bit)
        return level.mul_(nfull / s)

    def encode(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Encoded:
        """The norms and integer level codes that travel on the wire."""
        x = _as_rows(x)
        rows, d = x.shape
        if uniforms is None:
            uniforms = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        elif uniforms.shape != x.shape:
            raise ValueError(f"uniforms must have the shape of x {tuple(x.shape)}, got {tuple(uniforms.shape)}")
        norms = row_norms(x, self.bucket_size)  # [rows, nb]
        levels = quantize_levels(x.to(torch.float32), self.expand_norms(norms, d), uniforms.to(torch.float32),
                                 float(self.levels))
        return Encoded(norms=norms, levels=levels.to(self.code_dtype))

    def decode(self, enc: Encoded, d: int) -> Tensor:
        """The dequantized float32 [rows, d] tensor the receiver reconstructs from ``enc``."""
        assert enc.levels is not None
        return enc.levels.to(torch.float32) * (self.expand_norms(enc.norms, d) / float(self.levels))

    def expand_norms(self, norms: Tensor, d: int) -> Tensor:
        """The norm that scales each entry: [rows, 1] as is (broadcasts), [rows, buckets] repeated to [rows, d]."""
        return expand_buckets(norms, d, self.bucket_size)

    def error_bound(self, d: int) -> float:
        d = int(d)
        if d <= 0:
            return 0.0
        b = d if self.bucket_size is None else min(self.bucket_size, d)
        s = self.levels
        return min(b / s**2, math.sqrt(b) / s)

    def bits(self, d: int) -> int:
        d = int(d)
        return 32 * num_buckets(d, self.bucket_size) + d * (1 + math.ceil(math.log2(self.levels + 1)))

    def _options(self) -> list[str]:
        return [str(self.levels)] + ([f"bucket_size={self.bucket_size}"] if self.bucket_size is not None else [])


def quantize_levels(x: Tensor, norms: Tensor, uniforms: Tensor, s: float) -> Tensor:
    """Signed QSGD levels sign(x_j) * xi_j in [-s, s] as float32 (exact small integers).

    ``x`` float32 [rows, d]; ``norms`` float32 broadcastable to x (the norm that scales each entry);
    ``uniforms`` U[0,1) of x's shape. Entries whose norm is 0 get level 0 (so Q(0) = 0 exactly).
    This is the per-element reference the Triton kernel reproduces.
    """
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    r = (x.abs() / safe).clamp_(max=1.0)  # |x_j| <= ||x||; clamp only guards fp rounding above 1
    scaled = r * s
    low = torch.floor(scaled)
    xi = low + (uniforms < (scaled - low)).to(torch.float32)
    xi = torch.clamp_(xi, max=s)
    xi = torch.where(norms > 0, xi, torch.zeros_like(xi))
    return torch.sign(x) * xi
