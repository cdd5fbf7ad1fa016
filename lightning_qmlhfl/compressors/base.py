"""The compressor interface C_n of a layer's uplinks, the wire format of QSGD-like messages, and the one function
that counts the bits of an upload.

A compressor acts on a stacked tensor ``x`` of shape [rows, d]: every row is one sender's upload (a model
difference, Eq. 4) and is compressed independently, per row or per bucket of ``bucket_size`` consecutive entries.
Randomness is explicit: compressors that draw (``uses_uniforms``) take ``uniforms``, a float tensor of U[0, 1)
draws of x's shape (the engine passes the counter-based Philox draws of :mod:`lightning_qmlhfl.kernels`).

Error feedback (``error_feedback=``) is a property of the layer's compressor; the engine keeps its memory, one row
per sender, stacked like the models (see :mod:`lightning_qmlhfl.simulation.engine`):

- ``"ef"`` (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019): send C(Δ + e), keep
  e <- Δ + e - C(Δ + e);
- ``"ef21"`` (Richtárik et al. 2021): the sender keeps g, sends c = C(Δ - g) and sets g <- g + c; the receiver,
  which holds the same g, adds g (its copy updated by what was sent) to the aggregate.
"""

from __future__ import annotations

import enum
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Compressor", "Encoded", "ERROR_FEEDBACK", "check_error_feedback", "row_norms", "row_l1_norms",
           "bucket_lengths", "expand_buckets", "upload_bits", "num_buckets"]

ERROR_FEEDBACK = (None, "ef", "ef21")


def check_error_feedback(value: object) -> str | None:
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if value not in ERROR_FEEDBACK:
        raise ValueError(f"error_feedback must be None, 'ef' or 'ef21', got {value!r}")
    return value  # type: ignore[return-value]


@dataclass
class Encoded:
    """What travels on the wire for a stack of QSGD-like uploads.

    norms: float32 [rows, buckets] (buckets == 1 without bucketing).
    levels: signed integer codes sign(x_j) * xi_j, int16/int32 [rows, d]; ``None`` for an unquantized upload
        (then ``values`` holds the raw fp32 numbers).
    """

    norms: Tensor
    levels: Tensor | None
    values: Tensor | None = None


def num_buckets(d: int, bucket_size: int | None) -> int:
    return 1 if bucket_size is None or bucket_size >= d else -(-int(d) // int(bucket_size))


def _bucketed(x: Tensor, bucket_size: int) -> Tensor:
    rows, d = x.shape
    nb = -(-d // bucket_size)
    pad = nb * bucket_size - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, nb, bucket_size)


def row_norms(x: Tensor, bucket_size: int | None = None) -> Tensor:
    """L2 norms of each row (or each bucket of each row) of ``x`` [rows, d], as float32 [rows, buckets].

    Accumulated in float64 so that 1e-30-sized or 1e30-sized entries give finite, non-zero norms.
    """
    rows, d = x.shape
    if bucket_size is None or bucket_size >= d:
        n = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).unsqueeze(1)
    else:
        n = torch.linalg.vector_norm(_bucketed(x, bucket_size), dim=2, dtype=torch.float64)
    return n.to(torch.float32)


def row_l1_norms(x: Tensor, bucket_size: int | None = None) -> Tensor:
    """L1 norms of each row (or bucket) of ``x`` [rows, d], accumulated in float64, as float32 [rows, buckets]."""
    rows, d = x.shape
    if bucket_size is None or bucket_size >= d:
        n = x.abs().sum(dim=1, dtype=torch.float64).unsqueeze(1)
    else:
        n = _bucketed(x, bucket_size).abs().sum(dim=2, dtype=torch.float64)
    return n.to(torch.float32)


