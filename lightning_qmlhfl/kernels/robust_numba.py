"""The numba backend of :mod:`.robust`: coordinate-wise median and trimmed mean of every segment of stacked rows,
for float32 and float64 CPU tensors.

One parallel loop over (segment, block of columns): the task copies its segment's rows, restricted to the block,
into a buffer [columns, n] (reading each row's block contiguously), sorts each column's n values in place
(insertion sort up to 32 values, numba's sort above) and reads the statistic of :mod:`.robust`'s module
docstring: the middle value or the mean of the two middle values (added in x's dtype) for the median; for the
trimmed mean the sequential fp64 sum of v_g .. v_{n-g-1} in sorted order, divided by n - 2g, stored in x's dtype.
Import through :func:`lightning_qmlhfl.kernels.robust._numba` (it sizes numba's thread pool before numba is first
imported).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .numba_cpu import torch_threads

__all__ = ["segment_order_stats"]

_BUFFER = 1 << 13  # values per task buffer (columns x rows of one segment)
_INSERTION = 32  # columns of at most this many values are sorted by insertion


@njit(inline="always", cache=True)
def _sort(col):
    """Sort ``col`` in place: insertion sort for short columns (the usual case: a parent's children), numba's
    sort otherwise. Any correct sort gives the same order statistics."""
    n = col.shape[0]
    if n > _INSERTION:
        col.sort()
        return
    for i in range(1, n):
        v = col[i]
        j = i - 1
        while j >= 0 and col[j] > v:
            col[j + 1] = col[j]
            j -= 1
        col[j + 1] = v


@njit(parallel=True, cache=True)
def _order_stats_kernel(x, order, offsets, trim, median, block, out):
    """out[s, j] for every segment s and column j (``median``: the median, else the trimmed mean cutting
    ``trim[s]`` values at each end). Tasks are (segment, column block) pairs, independent of each other."""
    S, P = out.shape
    nb = (P + block - 1) // block
    for t in prange(S * nb):
        s = t // nb
        c0 = (t % nb) * block
        c1 = min(P, c0 + block)
        lo = offsets[s]
        n = offsets[s + 1] - lo
        if n == 0:
            for j in range(c0, c1):
                out[s, j] = 0.0
            continue
        buf = np.empty((c1 - c0, n), dtype=x.dtype)
        for i in range(n):
            r = order[lo + i]
            for j in range(c0, c1):
                buf[j - c0, i] = x[r, j]
        g = 0 if median else trim[s]
        for j in range(c1 - c0):
            col = buf[j]
            _sort(col)
            if median:
                if n % 2 == 1:
                    out[s, c0 + j] = col[n // 2]
                else:
                    pair = col[n // 2 - 1] + col[n // 2]  # in x's dtype, as numpy.median
                    out[s, c0 + j] = pair * 0.5  # halving is exact, so the dtype of 0.5 changes nothing
            else:
                acc = 0.0
                for i in range(g, n - g):
                    acc += np.float64(col[i])
                out[s, c0 + j] = acc / np.float64(n - 2 * g)


def segment_order_stats(x: Tensor, order: Tensor, offsets: Tensor, trim: Tensor | None) -> Tensor:
    """[S, P] in x's dtype: the median (``trim`` None) or the trimmed mean cutting ``trim[s]`` values at each end
    of segment s, for CPU float32/float64 ``x`` [k, P]; ``order`` and ``offsets`` from
    :func:`.robust.segment_layout`. The caller (:mod:`.robust`) validates the inputs."""
    x = x.contiguous()
    S = offsets.numel() - 1
    P = x.shape[1]
    out = torch.empty(S, P, dtype=x.dtype)
    if out.numel() == 0:
        return out
    kmax = int((offsets[1:] - offsets[:-1]).max())
    block = max(1, min(P, _BUFFER // max(1, kmax)))
    median = trim is None
    trim_np = np.zeros(1, dtype=np.int64) if median else trim.to(torch.int64).contiguous().numpy()
    with torch_threads():
        _order_stats_kernel(x.numpy(), order.to(torch.int64).contiguous().numpy(),
                            offsets.to(torch.int64).contiguous().numpy(), trim_np, median, block, out.numpy())
    return out
