"""Fused compress-and-aggregate for CPU tensors (numba), the CPU backend of :mod:`lightning_qmlhfl.kernels`.

Same semantics as the torch reference :func:`lightning_qmlhfl.kernels.reference.aggregate_layer_torch_` and the
Triton kernels, number for number, for Identity, QSGD, ScaledSign and NaturalCompression, each with or without
error feedback (EF / EF21), over all child rows or a subset (``rows``), adding into the parents or writing the
aggregate to ``out``:

- Draws: column j of child row c uses word (j mod 4) of Philox4x32-10 with key (seed mod 2^32, seed >> 32) and
  counter (j div 4, 0, 0, 0), converted to [0, 1) as Triton's ``tl.rand`` does. These are exactly the Triton
  kernels' draws, so a run gives the same numbers on CPU and GPU.
- Pass 1 (parallel over child rows): fp64 sums of squares (or of absolute values, for ScaledSign) of the fp32
  compressor inputs x = child - parent (+ EF memory / - EF21 estimate), per row or per bucket, then the fp32 norms.
  A non-finite norm stops here: the caller leaves parents and memory untouched.
- Pass 2 (parallel over parents x column blocks): for each parent, its children in index order, x, C(x), the
  memory update and the fp32 weight-accumulate of Eq. 4/6, then parent += acc, the same operations in the same
  order as the torch reference (no fused multiply-add: numba emits separate IEEE multiplies and adds unless
  fastmath is on).

Compared with the torch path (a dozen elementwise passes per ~1 MB chunk), each child row is read twice and every
draw is made in registers. The inner loops run over slices indexed from 0, one bucket at a time (the bucket's norm
and constants hoisted), so that LLVM vectorises them; ``bench/RESULTS.md`` has the measurements. Only float32
tensors are handled here (the engine's default); other dtypes and the other compressors (TopK, RandomK) use the
torch path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from ..compressors import Compressor
from .interface import AggregationRequest, KernelBackend
from ..hierarchy import check_layer_shapes, children_by_parent

__all__ = ["philox_uniforms", "aggregate_layer_numba_", "supports", "NumbaBackend"]

_M32 = np.uint64(0xFFFFFFFF)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_SHIFT = np.uint64(32)
_HALF = np.uint64(0x80000000)
_SCALE = np.float32(4.6566127342e-10)  # tl.rand's scale: the largest with (2^31 - 1) * scale < 1 in fp32
_BLOCK = 4096  # columns per pass-2 task (a multiple of 4: one Philox evaluation serves 4 columns)


@njit(inline="always", cache=True)
def _philox(counter, k0, k1):
    """Philox4x32-10 of counter (counter, 0, 0, 0) under key (k0, k1); 32-bit words held in uint64."""
    c0 = counter
    c1 = np.uint64(0)
    c2 = np.uint64(0)
    c3 = np.uint64(0)
    for _ in range(10):
        p0 = _ROUND_B * c2
        p1 = _ROUND_A * c0
        c0 = (p0 >> _SHIFT) ^ c1 ^ k0
        c2 = (p1 >> _SHIFT) ^ c3 ^ k1
        c1 = p0 & _M32
        c3 = p1 & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


@njit(inline="always", cache=True)
def _to_uniform(word):
    """tl.rand's conversion: the word as int32, negative ones mapped by ~x, times the scale, in fp32."""
    if word >= _HALF:
        word = _M32 - word  # ~x of the int32 reading, as an unsigned value
    return np.float32(np.int64(word)) * _SCALE


@njit(inline="always", cache=True)
def _key(seed):
    s = np.uint64(seed)
    return s & _M32, s >> _SHIFT