def bucket_lengths(d: int, bucket_size: int | None, device: Any = None) -> Tensor:
    """float32 [buckets]: the number of entries of each bucket of a d-entry row (the last one may be shorter)."""
    if bucket_size is None or bucket_size >= d:
        return torch.tensor([float(d)], device=device)
    nb = -(-d // bucket_size)
    lengths = torch.full((nb,), float(bucket_size), device=device)
    lengths[-1] = d - (nb - 1) * bucket_size
    return lengths


def expand_buckets(values: Tensor, d: int, bucket_size: int | None) -> Tensor:
    """Per-bucket values [rows, buckets] as per-entry [rows, d] ([rows, 1] is returned as is: it broadcasts)."""
    if values.shape[1] == 1:
        return values
    return values.repeat_interleave(int(bucket_size), dim=1)[:, :d]


def _as_rows(x: Tensor) -> Tensor:
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"compressors take a stacked tensor [rows, d]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compressors take floating-point tensors, got dtype {x.dtype}")
    return x


def check_positive_int(value: object, what: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be {'None or ' if allow_none else ''}an integer >= 1, got {value!r}")
    return int(value)


class Kind(enum.IntEnum):
    """The compressor rules the fused kernels implement (their ``KIND`` code)."""

    IDENTITY = 0
    QSGD = 1
    SIGN = 2
    NATURAL = 3


EF_CODES = {None: 0, "ef": 1, "ef21": 2}
"""The fused kernels' code of each error-feedback mode."""


@dataclass(frozen=True)
class FusedSpec:
    """What a fused kernel needs to know of a compressor (the contract between the compressors and the kernel
    backends, :mod:`lightning_qmlhfl.kernels`): the rule (``kind``), QSGD's levels s (``levels``; 1 for the
    others), the bucket length (``bucket``: None for one norm per row), the error-feedback mode (``error_feedback``:
    0 none, 1 "ef", 2 "ef21"), the statistic of the first pass (``norm``: "l2" or "l1") and whether it draws one
    uniform per entry (``draws``)."""

    kind: Kind
    levels: float
    bucket: int | None
    error_feedback: int
    norm: str
    draws: bool


def fused_compressor_names() -> list[str]:
    """The names of the compressor classes with a fused kernel rule, in the order of their :class:`Kind` (for
    messages)."""
    found: dict[Kind, str] = {}
    stack = list(Compressor.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        kind = cls.__dict__.get("fused_kind")
        if kind is not None and kind not in found:
            found[kind] = cls.__name__
    return [found[k] for k in sorted(found)]


class Compressor(ABC):
    """Interface of a layer's uplink compressor C_n (shapes in the module docstring).

    Class attributes: ``unbiased`` (E[C(x)] = x, the paper's Assumption 1), ``uses_uniforms`` (draws one U[0, 1)
    number per entry), ``norm`` ("l2" or "l1": the per-row (or per-bucket) statistic the fused kernels compute in
    their first pass; for compressors that need none it is the L2 norm, used to catch NaN/Inf uploads).
    """

    unbiased: ClassVar[bool] = True
    uses_uniforms: ClassVar[bool] = False
    norm: ClassVar[str] = "l2"
    config_name: ClassVar[str]  # the name :func:`~lightning_qmlhfl.compressors.make_compressor` takes
    config_options: ClassVar[tuple[str, ...]] = ("error_feedback",)  # its constructor's options
    levels: int | None = None  # QSGD's s (None for the others)
    bucket_size: int | None = None

    def __init__(self, error_feedback: str | None = None) -> None:
        self.error_feedback = check_error_feedback(error_feedback)

    # ------------------------------------------------------------------ what it computes
    def norms(self, x: Tensor) -> Tensor:
        """float32 [rows, buckets]: the per-row (or per-bucket) statistic of x this compressor scales by (L2 or L1,
        accumulated in fp64)."""
        return (row_l1_norms if self.norm == "l1" else row_norms)(x, self.bucket_size)

    @abstractmethod
    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        """C(x) for the rows of ``x`` (float32 or float64 [rows, d]; may be overwritten) given ``norms`` =
        :meth:`norms` of x and the draws; returns a tensor of x's dtype and shape."""

    def __call__(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """C(x): float32 (float64 for float64 input) [rows, d]."""
        x = _as_rows(x)
        work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self.uses_uniforms:
            if uniforms is None:
                uniforms = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            elif uniforms.shape != x.shape:
                raise ValueError(f"uniforms must have the shape of x {tuple(x.shape)}, got {tuple(uniforms.shape)}")
        self.check_dims(x.shape[1])
        return self.compress_(work.clone(), self.norms(work), uniforms)

    # ------------------------------------------------------------------ what it costs and guarantees
    @abstractmethod
    def bits(self, d: int) -> int:
        """Bits on the wire for one upload of d numbers (the formula is in each class's docstring)."""

    @abstractmethod
    def error_bound(self, d: int) -> float:
        """omega such that E||C(x) - x||^2 <= omega ||x||^2 for every d-dimensional x (expectation over the draws):
        the variance bound q of an unbiased compressor, the contraction 1 - delta of a biased one."""

    def variance_bound(self, d: int) -> float:
        """q of Assumption 1 (E||C(x) - x||^2 <= q ||x||^2 for an unbiased C): :meth:`error_bound`. The paper's
        theory covers unbiased compressors without error feedback only (see ``covered_by_theory``)."""
        return self.error_bound(d)

    @property
    def covered_by_theory(self) -> bool:
        """Whether the paper's analysis (Assumption 1: unbiased, variance-bounded) applies to this layer."""
        return self.unbiased and self.error_feedback is None

    def check_dims(self, d: int) -> None:
        """Raise ValueError if this compressor cannot act on d-entry rows (e.g. top-k with k > d)."""

    @staticmethod
    def baseline_bits(d: int) -> int:
        """Bits of the same upload sent as 32-bit floats."""
        return 32 * int(d)

    @property
    def is_identity(self) -> bool:
        return False

    fused_kind: ClassVar[Kind | None] = None  # the fused kernels' rule for this compressor, None: not fused

    def fused_spec(self) -> FusedSpec | None:
        """The :class:`FusedSpec` of this compressor, or None when no fused kernel implements it (top-k, random-k:
        the torch reference runs them)."""
        if self.fused_kind is None:
            return None
        return FusedSpec(kind=self.fused_kind, levels=float(self.levels) if self.levels is not None else 1.0,
                         bucket=self.bucket_size, error_feedback=EF_CODES[self.error_feedback], norm=self.norm,
                         draws=self.uses_uniforms)

    # ------------------------------------------------------------------ identity of the configuration
    def to_config(self) -> dict[str, Any]:
        """Plain data that :func:`~lightning_qmlhfl.compressors.make_compressor` rebuilds this compressor from:
        ``{"name": ..., <every option>: value}`` (what checkpoints store)."""
        return {"name": self.config_name, **{k: getattr(self, k) for k in self.config_options}}

    def _options(self) -> list[str]:
        """The constructor arguments that differ from their defaults, as ``repr`` shows them."""
        return []

    def __repr__(self) -> str:
        opts = self._options()
        if self.error_feedback is not None:
            opts.append(f"error_feedback={self.error_feedback!r}")
        return f"{type(self).__name__}({', '.join(opts)})"

    def legacy_repr(self) -> str:
        """The repr that checkpoints of format 1 stored for this compressor (to compare with them)."""
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


def upload_bits(compressor: Compressor, num_params: int, num_buffer_elems: int = 0, local_solver: Any = None) -> int:
    """Bits of one upload: the compressed parameter difference (``compressor.bits(num_params)``) plus the float
    buffers (BatchNorm statistics), which always travel as 32-bit floats, plus what the layer's local solver sends
    beside them (SCAFFOLD's variate deltas: compressed alike, or 32-bit floats;
    :meth:`~lightning_qmlhfl.optimizers.local_solvers.LocalSolver.upload_values_factor`). The one function the
    engine, the latency model, the planner and the recipes count uploads with."""
    if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or num_params < 0:
        raise ValueError(f"num_params must be an integer >= 0, got {num_params!r}")
    if isinstance(num_buffer_elems, bool) or not isinstance(num_buffer_elems, numbers.Integral) or num_buffer_elems < 0:
        raise ValueError(f"num_buffer_elems must be an integer >= 0, got {num_buffer_elems!r}")
    bits = int(compressor.bits(int(num_params))) + 32 * int(num_buffer_elems)
    if local_solver is not None:
        bits += local_solver.upload_values_factor(True) * int(compressor.bits(int(num_params)))
        bits += local_solver.upload_values_factor(False) * 32 * int(num_params)
    return bits


def _log2_ceil(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0
