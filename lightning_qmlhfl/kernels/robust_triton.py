"""The Triton backend of :mod:`.robust`: coordinate-wise median and trimmed mean of every segment of stacked rows,
for float32 and float64 CUDA tensors (CPU tensors in Triton's interpreter, with ``TRITON_INTERPRET=1`` set before
Triton is first imported). Importing this module imports Triton.

One program per (segment, block of BLOCK columns): it loads the segment's n rows restricted to its columns as a
tile [BLOCK, KMAX] (KMAX: the smallest power of two >= the largest segment, at most
:data:`~.robust.TRITON_MAX_ROWS`; missing rows padded with +inf, which sort last), sorts every column's values
along the tile's last axis with ``tl.sort`` and reads the statistic by rank: an order statistic is taken with a max
over the ranks of a where (the value itself, no arithmetic); the median adds the two middle values in x's dtype and
halves the sum; the trimmed mean sums the kept ranks in fp64 (a tree reduction) and divides by n - 2g in fp64
(correctly rounded, no fused multiply-adds: launched with ``enable_fp_fusion=False`` like the other kernels).
The numbers are those of the torch reference, the trimmed mean to fp64 rounding of its sum (:mod:`.robust`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRET", "segment_order_stats_kernel", "segment_order_stats_triton", "tile_shape"]

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernel runs in Triton's CPU interpreter (Triton decides this when it is first imported)."""
_TILE = 4096  # elements of the [BLOCK, KMAX] tile of one program


@triton.jit
def segment_order_stats_kernel(
    x_ptr,
    order_ptr,
    offsets_ptr,
    trim_ptr,
    out_ptr,
    P,
    stride_x,
    stride_out,
    MEDIAN: tl.constexpr,
    KMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (s, column block): out[s, cols] = the median (``MEDIAN``) or the trimmed mean cutting trim[s]
    values at each end of the rows order[offsets[s]:offsets[s + 1]] of x (module docstring)."""
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(P, BLOCK)
    s = (pid // num_col_blocks).to(tl.int64)
    cols = (pid % num_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < P
    lo = tl.load(offsets_ptr + s)
    n = tl.load(offsets_ptr + s + 1) - lo
    ranks = tl.arange(0, KMAX)
    row_ok = ranks < n
    rows = tl.load(order_ptr + lo + ranks, mask=row_ok, other=0)
    mask = col_ok[:, None] & row_ok[None, :]
    tile = tl.load(x_ptr + rows[None, :] * stride_x + cols[:, None], mask=mask, other=float("inf"))
    v = tl.sort(tile, dim=1)
    r = ranks[None, :]
    if MEDIAN:
        mid_lo = tl.maximum(n - 1, 0) // 2
        mid_hi = n // 2
        a = tl.max(tl.where(r == mid_lo, v, float("-inf")), axis=1)
        b = tl.max(tl.where(r == mid_hi, v, float("-inf")), axis=1)
        res = tl.where(mid_lo == mid_hi, a, (a + b) * 0.5)
    else:
        g = tl.load(trim_ptr + s)
        keep = (r >= g) & (r < n - g)
        total = tl.sum(tl.where(keep, v.to(tl.float64), 0.0), axis=1)
        kept = tl.maximum(n - 2 * g, 1).to(tl.float64)
        res = (total / kept).to(out_ptr.dtype.element_ty)
    res = tl.where(n > 0, res, 0.0)
    tl.store(out_ptr + s * stride_out + cols, res.to(out_ptr.dtype.element_ty), mask=col_ok)


def tile_shape(kmax: int) -> tuple[int, int]:
    """(KMAX, BLOCK) for segments of at most ``kmax`` rows: KMAX the next power of two (at least 2), BLOCK columns
    so the tile holds about 4096 values (at least 2)."""
    k = max(2, 1 << max(0, kmax - 1).bit_length())
    return k, max(2, _TILE // k)


def segment_order_stats_triton(x: Tensor, order: Tensor, offsets: Tensor, trim: Tensor | None,
                               block: int | None = None) -> Tensor:
    """[S, P] in x's dtype: the median (``trim`` None) or the trimmed mean cutting ``trim[s]`` values at each end
    of segment s; ``order`` and ``offsets`` from :func:`.robust.segment_layout`. The caller (:mod:`.robust`)
    validates the inputs and checks what this backend supports. ``block`` (a power of two >= 2) overrides the
    columns per program of :func:`tile_shape` (the tests use small blocks: the interpreter's sort is slow)."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 2
                              or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 2 (columns per program), got {block!r}")
    if x.stride(1) != 1:
        x = x.contiguous()
    S, P = offsets.numel() - 1, x.shape[1]
    out = torch.empty(S, P, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    device = x.device
    order = order.to(device=device, dtype=torch.int64).contiguous()
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()
    kmax, auto_block = tile_shape(int((offsets[1:] - offsets[:-1]).max()))
    block = block or min(auto_block, max(2, triton.next_power_of_2(P)))
    median = trim is None
    trim_t = offsets if median else trim.to(device=device, dtype=torch.int64).contiguous()  # unread if MEDIAN
    grid = (S * triton.cdiv(P, block),)
    segment_order_stats_kernel[grid](x, order, offsets, trim_t, out, P, x.stride(0), out.stride(0),
                                     MEDIAN=median, KMAX=kmax, BLOCK=block,
                                     num_warps=max(1, min(8, kmax * block // 1024)), enable_fp_fusion=False)
    return out
