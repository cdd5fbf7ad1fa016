"""Coordinate-wise robust statistics over segments of stacked rows: the median and the trimmed mean of the rows of
every segment (the children of every parent node) at once, three backends behind one dispatch.

Inputs: ``x`` [k, P] floating point, ``segment`` integer [k] (the segment of each row, any order, values in
[0, S)), ``num_segments`` S. Output [S, P] in x's dtype; a segment with no row gives zeros. For segment s with
n rows and a column j, let v_0 <= ... <= v_{n-1} be the sorted values of that column over the rows of s:

- ``segment_median``: v_{n//2} for odd n, (v_{n/2-1} + v_{n/2}) * 0.5 for even n, the two middle values added
  in x's dtype (``numpy.median``'s rule: the mean of the two middle values).
- ``segment_trimmed_mean(beta)``: with g = floor(beta * n) (Python's ``int(beta * n)``, as
  ``scipy.stats.trim_mean(proportiontocut=beta)``), the mean of v_g .. v_{n-g-1}: their sum accumulated in fp64,
  divided by n - 2g in fp64, rounded once to x's dtype. Since beta < 0.5, n - 2g >= 1 for every n >= 1.

Backends, one semantics:

- ``"torch"`` (the reference): any device, any floating dtype. The rows are sorted by segment, scattered into a
  [S, K, columns] tile padded with NaN (K: the largest segment's size; NaN sorts last), sorted along K, and the
  order statistics taken by each segment's count; columns are processed in chunks so the tile stays small.
- ``"numba"`` (:mod:`.robust_numba`): CPU float32/float64; a parallel kernel over (segment, column block) that
  copies the block into a small buffer, sorts each column and reads the statistic.
- ``"triton"`` (:mod:`.robust_triton`): float32/float64 CUDA tensors (CPU tensors in Triton's interpreter when
  ``TRITON_INTERPRET=1`` was set before Triton was imported); one program per (segment, column block) sorts a
  [BLOCK, K] tile with ``tl.sort``; segments of at most :data:`TRITON_MAX_ROWS` rows.
- ``"auto"``: Triton for CUDA tensors, numba for CPU float32/float64 tensors (when numba is importable), the torch
  reference otherwise (and whenever the preferred backend cannot run the request). A forced backend that cannot
  run a request raises a ValueError saying why.

Agreement: the median is the same number in every backend (it selects input values and adds at most two of them
in x's dtype; +0.0 and -0.0 compare equal and may be swapped by a sort). The trimmed mean's fp64 sum is taken in
sorted order by the numba kernel, by torch's reduction order in the reference and by a tree reduction in Triton:
the results agree to fp64 rounding before the final cast (identical in practice for float32, a few ulps at most for
float64; exactly equal whenever the fp64 sums are exact, e.g. integer-valued data).

Inputs must be finite: where a column holds NaN, the backends may return different values.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch
from torch import Tensor

from .. import checks

__all__ = ["ROBUST_BACKENDS", "TRITON_MAX_ROWS", "check_segments", "segment_layout", "segment_median",
           "segment_trimmed_mean", "robust_backend_reason", "choose_robust_backend", "trim_counts"]

ROBUST_BACKENDS = ("auto", "torch", "numba", "triton")
TRITON_MAX_ROWS = 1024
"""The largest segment the Triton kernel sorts in one tile (rows per segment); larger ones use another backend."""
_TILE_ELEMENTS = 1 << 22  # elements of the torch reference's padded [S, K, columns] tile per column chunk


def _numba() -> ModuleType:
    """:mod:`.robust_numba`, imported on first use (:func:`lightning_qmlhfl.kernels.numba_module`)."""
    from . import numba_module

    return numba_module("robust_numba")


def check_segments(x: object, segment: object, num_segments: object, who: str) -> tuple[Tensor, Tensor, int]:
    """Validated inputs: ``x`` a 2-D floating tensor, ``segment`` an integer tensor of shape [k] with values in
    [0, num_segments) (returned as int64 on x's device), ``num_segments`` an int >= 0."""
    checks.instance(x, f"{who}: x", Tensor)
    checks.instance(segment, f"{who}: segment", Tensor)
    S = checks.integer(num_segments, f"{who}: num_segments", minimum=0)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{who}: x must be a 2-D floating point tensor [rows, P], got shape {tuple(x.shape)} "
                         f"dtype {x.dtype}")
    if segment.shape != (x.shape[0],) or segment.dtype == torch.bool or segment.is_floating_point() \
            or segment.is_complex():
        raise ValueError(f"{who}: segment must be an integer tensor of shape ({x.shape[0]},) (one segment id per "
                         f"row of x), got shape {tuple(segment.shape)} dtype {segment.dtype}")
    segment = segment.to(device=x.device, dtype=torch.int64)
    if segment.numel():
        lo, hi = (int(v) for v in torch.aminmax(segment))
        if lo < 0 or hi >= S:
            raise ValueError(f"{who}: segment holds {lo if lo < 0 else hi}, outside [0, {S}) for num_segments = {S}")
    return x, segment, S


