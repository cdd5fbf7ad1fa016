"""Fused quantize-and-aggregate for CPU tensors (numba), the CPU counterpart of :mod:`lightning_qmlhfl.kernels`.

Same semantics as the torch reference :func:`lightning_qmlhfl.kernels.reference.aggregate_layer_torch_` and the Triton
kernels, number for number:

- Draws: column j of child row c uses word (j mod 4) of Philox4x32-10 with key (seed mod 2^32, seed >> 32) and
  counter (j div 4, 0, 0, 0), converted to [0, 1) as Triton's ``tl.rand`` does. These are exactly the Triton
  kernels' draws, so a run gives the same numbers on CPU and GPU.
- Pass 1 (parallel over child rows): fp64 sums of squares of the fp32 differences child - parent, per row or per
  bucket, then the fp32 norms. A non-finite norm stops here: the caller leaves the parents untouched.
- Pass 2 (parallel over parents x column blocks): for each parent, its children in index order, the fp32
  quantize-weight-accumulate of Eq. 4/6, then parent += acc, the same operations in the same order as the torch
  reference (no fused multiply-add: numba emits separate IEEE multiplies and adds unless fastmath is on).

Compared with the torch path (a dozen elementwise passes per ~1 MB chunk plus mt19937 draws on one thread), each
child row is read twice and every draw is made in registers. Only float32 parents and children are handled
here (the engine's default); other dtypes and other quantizers use the torch path.
"""

from __future__ import annotations

import numpy as np
import torch
import numba
from numba import njit, prange
from torch import Tensor

from ..hierarchy import check_layer_shapes, children_by_parent
from ..quantizers import QSGD, NoQuantization, Quantizer

__all__ = ["philox_uniforms", "aggregate_layer_numba_"]

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