@njit(parallel=True, cache=True)
def _uniforms_kernel(seeds, out):
    rows, d = out.shape
    for r in prange(rows):
        k0, k1 = _key(seeds[r])
        for k in range((d + 3) // 4):
            w0, w1, w2, w3 = _philox(np.uint64(k), k0, k1)
            j = 4 * k
            out[r, j] = _to_uniform(w0)
            if j + 1 < d:
                out[r, j + 1] = _to_uniform(w1)
            if j + 2 < d:
                out[r, j + 2] = _to_uniform(w2)
            if j + 3 < d:
                out[r, j + 3] = _to_uniform(w3)


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """numba's parallel loops inside use as many threads as torch's intra-op pool (within numba's own maximum), and
    torch's thread count is the same afterwards. With numba's OpenMP threading layer both libraries set the one
    OpenMP runtime's thread count: numba's smaller count (``NUMBA_NUM_THREADS`` below torch's threads, e.g. inherited
    from a parent process) used to become torch's for the rest of the run, and changed its numbers."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def philox_uniforms(seeds: Tensor, d: int) -> Tensor:
    """float32 [len(seeds), d] on CPU: row i's U[0, 1) draws for seed ``seeds[i]`` (the Triton kernels' draws)."""
    out = torch.empty(len(seeds), d, dtype=torch.float32)
    if out.numel():
        with torch_threads():
            _uniforms_kernel(seeds.to(torch.int64).cpu().contiguous().numpy(), out.numpy())
    return out



@njit(inline="always", cache=True)
def _input(prow, crow, mrow, ef, j):
    """The compressor's input x for entry j of a child's row slice: the difference (Eq. 4), plus the EF memory or
    minus the EF21 estimate, in fp32 in that order."""
    x = crow[j] - prow[j]
    if ef == 1:
        x = x + mrow[j]
    elif ef == 2:
        x = x - mrow[j]
    return x


@njit(parallel=True, cache=True)
def _norms_kernel(parent, child, rows, parent_index, memory, ef, bucket, l1, norms):
    """Pass 1: norms[k, b] = fp32 of the fp64 L2 (or L1) norm of x over bucket b of child rows[k].

    Eight interleaved fp64 partial sums (a fixed order, so deterministic) instead of one dependent chain. The
    loops index slices of the bucket from 0 (see :func:`_segment` for why)."""
    d = child.shape[1]
    nb = norms.shape[1]
    for k in prange(rows.shape[0]):
        c = rows[k]
        p = parent_index[c]
        part = np.zeros(8, dtype=np.float64)
        for b in range(nb):
            lo = b * bucket
            hi = min(d, lo + bucket)
            ps = parent[p, lo:hi]
            cs = child[c, lo:hi]
            ms = memory[c, lo:hi] if ef != 0 else memory[0]
            part[:] = 0.0
            full = (hi - lo) // 8
            for j8 in range(full):
                for t in range(8):
                    x = np.float64(_input(ps, cs, ms, ef, 8 * j8 + t))
                    part[t] += abs(x) if l1 else x * x
            for t in range(hi - lo - 8 * full):
                x = np.float64(_input(ps, cs, ms, ef, 8 * full + t))
                part[t] += abs(x) if l1 else x * x
            acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
            norms[k, b] = np.float32(acc) if l1 else np.float32(np.sqrt(acc))


@njit(inline="always", cache=True)
def _natural(x, u):
    """NaturalCompression for one fp32 entry: the power of two below |x|, or twice it with probability
    |x| / lower - 1, with x's sign (frexp is exact, subnormals included; see compressors.natural)."""
    if x == 0:
        return x
    m, e = math.frexp(np.float64(abs(x)))
    lower = math.ldexp(1.0, e - 1)
    q = np.float32(2.0 * lower) if np.float64(u) < 2.0 * m - 1.0 else np.float32(lower)
    return -q if x < 0 else q


@njit(inline="always", cache=True)
def _qsgd(x, u, safe, step, s):
    """QSGD of one fp32 entry with the bucket's constants (``safe``: the norm, or 1 for a zero norm; ``step``:
    norm / s): the operations of QSGD.compress_ in their order."""
    t = min(abs(x) / safe, np.float32(1.0)) * s
    level = np.float32(np.floor(t))
    level = level + (np.float32(1.0) if u < t - level else np.float32(0.0))
    level = -level if x < 0 else level
    return level * step


