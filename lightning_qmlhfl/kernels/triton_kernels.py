"""The Triton kernels of the fused compress-and-aggregate (one kernel per job) and the launch configurations the
segmented aggregation is autotuned over. Their launchers, with the validation, the layout and the reasons for the
design, are in :mod:`.triton_cuda`."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_ops import (column_tile, compress, compressor_input, philox_uniforms, qsgd_levels, to_fp32, to_storage,
                         upload_norm)

__all__ = ["diff_sumsq_kernel", "aggregate_segments_kernel", "aggregate_segments_autotuned", "SEGMENT_CONFIGS",
           "encode_kernel", "atomic_upload_kernel", "uniforms_kernel"]


@triton.jit
def diff_sumsq_kernel(
    parent_ptr,
    child_ptr,
    order_ptr,
    rows_ptr,
    parent_index_ptr,
    memory_ptr,
    partial_ptr,
    C,
    P,
    stride_parent,
    stride_child,
    stride_memory,
    bucket,
    blocks_per_bucket,
    partial_stride,
    R: tl.constexpr,
    W: tl.constexpr,
    EF: tl.constexpr,
    L1: tl.constexpr,
    SUBSET: tl.constexpr,
):
    """Pass 1: fp64 sums of squares (``L1``: of absolute values) of the compressor input x (:func:`compressor_input`) over a
    tile of R buckets x W columns.

    ``C`` uploads; upload k is child row c = rows[k] (``SUBSET``) or c = k (all rows). Program ``pid`` handles
    column program j = pid // C of upload k = order[pid % C] (consecutive programs share a column block and,
    uploads being sorted by parent, mostly the parent block too, which then comes from L2). A tile row r covers
    columns [b * bucket + sub * W, ... + W) of bucket b = (j // blocks_per_bucket) * R + r,
    sub = j % blocks_per_bucket, and writes its sum to partial[k, j * R + r].
    """
    pid = tl.program_id(0)
    k = tl.load(order_ptr + pid % C)
    j = pid // C
    if SUBSET:
        c = tl.load(rows_ptr + k)
    else:
        c = k
    p = tl.load(parent_index_ptr + c)
    sub = j % blocks_per_bucket
    first_bucket = (j // blocks_per_bucket) * R
    in_bucket = sub * W + tl.arange(0, W)[None, :]
    cols = (first_bucket + tl.arange(0, R)[:, None]) * bucket + in_bucket
    mask = (in_bucket < bucket) & (cols < P)
    xp = to_fp32(tl.load(parent_ptr + p * stride_parent + cols, mask=mask, other=0.0))
    x, m = compressor_input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF)
    d = x.to(tl.float64)
    if L1:
        total = tl.sum(tl.abs(d), axis=1)
    else:
        total = tl.sum(d * d, axis=1)
    tl.store(partial_ptr + k * partial_stride + j * R + tl.arange(0, R), total)


@triton.jit
def aggregate_segments_kernel(
    parent_ptr,
    child_ptr,
    order_ptr,
    rows_ptr,
    segment_ptr,
    weight_ptr,
    seed_ptr,
    norm_ptr,
    memory_ptr,
    out_ptr,
    P,
    stride_parent,
    stride_child,
    stride_memory,
    stride_out,
    s,
    NUM_BUCKETS,
    BUCKET: tl.constexpr,
    KIND: tl.constexpr,
    EF: tl.constexpr,
    SUBSET: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2, segmented layout: program (p, block) does, for the block's columns,
    acc = sum over the uploads of p of w_c * up_c, then parent[p] += acc (or out[p] = acc with ``WRITE_OUT``).

    The uploads of p are order[segment[p]:segment[p + 1]] (upload k is child c = rows[k] with ``SUBSET``, else
    c = k; its norms are row k of ``norm_ptr``), visited in that order. Per entry, in the order of the torch
    reference and the numba kernel: x (:func:`compressor_input`), q = C(x) (:func:`compress`; KIND and BUCKET as there),
    then EF == 1: memory[c] = x - q, up = q; EF == 2: up = memory[c] + q, memory[c] = up; EF == 0: up = q; then
    acc += up * w_c. The sum is fp32, starting from 0 and added to the parent at the end, as in the torch
    reference; the parent is cast back to its storage dtype, ``out`` and the memory are fp32.
    """
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(P, BLOCK)
    p = (pid // num_col_blocks).to(tl.int64)
    start = (pid % num_col_blocks) * BLOCK
    cols = column_tile(start, BLOCK)
    mask = cols < P
    parent_row = parent_ptr + p * stride_parent
    xp = to_fp32(tl.load(parent_row + cols, mask=mask, other=0.0))
    acc = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    lo = tl.load(segment_ptr + p)
    hi = tl.load(segment_ptr + p + 1)
    for i in range(lo, hi):
        k = tl.load(order_ptr + i)
        if SUBSET:
            c = tl.load(rows_ptr + k)
        else:
            c = k
        x, m = compressor_input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF)
        if KIND == 1 or KIND == 3:  # the compressors that draw (uses_uniforms)
            u = philox_uniforms(tl.load(seed_ptr + c), start, BLOCK)
        else:
            u = x
        if KIND == 1 or KIND == 2:  # the compressors scaled by a norm
            norm = upload_norm(norm_ptr, k, cols, mask, NUM_BUCKETS, BUCKET)
        else:
            norm = 0.0
        q = compress(x, u, norm, cols, P, s, KIND, BUCKET)
        if EF == 1:
            tl.store(memory_ptr + c * stride_memory + cols, x - q, mask=mask)
            up = q
        elif EF == 2:
            up = m + q
            tl.store(memory_ptr + c * stride_memory + cols, up, mask=mask)
        else:
            up = q
        acc += up * tl.load(weight_ptr + c)
    if WRITE_OUT:
        tl.store(out_ptr + p * stride_out + cols, acc, mask=mask)
    else:
        tl.store(parent_row + cols, to_storage(xp + acc, parent_ptr.dtype.element_ty), mask=mask)


@triton.jit
def encode_kernel(
    parent_ptr,
    child_ptr,
    order_ptr,
    parent_index_ptr,
    seed_ptr,
    norm_ptr,
    out_ptr,
    C,
    P,
    stride_parent,
    stride_child,
    s,
    NUM_BUCKETS,
    BUCKET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The wire message of QSGD: program pid stores, for block pid // C of child c = order[pid % C], the level codes
    sign * xi of Q(child[c] - parent[p]) into out[c] (the draws and operations of :func:`aggregate_segments_kernel`)."""
    pid = tl.program_id(0)
    c = tl.load(order_ptr + pid % C)
    p = tl.load(parent_index_ptr + c)
    start = (pid // C) * BLOCK
    cols = column_tile(start, BLOCK)
    mask = cols < P
    xp = to_fp32(tl.load(parent_ptr + p * stride_parent + cols, mask=mask, other=0.0))
    x = to_fp32(tl.load(child_ptr + c * stride_child + cols, mask=mask, other=0.0)) - xp
    norm = upload_norm(norm_ptr, c, cols, mask, NUM_BUCKETS, BUCKET)
    u = philox_uniforms(tl.load(seed_ptr + c), start, BLOCK)
    level = qsgd_levels(x, norm, u, s)
    tl.store(out_ptr + c * P + cols, level.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def atomic_upload_kernel(
    parent_ptr,
    child_ptr,
    order_ptr,
    parent_index_ptr,
    weight_ptr,
    seed_ptr,
    norm_ptr,
    out_ptr,
    C,
    P,
    stride_parent,
    stride_child,
    s,
    NUM_BUCKETS,
    BUCKET: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2 of the atomic layout: program pid atomically adds, for block pid // C of child c = order[pid % C],
    w_c * Q(child[c] - parent[p]) (w_c * the difference without ``QUANTIZE``) into the fp32 accumulator out[p]."""
    pid = tl.program_id(0)
    c = tl.load(order_ptr + pid % C)
    p = tl.load(parent_index_ptr + c)
    start = (pid // C) * BLOCK
    cols = column_tile(start, BLOCK)
    mask = cols < P
    xp = to_fp32(tl.load(parent_ptr + p * stride_parent + cols, mask=mask, other=0.0))
    x = to_fp32(tl.load(child_ptr + c * stride_child + cols, mask=mask, other=0.0)) - xp
    if QUANTIZE:
        norm = upload_norm(norm_ptr, c, cols, mask, NUM_BUCKETS, BUCKET)
        u = philox_uniforms(tl.load(seed_ptr + c), start, BLOCK)
        q = qsgd_levels(x, norm, u, s) * tl.math.div_rn(norm, s)
    else:
        q = x
    tl.atomic_add(out_ptr + p * P + cols, q * tl.load(weight_ptr + c), mask=mask)


@triton.jit
def uniforms_kernel(seed_ptr, out_ptr, d, num_col_blocks, BLOCK: tl.constexpr):
    """out[row, :d] = the draws of :func:`philox_uniforms` for seed_ptr[row] (what the fused kernels use)."""
    pid = tl.program_id(0)
    row = (pid // num_col_blocks).to(tl.int64)
    start = (pid % num_col_blocks) * BLOCK
    cols = column_tile(start, BLOCK)
    u = philox_uniforms(tl.load(seed_ptr + row), start, BLOCK)
    tl.store(out_ptr + row * d + cols, u, mask=cols < d)


# The segmented aggregation's columns per program, autotuned per row length P (compiled kernels only: the
# interpreter runs the kernel with the default block). The result does not depend on the block (the draws are keyed
# by column, the children summed in order per column), so the choice changes no number. The kernel adds into the
# parents and updates the error-feedback memory in place: the autotuner's trial launches must not, so it restores
# those buffers after each (``restore_value``).
SEGMENT_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
                   for block, warps in ((512, 2), (1024, 4), (2048, 8), (4096, 8))]
aggregate_segments_autotuned = triton.autotune(configs=SEGMENT_CONFIGS, key=["P"],
                                               restore_value=["parent_ptr", "memory_ptr", "out_ptr"])(
    aggregate_segments_kernel)