def segment_layout(segment: Tensor, num_segments: int) -> tuple[Tensor, Tensor, Tensor]:
    """``order`` int64 [k] (rows sorted by segment, stable: each segment keeps its rows in index order),
    ``counts`` int64 [S] (rows per segment) and ``offsets`` int64 [S + 1] (segment s is
    ``order[offsets[s]:offsets[s + 1]]``)."""
    order = torch.argsort(segment, stable=True)
    counts = torch.bincount(segment, minlength=num_segments)[:num_segments]
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, counts, offsets


def trim_counts(counts: Tensor, beta: float) -> Tensor:
    """g = floor(beta * n) per segment (int64), the number of values cut at each end; the fp64 product is Python's
    ``beta * n``, so g is ``int(beta * n)`` as in ``scipy.stats.trim_mean``."""
    return torch.floor(counts.to(torch.float64) * beta).to(torch.int64)


def _triton_interpret() -> bool:
    mod = sys.modules.get("lightning_qmlhfl.kernels.robust_triton")
    if mod is not None:
        return bool(mod.INTERPRET)
    return os.environ.get("TRITON_INTERPRET") == "1"


def robust_backend_reason(backend: str, x: Tensor, max_count: int) -> str | None:
    """None when ``backend`` can run a median or trimmed mean of ``x`` with segments of at most ``max_count``
    rows, else why not (one phrase)."""
    if backend == "torch":
        return None
    if backend == "numba":
        if x.device.type != "cpu":
            return f"it runs on CPU tensors, x is on {x.device}"
        if x.dtype not in (torch.float32, torch.float64):
            return f"it handles float32 and float64, x is {x.dtype}"
        if importlib.util.find_spec("numba") is None:
            return "numba is not installed"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if x.dtype not in (torch.float32, torch.float64):
            return f"it handles float32 and float64, x is {x.dtype}"
        if x.device.type == "cpu" and not _triton_interpret():
            return "it needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton is imported, for CPU tensors)"
        if x.device.type not in ("cpu", "cuda"):
            return f"it needs CUDA tensors, x is on {x.device}"
        if max_count > TRITON_MAX_ROWS:
            return f"a segment has {max_count} rows, more than the {TRITON_MAX_ROWS} one tile sorts"
        return None
    checks.choice(backend, "backend", ROBUST_BACKENDS[1:])
    raise AssertionError(backend)


def choose_robust_backend(x: Tensor, max_count: int) -> str:
    """``backend="auto"``: Triton for CUDA tensors, numba for CPU tensors, each where it can run; else torch."""
    first = "triton" if x.device.type == "cuda" else "numba"
    return first if robust_backend_reason(first, x, max_count) is None else "torch"


