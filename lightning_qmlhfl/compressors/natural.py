"""Natural compression (Horváth et al., 2019, "Natural Compression for Distributed Deep Learning"): every entry is
rounded stochastically to one of the two powers of two around it, without bias:

    for 2^a <= |x| < 2^(a+1):  C(x) = sign(x) 2^(a+1) with probability |x| / 2^a - 1, else sign(x) 2^a;  C(0) = 0.

Unbiased, E||C(x) - x||^2 <= ||x||^2 / 8 (the paper's Theorem 1). Bits: 9 per entry (the sign and the 8-bit
exponent of a float32; the mantissa is not sent).

Computed in fp32 (fp64 input is rounded to fp32 first), on the bits, so that every backend gives the same
numbers: for a normal |x| the lower power is |x| with its mantissa cleared and the probability is the mantissa
m / 2^23 (exact); subnormal inputs are scaled by 2^64 first and their result by 2^-64 (both exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor

__all__ = ["NaturalCompression"]

_EXP_MASK = 0x7F800000
_MANT_MASK = 0x007FFFFF
_MIN_NORMAL = 0x00800000
_UP, _DOWN = 2.0**64, 2.0**-64


class NaturalCompression(Compressor):
    """Stochastic rounding of every entry to a power of two (see the module docstring)."""

    config_name = "natural"

    unbiased = True
    uses_uniforms = True

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        xf = x.to(torch.float32)
        a = xf.abs()
        sub = a.view(torch.int32) < _MIN_NORMAL
        a = torch.where(sub, a * _UP, a)
        bits = a.view(torch.int32)
        lower = (bits & _EXP_MASK).view(torch.float32)
        prob = (bits & _MANT_MASK).to(torch.float32) * 2.0**-23
        q = torch.where(uniforms.to(torch.float32) < prob, lower * 2.0, lower)
        q = torch.where(sub, q * _DOWN, q).copysign(xf)
        return q.to(x.dtype)

    def error_bound(self, d: int) -> float:
        return 1.0 / 8.0

    def bits(self, d: int) -> int:
        return 9 * int(d)