@njit(inline="always", cache=True)
def _segment(acc, prow, crow, mrow, ubuf, w, norm, length, kind, ef, s):
    """The entries of one segment, all in one bucket (``norm``: its norm, ``length``: the bucket's size): acc[i] +=
    w * up_i, with the memory row updated for EF/EF21. ``acc``, ``prow``, ``crow``, ``mrow``, ``ubuf`` are the
    segment's slices of the accumulator, the parent, child and memory rows and the draws, indexed from 0: with a
    loop index known to be non-negative numba drops its negative-index wraparound, which stops LLVM from
    vectorising. The cases without error feedback get loops without per-entry branches on the compressor; the
    bucket's constants are computed once (the same fp32 values as per entry)."""
    safe = norm if norm > 0 else np.float32(1.0)
    step = norm / s
    sign_scale = norm / np.float32(length)
    if ef == 0 and kind == 0:
        for i in range(acc.shape[0]):
            acc[i] += (crow[i] - prow[i]) * w
    elif ef == 0 and kind == 1:
        for i in range(acc.shape[0]):
            acc[i] += _qsgd(crow[i] - prow[i], ubuf[i], safe, step, s) * w
    elif ef == 0 and kind == 2:
        for i in range(acc.shape[0]):
            acc[i] += (sign_scale if crow[i] - prow[i] >= 0 else -sign_scale) * w
    else:
        for i in range(acc.shape[0]):
            x = _input(prow, crow, mrow, ef, i)
            if kind == 0:
                q = x
            elif kind == 1:
                q = _qsgd(x, ubuf[i], safe, step, s)
            elif kind == 2:
                q = sign_scale if x >= 0 else -sign_scale
            else:
                q = _natural(x, ubuf[i])
            if ef == 1:
                mrow[i] = x - q
                up = q
            elif ef == 2:
                up = mrow[i] + q
                mrow[i] = up
            else:
                up = q
            acc[i] += up * w