def _use_torch_threads() -> None:
    """numba's parallel loops use as many threads as torch's intra-op pool (within numba's own maximum)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def philox_uniforms(seeds: Tensor, d: int) -> Tensor:
    """float32 [len(seeds), d] on CPU: row i's U[0, 1) draws for seed ``seeds[i]`` (the Triton kernels' draws)."""
    out = torch.empty(len(seeds), d, dtype=torch.float32)
    if out.numel():
        _use_torch_threads()
        _uniforms_kernel(seeds.to(torch.int64).cpu().contiguous().numpy(), out.numpy())
    return out


@njit(parallel=True, cache=True)
def _norms_kernel(parent, child, parent_index, bucket, norms):
    """Pass 1: norms[c, b] = fp32(sqrt(sum over bucket b of fp64(child[c] - parent[p(c)])^2)).

    Eight interleaved fp64 partial sums (a fixed order, so deterministic) instead of one dependent chain."""
    rows, d = child.shape
    nb = norms.shape[1]
    for c in prange(rows):
        p = parent_index[c]
        part = np.zeros(8, dtype=np.float64)
        for b in range(nb):
            lo = b * bucket
            hi = min(d, lo + bucket)
            part[:] = 0.0
            j = lo
            while j + 8 <= hi:
                for t in range(8):
                    x = np.float64(child[c, j + t] - parent[p, j + t])
                    part[t] += x * x
                j += 8
            for t in range(hi - j):
                x = np.float64(child[c, j + t] - parent[p, j + t])
                part[t] += x * x
            acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
            norms[c, b] = np.float32(np.sqrt(acc))


@njit(inline="always", cache=True)
def _weighted_level(x, u, norm, s, w):
    """w * Q(x) for one entry, the operations of reference._weighted_qsgd_ in their order (fp32)."""
    safe = norm if norm > 0 else np.float32(1.0)
    t = min(abs(x) / safe, np.float32(1.0)) * s
    level = np.float32(np.floor(t))
    level = level + (np.float32(1.0) if u < t - level else np.float32(0.0))
    level = -level if x < 0 else level
    return (level * (norm / s)) * w


@njit(parallel=True, cache=True)
def _aggregate_kernel(parent, child, order, segments, weights, seeds, norms, bucket, s, quantize, block):
    """Pass 2: parent[p, cols] += sum over children c of p (in ``order``) of w_c * Q(child[c] - parent[p]).

    Per task, the block's draws of one child are made first into a buffer, then the entries are quantized in a
    plain loop (both loops are simple enough for LLVM to vectorise)."""
    m_rows, d = parent.shape
    nblocks = (d + block - 1) // block
    for task in prange(m_rows * nblocks):
        p = task // nblocks
        start = (task % nblocks) * block
        n = min(d, start + block) - start
        acc = np.zeros(n, dtype=np.float32)
        ubuf = np.empty(block, dtype=np.float32)
        for k in range(segments[p], segments[p + 1]):
            c = order[k]
            w = weights[c]
            if not quantize:
                for i in range(n):
                    acc[i] += (child[c, start + i] - parent[p, start + i]) * w
                continue
            k0, k1 = _key(seeds[c])
            first = start // 4
            for i in range((n + 3) // 4):
                w0, w1, w2, w3 = _philox(np.uint64(first + i), k0, k1)
                ubuf[4 * i] = _to_uniform(w0)
                ubuf[4 * i + 1] = _to_uniform(w1)
                ubuf[4 * i + 2] = _to_uniform(w2)
                ubuf[4 * i + 3] = _to_uniform(w3)
            if bucket > 0:
                for i in range(n):
                    x = child[c, start + i] - parent[p, start + i]
                    acc[i] += _weighted_level(x, ubuf[i], norms[c, (start + i) // bucket], s, w)
            else:
                norm = norms[c, 0]
                for i in range(n):
                    x = child[c, start + i] - parent[p, start + i]
                    acc[i] += _weighted_level(x, ubuf[i], norm, s, w)
        for i in range(n):
            parent[p, start + i] = parent[p, start + i] + acc[i]


def supports(parent: Tensor, child: Tensor, quantizer: Quantizer) -> bool:
    """Whether :func:`aggregate_layer_numba_` handles these tensors and this quantizer."""
    return (parent.device.type == "cpu" and child.device.type == "cpu" and parent.dtype == torch.float32
            and child.dtype == torch.float32 and isinstance(quantizer, (QSGD, NoQuantization)))


@torch.no_grad()
def aggregate_layer_numba_(
    parent: Tensor, child: Tensor, parent_index: Tensor, weights: Tensor, quantizer: Quantizer, seeds: Tensor
) -> Tensor:
    """Eq. 4/6 for all parents of one layer, in place on ``parent`` (float32 CPU); returns the upload norms
    float32 [C, buckets] (non-finite if an upload held NaN/Inf; then ``parent`` is untouched)."""
    if not supports(parent, child, quantizer):
        raise ValueError("aggregate_layer_numba_ takes float32 CPU tensors and a QSGD or NoQuantization quantizer")
    check_layer_shapes(parent, child, parent_index, weights)
    if not quantizer.is_identity and seeds.shape != (child.shape[0],):
        raise ValueError(f"seeds must have shape ({child.shape[0]},), got {tuple(seeds.shape)}")
    c_rows, d = child.shape
    quantize = not quantizer.is_identity
    bucket = quantizer.bucket_size if quantize and quantizer.bucket_size is not None else 0
    bucket = bucket if 0 < bucket < d else 0
    nb = -(-d // bucket) if bucket else 1
    par = parent if parent.is_contiguous() else parent.contiguous()  # written back below
    chi = child.contiguous()
    pidx = parent_index.to(torch.int64).cpu().contiguous()
    order, segments = children_by_parent(pidx, par.shape[0], "aggregate_layer_numba_")  # range-checked: the
    # kernels index without bounds checks
    norms = torch.empty(c_rows, nb, dtype=torch.float32)
    if c_rows == 0:
        return norms
    pa, ch = par.numpy(), chi.numpy()
    _use_torch_threads()
    _norms_kernel(pa, ch, pidx.numpy(), bucket if bucket else d, norms.numpy())
    if not bool(torch.isfinite(norms).all()):
        return norms
    s = np.float32(quantizer.levels if quantize else 1)
    _aggregate_kernel(pa, ch, order.numpy(), segments.numpy(), weights.to(torch.float32).contiguous().numpy(),
                      seeds.to(torch.int64).contiguous().numpy(), norms.numpy(), bucket, s, quantize, _BLOCK)
    if par is not parent:
        parent.copy_(par)
    return norms
