"""Stochastic quantizers Q_n for the uplinks (ALGORITHM.md section 4).

A quantizer acts on a stacked tensor ``x`` of shape [rows, d]: every row is one node's upload (a model
difference) and is quantized independently, with one L2 norm per row, or per bucket of ``bucket_size``
consecutive entries in bucketed mode.

QSGD with s levels (the scheme the paper's analysis matches; the exact definition is this project's choice):
    Q(x)_j = ||x|| * sign(x_j) * xi_j / s,   l = floor(s |x_j| / ||x||),
    xi_j = l + 1 with probability s |x_j| / ||x|| - l, else l.
It is unbiased, E[Q(x)] = x, with E||Q(x) - x||^2 <= min(d / s^2, sqrt(d) / s) ||x||^2, and Q(0) = 0 exactly.

Randomness is explicit: pass ``uniforms`` (a float tensor of U[0, 1) draws of the same shape as ``x``) or a
``torch.Generator``. Arithmetic is fp32 whatever the input dtype; norms are accumulated in fp64 so tiny and
huge inputs neither underflow nor overflow.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Quantizer", "QSGD", "NoQuantization", "Encoded", "make_quantizer", "layer_quantizers", "row_norms"]


@dataclass
class Encoded:
    """What travels on the wire for a stack of uploads.

    norms: float32 [rows, buckets] (buckets == 1 without bucketing).
    levels: signed integer codes sign(x_j) * xi_j, int16/int32 [rows, d]; ``None`` for an unquantized upload
        (then ``values`` holds the raw fp32 numbers).
    """

    norms: Tensor
    levels: Tensor | None
    values: Tensor | None = None


def row_norms(x: Tensor, bucket_size: int | None = None) -> Tensor:
    """L2 norms of each row (or each bucket of each row) of ``x`` [rows, d], as float32 [rows, buckets].

    Accumulated in float64 so that 1e-30-sized or 1e30-sized entries give finite, non-zero norms.
    """
    rows, d = x.shape
    if bucket_size is None or bucket_size >= d:
        n = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).unsqueeze(1)
    else:
        xb = _bucketed(x, bucket_size)
        n = torch.linalg.vector_norm(xb, dim=2, dtype=torch.float64)
    return n.to(torch.float32)


def _bucketed(x: Tensor, bucket_size: int) -> Tensor:
    rows, d = x.shape
    nb = -(-d // bucket_size)
    pad = nb * bucket_size - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, nb, bucket_size)


class Quantizer(ABC):
    """Interface of a layer's uplink quantizer; see the module docstring for shapes."""

    levels: int | None = None
    bucket_size: int | None = None

    @abstractmethod
    def encode(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Encoded:
        """Quantize ``x`` [rows, d]; returns the norms and integer codes that would be sent."""

    @abstractmethod
    def decode(self, enc: Encoded, d: int) -> Tensor:
        """The dequantized float32 [rows, d] tensor the receiver reconstructs from ``enc``."""

    def __call__(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Q(x): float32 [rows, d]."""
        x = _as_rows(x)
        return self.decode(self.encode(x, uniforms=uniforms, generator=generator), x.shape[1])

    @abstractmethod
    def variance_bound(self, d: int) -> float:
        """q such that E||Q(x) - x||^2 <= q ||x||^2 for a d-dimensional x."""

    @abstractmethod
    def bits(self, d: int) -> int:
        """Bits on the wire for one upload of d numbers (naive encoding of ALGORITHM.md section 4)."""

    @staticmethod
    def baseline_bits(d: int) -> int:
        """Bits of the same upload sent as 32-bit floats."""
        return 32 * int(d)

    @property
    def is_identity(self) -> bool:
        return False


def _as_rows(x: Tensor) -> Tensor:
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"quantizers take a stacked tensor [rows, d]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantizers take floating-point tensors, got dtype {x.dtype}")
    return x


class NoQuantization(Quantizer):
    """s_n = none: the upload is sent as 32-bit floats; Q(x) = x."""

    def encode(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Encoded:
        x = _as_rows(x)
        return Encoded(norms=row_norms(x), levels=None, values=x.to(torch.float32))

    def decode(self, enc: Encoded, d: int) -> Tensor:
        assert enc.values is not None
        return enc.values

    def variance_bound(self, d: int) -> float:
        return 0.0

    def bits(self, d: int) -> int:
        return 32 * int(d)

    @property
    def is_identity(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "NoQuantization()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoQuantization)

    def __hash__(self) -> int:
        return hash("NoQuantization")


class QSGD(Quantizer):
    """QSGD with ``levels`` = s quantization levels per sign, optionally per bucket of ``bucket_size`` entries."""

    def __init__(self, levels: int, bucket_size: int | None = None) -> None:
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
            raise ValueError(f"QSGD levels must be an integer >= 1, got {levels!r}")
        if bucket_size is not None and (
            isinstance(bucket_size, bool) or not isinstance(bucket_size, numbers.Integral) or bucket_size < 1
        ):
            raise ValueError(f"QSGD bucket_size must be None or an integer >= 1, got {bucket_size!r}")
        self.levels = int(levels)
        self.bucket_size = None if bucket_size is None else int(bucket_size)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int16 if self.levels < 2**15 else torch.int32

    def encode(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Encoded:
        x = _as_rows(x)
        rows, d = x.shape
        s = float(self.levels)
        if uniforms is None:
            uniforms = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        elif uniforms.shape != x.shape:
            raise ValueError(f"uniforms must have the shape of x {tuple(x.shape)}, got {tuple(uniforms.shape)}")
        norms = row_norms(x, self.bucket_size)  # [rows, nb]
        xf = x.to(torch.float32)
        levels = quantize_levels(xf, self.expand_norms(norms, d), uniforms.to(torch.float32), s)
        return Encoded(norms=norms, levels=levels.to(self.code_dtype))

    def decode(self, enc: Encoded, d: int) -> Tensor:
        assert enc.levels is not None
        return enc.levels.to(torch.float32) * (self.expand_norms(enc.norms, d) / float(self.levels))

    def expand_norms(self, norms: Tensor, d: int) -> Tensor:
        """The norm that scales each entry: [rows, 1] as is (broadcasts), [rows, buckets] repeated to [rows, d]."""
        if norms.shape[1] == 1:
            return norms
        return norms.repeat_interleave(self.bucket_size, dim=1)[:, :d]

    def variance_bound(self, d: int) -> float:
        d = int(d)
        if d <= 0:
            return 0.0
        b = d if self.bucket_size is None else min(self.bucket_size, d)
        s = self.levels
        return min(b / s**2, math.sqrt(b) / s)

    def bits(self, d: int) -> int:
        d = int(d)
        nb = 1 if self.bucket_size is None else -(-d // self.bucket_size)
        return 32 * nb + d * (1 + math.ceil(math.log2(self.levels + 1)))

    def __repr__(self) -> str:
        b = "" if self.bucket_size is None else f", bucket_size={self.bucket_size}"
        return f"QSGD({self.levels}{b})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QSGD) and (other.levels, other.bucket_size) == (self.levels, self.bucket_size)

    def __hash__(self) -> int:
        return hash(("QSGD", self.levels, self.bucket_size))


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


def make_quantizer(spec: object) -> Quantizer:
    """Build a quantizer from a config value: an instance, ``None``/"none" (no quantization), an int s,
    or a dict ``{"levels": s, "bucket_size": b}``."""
    if isinstance(spec, Quantizer):
        return spec
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "null", "fp32")):
        return NoQuantization()
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return QSGD(int(spec))
    if isinstance(spec, dict) or hasattr(spec, "items"):
        d = dict(spec)
        levels = d.pop("levels", None)
        bucket = d.pop("bucket_size", None)
        if d:
            raise ValueError(f"unknown quantizer options {sorted(d)}; allowed: levels, bucket_size")
        q = make_quantizer(levels)
        return q if bucket is None or q.is_identity else QSGD(q.levels, bucket)
    raise ValueError(f"cannot build a quantizer from {spec!r}; use an int s >= 1, 'none', or a Quantizer")


def layer_quantizers(levels: object, bucket_size: object, num_layers: int) -> list[Quantizer]:
    """Q_1..Q_N from config values: ``levels`` and ``bucket_size`` are each one value for every layer or a list of
    N (``None``/"none" levels = 32-bit uploads; ``None`` bucket_size = one norm per upload)."""

    def per_layer(value: object, what: str) -> list:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            return [value] * num_layers
        value = list(value)
        if len(value) != num_layers:
            raise ValueError(
                f"{what} has {len(value)} entries {value} but the hierarchy has N = {num_layers} layers: "
                f"give one value per layer, or a single value"
            )
        return value

    pairs = zip(per_layer(levels, "quantizer.levels"), per_layer(bucket_size, "quantizer.bucket_size"))
    return [make_quantizer({"levels": s, "bucket_size": b}) for s, b in pairs]