@njit(parallel=True, cache=True)
def _aggregate_kernel(parent, child, order, segments, weights, seeds, norms, norm_row, memory, ef, kind, bucket,
                      s, out, write_out, block):
    """Pass 2: for parent p and a block of columns, acc = sum over children c of p (in ``order``) of w_c * up_c,
    where up_c = C(x) (no EF, EF) or the EF21 estimate g + C(x), updating the EF memory rows as it goes; then
    parent[p] += acc, or out[p] = acc with ``write_out`` (a server optimizer's pseudo-gradient).

    Per task, the block's draws of one child are made first into a buffer, then the entries are compressed in a
    plain loop (both loops are simple enough for LLVM to vectorise)."""
    m_rows, d = parent.shape
    nblocks = (d + block - 1) // block
    draws = kind == 1 or kind == 3
    for task in prange(m_rows * nblocks):
        p = task // nblocks
        start = (task % nblocks) * block
        n = min(d, start + block) - start
        acc = np.zeros(n, dtype=np.float32)
        ubuf = np.zeros(block, dtype=np.float32)
        for k in range(segments[p], segments[p + 1]):
            c = order[k]
            w = weights[c]
            r = norm_row[c]
            if draws:
                k0, k1 = _key(seeds[c])
                first = start // 4
                for i in range((n + 3) // 4):
                    w0, w1, w2, w3 = _philox(np.uint64(first + i), k0, k1)
                    ubuf[4 * i] = _to_uniform(w0)
                    ubuf[4 * i + 1] = _to_uniform(w1)
                    ubuf[4 * i + 2] = _to_uniform(w2)
                    ubuf[4 * i + 3] = _to_uniform(w3)
            crow = child[c, start:start + n]
            prow = parent[p, start:start + n]
            mrow = memory[c, start:start + n] if ef != 0 else memory[0]
            i = 0
            while i < n:  # the block's entries bucket by bucket: one norm per segment
                b = (start + i) // bucket
                hi = min(n, (b + 1) * bucket - start)
                length = min(d, (b + 1) * bucket) - b * bucket
                _segment(acc[i:hi], prow[i:hi], crow[i:hi], mrow[i:hi] if ef != 0 else mrow, ubuf[i:hi], w,
                         norms[r, b], length, kind, ef, s)
                i = hi
        dest = out[p, start:start + n] if write_out else parent[p, start:start + n]
        if write_out:
            for i in range(n):
                dest[i] = acc[i]
        else:
            for i in range(n):
                dest[i] = dest[i] + acc[i]


def supports(parent: Tensor, child: Tensor, compressor: Compressor, memory: Tensor | None = None,
             out: Tensor | None = None) -> bool:
    """Whether :func:`aggregate_layer_numba_` handles these tensors and this compressor: float32 CPU tensors and
    Identity, QSGD, ScaledSign or NaturalCompression, with or without error feedback."""
    tensors = [t for t in (parent, child, memory, out) if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and compressor.fused_spec() is not None)


@torch.no_grad()
def aggregate_layer_numba_(
    parent: Tensor, child: Tensor, parent_index: Tensor, weights: Tensor, compressor: Compressor, seeds: Tensor,
    *, memory: Tensor | None = None, rows: Tensor | None = None, out: Tensor | None = None,
) -> Tensor:
    """One layer's aggregation (see :func:`lightning_qmlhfl.kernels.aggregate_layer_`) on float32 CPU tensors;
    returns the per-upload norms float32 [len(rows), buckets] (non-finite if an upload held NaN/Inf; then nothing
    is written)."""
    if not supports(parent, child, compressor, memory, out):
        raise ValueError(
            f"aggregate_layer_numba_ takes float32 CPU tensors and Identity, QSGD, ScaledSign or NaturalCompression; "
            f"got {compressor!r} with dtypes {parent.dtype}/{child.dtype}"
        )
    check_layer_shapes(parent, child, parent_index, weights)
    c_rows, d = child.shape
    spec = compressor.fused_spec()
    ef = spec.error_feedback
    if ef and (memory is None or memory.shape != child.shape):
        raise ValueError(f"{compressor!r} needs its memory [{c_rows}, {d}], got "
                         f"{None if memory is None else tuple(memory.shape)}")
    kind = int(spec.kind)
    rows_t = torch.arange(c_rows) if rows is None else rows.to(torch.int64).cpu().contiguous()
    if compressor.uses_uniforms and seeds.shape != (c_rows,):
        raise ValueError(f"seeds must have shape ({c_rows},), got {tuple(seeds.shape)}")
    bucket = spec.bucket if spec.bucket is not None else 0
    bucket = bucket if 0 < bucket < d else 0
    nb = -(-d // bucket) if bucket else 1
    par = parent if parent.is_contiguous() else parent.contiguous()  # written back below
    chi = child.contiguous()
    pidx = parent_index.to(torch.int64).cpu().contiguous()
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= c_rows):
        raise ValueError(f"rows must index the {c_rows} child rows, got values in "
                         f"[{int(rows_t.min())}, {int(rows_t.max())}]")
    local, segments = children_by_parent(pidx[rows_t], par.shape[0], "aggregate_layer_numba_")  # range-checked:
    # the kernels index without bounds checks
    order = rows_t[local]
    norms = torch.empty(rows_t.numel(), nb, dtype=torch.float32)
    if c_rows == 0 or rows_t.numel() == 0:
        if out is not None:
            out.zero_()
        return norms
    mem = memory if memory is not None else torch.zeros(1, 1)
    if not mem.is_contiguous():
        raise ValueError("the error-feedback memory must be contiguous")
    pa, ch, me = par.numpy(), chi.numpy(), mem.numpy()
    o = out if out is not None else torch.zeros(1, 1)
    if out is not None and (out.shape != par.shape or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor of the parent's shape {tuple(par.shape)}")
    with torch_threads():
        _norms_kernel(pa, ch, rows_t.numpy(), pidx.numpy(), me, ef, bucket if bucket else d, spec.norm == "l1",
                      norms.numpy())
        if not bool(torch.isfinite(norms).all()):
            return norms
        norm_row = torch.full((c_rows,), -1, dtype=torch.int64)
        norm_row[rows_t] = torch.arange(rows_t.numel())
        _aggregate_kernel(pa, ch, order.numpy(), segments.numpy(), weights.to(torch.float32).contiguous().numpy(),
                          seeds.to(torch.int64).contiguous().numpy(), norms.numpy(), norm_row.numpy(), me, ef, kind,
                          bucket if bucket else d, np.float32(spec.levels), o.numpy(), out is not None, _BLOCK)
    if par is not parent:
        parent.copy_(par)
    return norms


class NumbaBackend(KernelBackend):
    """The fused kernel on float32 CPU tensors, for every compressor with a fused spec."""

    name = "numba"

    def supports(self, request: AggregationRequest) -> bool:
        return supports(request.parent, request.child, request.compressor, request.memory, request.out)

    def run(self, request: AggregationRequest) -> Tensor:
        r = request
        return aggregate_layer_numba_(r.parent, r.child, r.parent_index, r.weights, r.compressor, r.seeds,
                                      memory=r.memory, rows=r.rows, out=r.out)