def _torch_order_stats(x: Tensor, order: Tensor, counts: Tensor, offsets: Tensor, seg_sorted: Tensor, kind: str,
                       g: Tensor | None) -> Tensor:
    """The reference: order statistics from NaN-padded sorted tiles, column chunk by column chunk."""
    S, (k, P) = counts.numel(), x.shape
    out = x.new_zeros(S, P)
    kmax = int(counts.max()) if S else 0
    if k == 0 or P == 0 or kmax == 0:
        return out
    rank = torch.arange(k, device=x.device) - offsets[seg_sorted]
    xs = x[order]
    chunk = max(1, _TILE_ELEMENTS // max(1, S * kmax))
    nonempty = (counts > 0).view(S, 1)
    if kind == "median":
        lo = ((counts - 1) // 2).clamp(min=0).view(S, 1, 1)
        hi = (counts // 2).clamp(max=kmax - 1).view(S, 1, 1)
        odd = (lo == hi).view(S, 1)
    else:
        pos = torch.arange(kmax, device=x.device).view(1, kmax, 1)
        keep = (pos >= g.view(S, 1, 1)) & (pos < (counts - g).view(S, 1, 1))
        kept = (counts - 2 * g).clamp(min=1).to(torch.float64).view(S, 1)
    for c0 in range(0, P, chunk):
        c1 = min(P, c0 + chunk)
        tile = x.new_full((S, kmax, c1 - c0), float("nan"))
        tile[seg_sorted, rank] = xs[:, c0:c1]
        v = tile.sort(dim=1).values
        if kind == "median":
            a = v.gather(1, lo.expand(S, 1, c1 - c0)).squeeze(1)
            b = v.gather(1, hi.expand(S, 1, c1 - c0)).squeeze(1)
            res = torch.where(odd, a, (a + b) * 0.5)
        else:
            total = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum(
                dim=1, dtype=torch.float64)
            res = (total / kept).to(x.dtype)
        out[:, c0:c1] = torch.where(nonempty, res, torch.zeros((), dtype=x.dtype, device=x.device))
    return out


def _run(kind: str, x: object, segment: object, num_segments: object, backend: str, beta: float | None,
         who: str) -> Tensor:
    checks.choice(backend, f"{who}: backend", ROBUST_BACKENDS)
    x, segment, S = check_segments(x, segment, num_segments, who)
    x = x.detach()
    order, counts, offsets = segment_layout(segment, S)
    max_count = int(counts.max()) if S else 0
    name = choose_robust_backend(x, max_count) if backend == "auto" else backend
    reason = robust_backend_reason(name, x, max_count)
    if reason is not None:
        raise ValueError(f"{who}: backend {name!r} cannot run this request: {reason}; use backend='auto' (which "
                         f"falls back to the torch reference) or 'torch'")
    g = trim_counts(counts, beta) if kind == "trimmed" else None
    if x.shape[0] == 0 or x.shape[1] == 0 or S == 0:
        return x.new_zeros(S, x.shape[1])
    if name == "torch":
        return _torch_order_stats(x, order, counts, offsets, segment[order], kind, g)
    if name == "numba":
        return _numba().segment_order_stats(x, order, offsets, g)
    from .robust_triton import segment_order_stats_triton

    return segment_order_stats_triton(x, order, offsets, g)


@torch.no_grad()
def segment_median(x: Tensor, segment: Tensor, num_segments: int, backend: str = "auto") -> Tensor:
    """[S, P]: the coordinate-wise median of each segment's rows of ``x`` [k, P] (zeros for an empty segment);
    ``segment`` int64 [k] gives each row's segment. Module docstring: the even-count rule and the backends."""
    return _run("median", x, segment, num_segments, backend, None, "segment_median")


@torch.no_grad()
def segment_trimmed_mean(x: Tensor, segment: Tensor, num_segments: int, beta: float,
                         backend: str = "auto") -> Tensor:
    """[S, P]: the coordinate-wise trimmed mean of each segment's rows, int(beta * n) values cut at each end
    (``beta`` in [0, 0.5)); zeros for an empty segment. Module docstring: the summation and the backends."""
    beta = checks.real(beta, "segment_trimmed_mean: beta", 0.0, 0.5, high_open=True)
    return _run("trimmed", x, segment, num_segments, backend, beta, "segment_trimmed_mean")
