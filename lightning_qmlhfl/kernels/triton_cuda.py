"""Fused compress-and-aggregate for one layer (Eqs. 4 and 6) in Triton, and its launchers (the CUDA backend).

Importing this module imports Triton; :func:`lightning_qmlhfl.kernels.triton_available` says whether it can run.
Users do not call it directly: :func:`lightning_qmlhfl.kernels.aggregate_layer_` dispatches to it for CUDA tensors.

For every child row c in ``rows`` (default: all) with parent p = parent_index[c] and every parent p::

    x = child[c] - parent[p]          (+ memory[c] with error feedback "ef", - memory[c] with "ef21")
    no EF: up = C(x);   "ef": up = C(x), memory[c] = x - up;   "ef21": up = memory[c] + C(x), memory[c] = up
    parent[p] <- parent[p] + sum_c w_c * up     (or out[p] = sum_c w_c * up, the parent left as it is)

with C one of Identity, QSGD, ScaledSign or NaturalCompression (:mod:`lightning_qmlhfl.compressors`), whole-row or
bucketed where the compressor has buckets. :func:`supports` says exactly what is implemented. The numbers are those
of :func:`lightning_qmlhfl.kernels.reference.aggregate_layer_torch_` fed with :func:`triton_uniforms` (and of the
numba CPU kernel); the tests compare them element by element.

Two passes
----------
QSGD and ScaledSign scale every entry by a norm of its whole row (or bucket), so no entry can be compressed
before the whole row has been read once. A row of 5.85M fp32 parameters (23 MB) does not fit in on-chip memory,
so the work is split in two launches:

1. ``_diff_sumsq_kernel``: per (row, bucket, column block), fp64 sums of squares (absolute values for
   ScaledSign's L1 norm) of the compressor input x, written as small partials (one fp64 per 4 KB of data read)
   that the host reduces (and square-roots for L2). Nothing of size [C, P] is written. fp64 accumulation (the
   square of an fp32 number is exact in fp64, and fp64 neither overflows at 1e30**2 * 1e7 nor underflows at
   1e-30**2) is what the torch reference does, so the norms agree to fp32 rounding, i.e. are identical except
   when the two fp64 sums (different orders) round to different fp32 numbers, a chance of about 1e-8 per norm.
   Identity and NaturalCompression need no norm; their L2 norms are computed all the same, to catch NaN/Inf.
2. Between the launches the host checks that all norms are finite; if one is not, nothing (parent, memory,
   ``out``) is written and the norms are returned (the engine names the layer, node and round). This costs one
   sync per call.
3. ``_aggregate_segments_kernel``: forms x again, compresses it with counter-based random numbers, updates the
   error-feedback memory, weights the upload and accumulates it, for all parents in one launch.

The child rows are therefore read twice; the traffic is (2 C + 3 M) P elements against the ideal (C + 2 M) P
(one read of the children, one read and write of the parents), i.e. at most ~52% of copy bandwidth in the
"effective" metric for 10 children per parent (error feedback adds three passes over the fp32 memory: read twice,
written once, against the ideal two). ``bench/kernels.py`` reports both. Beating that needs the norms from
elsewhere: computed by the producer of the child rows (the last local step), or, in bucketed mode with buckets
no longer than a block, in registers within a single pass (not done: the NaN/Inf check would then have to happen
after the parent is written, so it would need a separate output buffer).

Blocks are tiles [BLOCK / 4, 4] in memory order: each thread owns runs of 4 consecutive columns, which become
128-bit loads for fp32 when P (the row stride) is a multiple of 16, as Triton then specializes the launch
(``python -m lightning_qmlhfl.kernels.compile_check`` shows the PTX); other P work with scalar loads.

Segments or atomics
-------------------
*Segments* (the default, and the only layout with every compressor, error feedback, ``rows`` and ``out``): the
host sorts the uploading children by parent (stable ``argsort``, so each parent keeps its children in the order
of ``rows``, the child index order when all rows upload) and builds CSR offsets; each program owns one (parent,
column block), keeps the parent block in registers, loops over that parent's children and writes the parent (or
``out``) block once. No atomics, each parent element is read and written exactly once, and the fp32 sum is taken
in child order, the order of the torch reference on CPU, so the result does not depend on scheduling: this is
what makes a resumed run bit-for-bit the same. Its weakness is parallelism when M * P / BLOCK is small (a cloud
with few parameters).
*Atomics* (``layout="atomic"``; QSGD and Identity without error feedback, all rows, adding into the parents):
each program owns one (child, column block) and ``tl.atomic_add`` s its weighted, dequantized block into a zeroed
fp32 accumulator [M, P]; the host then adds the accumulator to the parent. It has C / M times more parallelism
but writes M P fp32 zeros, performs C P atomic adds (resolved in L2) and reads the accumulator again, and the
fp32 summation order changes from run to run. Segments is the default: determinism is a requirement, and on an
H200 atomics were slower in every measured case (bench/RESULTS.md, "GPU (H200)"); atomics stay an option.

Random numbers
--------------
Each child row c has a 63-bit seed ``seeds[c]`` from :func:`lightning_qmlhfl.rng.row_seeds` (run seed,
round, layer, event, node). Triton's Philox (``tl.randint4x`` / ``tl.rand4x``) takes the seed as a uint64 and
uses its two 32-bit halves as the Philox key, so the seed is used whole, with no folding:
key = (seed mod 2**32, seed >> 32). Column j of row c draws word (j mod 4) of Philox4x32-10 with counter
(j div 4, 0, 0, 0), converted to [0, 1) exactly as ``tl.rand`` does. One Philox evaluation thus serves four
columns (Philox is the costliest arithmetic in the kernel) and the draw of column j depends only on (seed, j),
not on the block size or the launch shape. Counters are int32: P must be below 2**31 - 2**16 columns. Only the
compressors that draw (``uses_uniforms``: QSGD, NaturalCompression) evaluate Philox.

Arithmetic
----------
fp32 for every storage dtype (fp16/bf16/fp32, and fp64 storage too, unlike the torch reference, which computes
fp64 storage in fp64); the error-feedback memory and ``out`` are fp32. Products are not fused into FMAs
(``enable_fp_fusion=False``), divisions are correctly rounded (``div_rn``), results are cast back to the storage
dtype with round-to-nearest-even, and NaturalCompression works on the fp32 bits (subnormals included, which
needs no flush-to-zero: the compile check counts ``.ftz`` instructions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..hierarchy import children_by_parent
from ..compressors import QSGD, Compressor, Encoded, Identity, NaturalCompression, Quantizer, ScaledSign

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run in Triton's CPU interpreter (Triton decides this when this module is first imported)."""

__all__ = ["INTERPRET", "KINDS", "EF_MODES", "supports", "aggregate_layer_triton_", "encode_uploads_triton",
           "row_norms_triton", "triton_uniforms"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_COLS = 2**31 - 2**16  # column indices (and block starts past them) must fit in int32
_MAX_PROGRAMS = 2**31 - 1  # 1D grid limit
_DEFAULT_BLOCK = 1024
_LAYOUTS = ("segments", "atomic")
KINDS = {Identity: 0, QSGD: 1, ScaledSign: 2, NaturalCompression: 3}
"""The compressors of the segmented kernel and their ``KIND`` code (the numba kernel's codes)."""
EF_MODES = {None: 0, "ef": 1, "ef21": 2}
"""Error-feedback modes and their ``EF`` code."""
_ATOMIC_KINDS = (Identity, QSGD)


# ----------------------------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _column_tile(start, BLOCK: tl.constexpr):
    """Column indices start + 4 i + j of a block, as an int32 tile [BLOCK // 4, 4] (row-major = memory order)."""
    return start + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]


@triton.jit
def _philox_uniforms(seed, start, BLOCK: tl.constexpr):
    """U[0, 1) draws for columns start + 4 i + j (``start`` a multiple of 4), fp32 [BLOCK // 4, 4].

    Column 4 k + j takes word j of Philox4x32-10(key=seed, counter=(k, 0, 0, 0)), converted like ``tl.rand``.
    """
    counter = start // 4 + tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    word = tl.arange(0, 4)[None, :]
    return tl.where(
        word == 0,
        u0[:, None],
        tl.where(word == 1, u1[:, None], tl.where(word == 2, u2[:, None], u3[:, None])),
    )


@triton.jit
def _copysign(a, x):
    """``a`` (>= 0, +0 included) with the sign bit of ``x``, on the bits (torch's ``copysign``: -0.0 included)."""
    bits = a.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _qsgd_levels(x, norm, u, s):
    """Signed QSGD levels sign(x) * xi as fp32, element for element as ``QSGD.compress_`` (before its final
    multiply by norm / s) and ``compressors.quantize_levels``.

    ``x`` fp32 compressor inputs, ``norm`` the fp32 norm of each entry's row/bucket (scalar or x's shape), ``u``
    U[0, 1) draws, ``s`` the number of levels (fp32). Division is correctly rounded (``div_rn``) like torch's.
    The sign is copied from x's sign bit, as ``copysign`` in the reference (a zero level keeps the sign of x).
    """
    safe = tl.where(norm > 0, norm, 1.0)
    r = tl.minimum(tl.math.div_rn(tl.abs(x), safe), 1.0)  # |x| / norm, clamped at 1 against rounding
    scaled = r * s
    low = tl.floor(scaled)
    xi = low + tl.where(u < scaled - low, 1.0, 0.0)  # up with probability (fractional part)
    xi = tl.minimum(xi, s)  # no-ops (xi <= s since r <= 1; a zero norm means x = 0, so xi = 0 already):
    xi = tl.where(norm > 0, xi, 0.0)  # kept as guards, they change no number
    return _copysign(xi, x)


@triton.jit
def _natural(x, u):
    """NaturalCompression of fp32 ``x`` with draws ``u`` (see ``compressors.natural``), on the bits, in the
    reference's order: |x| (subnormals times 2^64, exact), lower power = the bits with the mantissa cleared,
    probability = mantissa * 2^-23 (exact), twice the lower power if u < probability, subnormals times 2^-64
    again (exact), then x's sign bit. A zero stays zero (with its sign)."""
    a = tl.abs(x)
    sub = a.to(tl.int32, bitcast=True) < 0x00800000  # zero or subnormal
    a = tl.where(sub, a * 18446744073709551616.0, a)  # 2^64
    bits = a.to(tl.int32, bitcast=True)
    lower = (bits & 0x7F800000).to(tl.float32, bitcast=True)
    prob = (bits & 0x007FFFFF).to(tl.float32) * 1.1920928955078125e-07  # 2^-23
    q = tl.where(u < prob, lower * 2.0, lower)
    q = tl.where(sub, q * 5.421010862427522e-20, q)  # 2^-64
    return _copysign(q, x)


@triton.jit
def _sign_scale(norm, cols, P, BUCKET: tl.constexpr):
    """ScaledSign's scale fp32(||x_b||_1) / fp32(len(b)) for each entry's row (BUCKET == 0: len = P) or bucket
    (the last bucket of a row may be shorter), correctly rounded like ``ScaledSign.scales``."""
    if BUCKET == 0:
        length = (P + tl.zeros_like(cols)).to(tl.float32)  # a tile: P may be specialised to a constexpr (P == 1)
    else:
        first = (cols // BUCKET) * BUCKET
        # max(.., 1) only keeps the masked lanes past P (never stored) free of 0 / 0
        length = tl.maximum(tl.minimum(P - first, BUCKET), 1).to(tl.float32)
    return tl.math.div_rn(norm, length)


@triton.jit
def _compress(x, u, norm, cols, P, s, KIND: tl.constexpr, BUCKET: tl.constexpr):
    """C(x) for fp32 ``x``: KIND 0 Identity, 1 QSGD (level * (norm / s)), 2 ScaledSign (scale if x >= 0 else
    -scale), 3 NaturalCompression; the operations of each compressor's ``compress_`` in their order."""
    if KIND == 0:
        q = x
    elif KIND == 1:
        q = _qsgd_levels(x, norm, u, s) * tl.math.div_rn(norm, s)
    elif KIND == 2:
        scale = _sign_scale(norm, cols, P, BUCKET)
        q = tl.where(x >= 0, scale, -scale)
    else:
        q = _natural(x, u)
    return q


@triton.jit
def _to_storage(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to the storage ``dtype`` with round-to-nearest-even, like torch's ``copy_``.

    For bf16 the rounding is done on the bits (add 0x7FFF plus the lowest kept bit, keep the high half), and the
    high half becomes the bf16 number by a bitcast: exact for every input, subnormals included (Triton's
    interpreter truncates fp32 -> bf16 instead of rounding, and mishandles subnormals in that conversion).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _to_fp32(x):
    """A loaded storage tile as fp32, exactly. bf16 is widened on the bits (the bf16 number is the high half of
    the fp32 one; Triton's interpreter flushes bf16 subnormals in its own conversion), other dtypes by a cast."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _upload_norm(norm_ptr, c, cols, mask, NUM_BUCKETS, BUCKET: tl.constexpr):
    """fp32 norm that scales each entry of row c: a scalar (BUCKET == 0, one norm per row) or a gathered tile."""
    if BUCKET == 0:
        norm = tl.load(norm_ptr + c)
    else:
        norm = tl.load(norm_ptr + c * NUM_BUCKETS + cols // BUCKET, mask=mask, other=0.0)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF: tl.constexpr):
    """The compressor input x of child row c at ``cols``, fp32, in the reference's order: child - parent, then
    + memory (EF == 1, "ef") or - memory (EF == 2, "ef21"). Returns (x, the memory tile; x itself without EF)."""
    x = _to_fp32(tl.load(child_ptr + c * stride_child + cols, mask=mask, other=0.0)) - xp
    if EF == 0:
        m = x
    else:
        m = tl.load(memory_ptr + c * stride_memory + cols, mask=mask, other=0.0)
        if EF == 1:
            x = x + m
        else:
            x = x - m
    return x, m


@triton.jit
def _diff_sumsq_kernel(
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
    """Pass 1: fp64 sums of squares (``L1``: of absolute values) of the compressor input x (:func:`_input`) over a
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
    xp = _to_fp32(tl.load(parent_ptr + p * stride_parent + cols, mask=mask, other=0.0))
    x, m = _input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF)
    d = x.to(tl.float64)
    if L1:
        total = tl.sum(tl.abs(d), axis=1)
    else:
        total = tl.sum(d * d, axis=1)
    tl.store(partial_ptr + k * partial_stride + j * R + tl.arange(0, R), total)


@triton.jit
def _aggregate_segments_kernel(
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
    num_col_blocks,
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
    reference and the numba kernel: x (:func:`_input`), q = C(x) (:func:`_compress`; KIND and BUCKET as there),
    then EF == 1: memory[c] = x - q, up = q; EF == 2: up = memory[c] + q, memory[c] = up; EF == 0: up = q; then
    acc += up * w_c. The sum is fp32, starting from 0 and added to the parent at the end, as in the torch
    reference; the parent is cast back to its storage dtype, ``out`` and the memory are fp32.
    """
    pid = tl.program_id(0)
    p = (pid // num_col_blocks).to(tl.int64)
    start = (pid % num_col_blocks) * BLOCK
    cols = _column_tile(start, BLOCK)
    mask = cols < P
    parent_row = parent_ptr + p * stride_parent
    xp = _to_fp32(tl.load(parent_row + cols, mask=mask, other=0.0))
    acc = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    lo = tl.load(segment_ptr + p)
    hi = tl.load(segment_ptr + p + 1)
    for i in range(lo, hi):
        k = tl.load(order_ptr + i)
        if SUBSET:
            c = tl.load(rows_ptr + k)
        else:
            c = k
        x, m = _input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF)
        if KIND == 1 or KIND == 3:  # the compressors that draw (uses_uniforms)
            u = _philox_uniforms(tl.load(seed_ptr + c), start, BLOCK)
        else:
            u = x
        if KIND == 1 or KIND == 2:  # the compressors scaled by a norm
            norm = _upload_norm(norm_ptr, k, cols, mask, NUM_BUCKETS, BUCKET)
        else:
            norm = 0.0
        q = _compress(x, u, norm, cols, P, s, KIND, BUCKET)
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
        tl.store(parent_row + cols, _to_storage(xp + acc, parent_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upload_kernel(
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
    ATOMIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per upload (child, column block): program pid handles block pid // C of child order[pid % C].

    ATOMIC=False: store the level codes sign * xi of Q(child[c] - parent[p]) into out[c] (the wire message).
    ATOMIC=True: atomically add w_c * Q(child[c] - parent[p]) (or w_c * diff without QUANTIZE) into the fp32
    accumulator out[p] (the atomic layout of pass 2).
    """
    pid = tl.program_id(0)
    c = tl.load(order_ptr + pid % C)
    p = tl.load(parent_index_ptr + c)
    start = (pid // C) * BLOCK
    cols = _column_tile(start, BLOCK)
    mask = cols < P
    xp = _to_fp32(tl.load(parent_ptr + p * stride_parent + cols, mask=mask, other=0.0))
    x = _to_fp32(tl.load(child_ptr + c * stride_child + cols, mask=mask, other=0.0)) - xp
    if QUANTIZE:
        norm = _upload_norm(norm_ptr, c, cols, mask, NUM_BUCKETS, BUCKET)
        u = _philox_uniforms(tl.load(seed_ptr + c), start, BLOCK)
        level = _qsgd_levels(x, norm, u, s)
    if ATOMIC:
        if QUANTIZE:
            q = level * tl.math.div_rn(norm, s)
        else:
            q = x
        tl.atomic_add(out_ptr + p * P + cols, q * tl.load(weight_ptr + c), mask=mask)
    else:
        tl.store(out_ptr + c * P + cols, level.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniforms_kernel(seed_ptr, out_ptr, d, num_col_blocks, BLOCK: tl.constexpr):
    """out[row, :d] = the draws of :func:`_philox_uniforms` for seed_ptr[row] (what the fused kernels use)."""
    pid = tl.program_id(0)
    row = (pid // num_col_blocks).to(tl.int64)
    start = (pid % num_col_blocks) * BLOCK
    cols = _column_tile(start, BLOCK)
    u = _philox_uniforms(tl.load(seed_ptr + row), start, BLOCK)
    tl.store(out_ptr + row * d + cols, u, mask=cols < d)


# ----------------------------------------------------------------------------------------------------------------
# Host side: validation, layout, launch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """Validated, kernel-ready view of one layer's aggregation inputs."""

    parent: Tensor  # [M, P], stride(1) == 1 (a contiguous copy of the caller's tensor if it was not)
    caller_parent: Tensor  # the caller's tensor (written back to when ``parent`` is a copy)
    child: Tensor  # [C, P], stride(1) == 1
    parent_index: Tensor  # int64 [C] on the device
    order: Tensor  # int64 [C]: child rows sorted by parent, stable
    segments: Tensor  # int64 [M + 1]: children of p are order[segments[p]:segments[p + 1]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parent.shape[0], self.child.shape[0], self.child.shape[1]


def _check_block(block: int | None) -> int:
    if block is None:
        return _DEFAULT_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (columns per program), got {block!r}")
    return block


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _prepare(parent: Tensor, child: Tensor, parent_index: Tensor, who: str) -> _Layer:
    """Validate shapes, dtypes, devices and index range; make strides kernel-friendly; sort children by parent."""
    for name, t in (("parent", parent), ("child", child), ("parent_index", parent_index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if parent.dim() != 2 or child.dim() != 2 or parent.shape[1] != child.shape[1]:
        raise ValueError(
            f"{who}: parent [M, P] and child [C, P] must be 2-D and share P; got {tuple(parent.shape)} and "
            f"{tuple(child.shape)}"
        )
    M, P = parent.shape
    C = child.shape[0]
    if P > _MAX_COLS:
        raise ValueError(
            f"{who}: P = {P} columns is unsupported by the Triton kernels (column indices are int32 Philox "
            f"counters); at most {_MAX_COLS}. Use backend='torch' for larger rows."
        )
    for name, t in (("parent", parent), ("child", child)):
        if t.dtype not in _STORAGE_DTYPES:
            raise ValueError(
                f"{who}: {name} dtype {t.dtype} is not supported; allowed storage dtypes: "
                f"{', '.join(str(d) for d in _STORAGE_DTYPES)}"
            )
    if child.device != parent.device:
        raise ValueError(f"{who}: parent is on {parent.device} but child is on {child.device}; use one device")
    if parent.device.type != "cuda" and not (parent.device.type == "cpu" and INTERPRET):
        raise RuntimeError(
            f"{who}: Triton kernels need CUDA tensors (got {parent.device}), or TRITON_INTERPRET=1 set before "
            "lightning_qmlhfl.kernels is imported to run them on CPU in Triton's interpreter; "
            "use backend='torch' otherwise"
        )
    if parent_index.shape != (C,):
        raise ValueError(f"{who}: parent_index must have shape ({C},), got {tuple(parent_index.shape)}")
    if parent_index.dtype == torch.bool or parent_index.is_floating_point() or parent_index.is_complex():
        raise ValueError(f"{who}: parent_index must be an integer tensor, got dtype {parent_index.dtype}")
    if M < 1:
        raise ValueError(f"{who}: parent must have at least one row, got shape {tuple(parent.shape)}")
    device = parent.device
    parent_index = parent_index.to(device=device, dtype=torch.int64)
    order, segments = children_by_parent(parent_index, M, who)
    # Rows may be strided (views into a bigger stack); columns must be unit-stride.
    caller_parent = parent
    if parent.stride(1) != 1 or parent.stride(0) < P:
        parent = parent.contiguous()
    if child.stride(1) != 1 or child.stride(0) < P:
        child = child.contiguous()
    return _Layer(parent, caller_parent, child, parent_index, order, segments)


def _per_row(t: Tensor, C: int, name: str, device: torch.device, dtype: torch.dtype, who: str) -> Tensor:
    if not isinstance(t, Tensor) or t.shape != (C,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{who}: {name} must be a tensor of shape ({C},), got {shape}")
    return t.to(device=device, dtype=dtype).contiguous()


def _seeds(seeds: Tensor, C: int, device: torch.device, who: str) -> Tensor:
    if not isinstance(seeds, Tensor) or seeds.shape != (C,) or seeds.dtype != torch.int64:
        desc = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"{who}: seeds must be an int64 tensor of shape ({C},) (from row_seeds), got {desc}")
    return seeds.to(device).contiguous()


def _buckets(compressor: Compressor | None, bucket_size: int | None, P: int) -> int | None:
    """The effective bucket size (None = one norm per row), with the torch reference's rule (a bucket at least as
    long as the row is the whole row). With a compressor, its own ``bucket_size`` (None for the unbucketed)."""
    if compressor is not None:
        bucket_size = compressor.bucket_size
    bad = isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1
    if bucket_size is not None and bad:
        raise ValueError(f"bucket_size must be None or an integer >= 1, got {bucket_size!r}")
    if bucket_size is None or bucket_size >= P:
        return None
    return bucket_size


@dataclass
class _Uploads:
    """The child rows that upload, grouped by parent: upload k is child row ``rows[k]`` (or k when ``rows`` is
    None: all rows upload)."""

    order: Tensor  # int64 [n]: upload positions k sorted by parent, stable (each parent keeps the order of rows)
    rows: Tensor | None  # int64 [n]: the child row of each upload; None: all C rows, upload k = child k
    segments: Tensor  # int64 [M + 1]: the uploads of p are order[segments[p]:segments[p + 1]]

    @property
    def count(self) -> int:
        return self.order.shape[0]


def _uploads(layer: _Layer, rows: Tensor | None, who: str) -> _Uploads:
    """Validate ``rows`` (int child-row indices in [0, C)) and group the uploads by parent."""
    if rows is None:
        return _Uploads(layer.order, None, layer.segments)
    M, C, _ = layer.shape
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype == torch.bool or rows.is_floating_point() \
            or rows.is_complex():
        desc = f"{tuple(rows.shape)} {rows.dtype}" if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{who}: rows must be a 1-D integer tensor of child row indices, got {desc}")
    rows = rows.to(device=layer.parent.device, dtype=torch.int64).contiguous()
    if rows.numel():
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= C:  # the kernels index without bounds checks
            raise ValueError(f"{who}: rows must index the {C} child rows [0, {C - 1}], got values in [{lo}, {hi}]")
    order, segments = children_by_parent(layer.parent_index[rows], M, who)
    return _Uploads(order, rows, segments)


def _state(t: object, shape: tuple[int, int], name: str, device: torch.device, who: str) -> Tensor:
    """A float32 [rows, P] tensor the kernel writes (``memory``, ``out``): validated, and a contiguous copy
    (written back by the caller) when its columns are not unit-stride."""
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device:
        desc = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
        raise ValueError(f"{who}: {name} must be a float32 tensor of shape {list(shape)} on {device}, got {desc}")
    if t.stride(1) != 1 or t.stride(0) < shape[1]:
        t = t.contiguous()
    return t


def _norms(layer: _Layer, bucket_size: int | None, block: int, uploads: _Uploads | None = None,
           memory: Tensor | None = None, ef: int = 0, l1: bool = False) -> Tensor:
    """Pass 1: float32 [n, buckets] norms of the compressor inputs x of the n uploads (default: all C rows, in
    child order; else in the order of ``uploads.rows``): L2 (or L1 with ``l1``), whole row when bucket_size is
    None. x = child - parent, + memory (ef 1) or - memory (ef 2)."""
    M, C, P = layer.shape
    uploads = uploads if uploads is not None else _Uploads(layer.order, None, layer.segments)
    n = uploads.count
    device = layer.parent.device
    if P == 0:  # empty rows have norm 0, one "bucket", as in the torch reference
        return torch.zeros(n, 1, dtype=torch.float32, device=device)
    bucket = P if bucket_size is None else bucket_size
    nb = -(-P // bucket)
    if n == 0:
        return torch.zeros(n, nb, dtype=torch.float32, device=device)
    if bucket <= block:  # several whole buckets per program, one tile row each
        W = triton.next_power_of_2(bucket)
        R = min(block // W, triton.next_power_of_2(nb))
        blocks_per_bucket = 1
        num_col = -(-nb // R)
    else:  # a bucket spans several programs; the host adds their partial sums
        W, R = block, 1
        blocks_per_bucket = -(-bucket // block)
        num_col = nb * blocks_per_bucket
    if n * num_col > _MAX_PROGRAMS:
        raise ValueError(f"{n} rows x {num_col} column blocks exceed the launch grid; use a larger block")
    partial = torch.empty(n, num_col * R, dtype=torch.float64, device=device)
    subset = uploads.rows is not None
    _diff_sumsq_kernel[(n * num_col,)](
        layer.parent,
        layer.child,
        uploads.order,
        uploads.rows if subset else uploads.order,  # unused without a subset
        layer.parent_index,
        memory if ef else partial,  # unused without error feedback
        partial,
        n,
        P,
        layer.parent.stride(0),
        layer.child.stride(0),
        memory.stride(0) if ef else 0,
        bucket,
        blocks_per_bucket,
        num_col * R,
        R=R,
        W=W,
        EF=ef,
        L1=l1,
        SUBSET=subset,
        num_warps=_num_warps(R * W),
        enable_fp_fusion=False,
    )
    sums = partial[:, : nb * blocks_per_bucket].reshape(n, nb, blocks_per_bucket).sum(dim=2)
    return (sums if l1 else sums.sqrt_()).to(torch.float32)


def _writeback(layer: _Layer) -> None:
    if layer.parent.data_ptr() != layer.caller_parent.data_ptr():
        layer.caller_parent.copy_(layer.parent)


@torch.no_grad()
def row_norms_triton(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    bucket_size: int | None = None,
    *,
    block: int | None = None,
) -> Tensor:
    """L2 norms of ``child[c] - parent[parent_index[c]]`` per row, or per bucket of ``bucket_size`` columns.

    ``parent`` [M, P], ``child`` [C, P] (fp32/fp16/bf16/fp64 storage), ``parent_index`` int [C].
    Returns float32 [C, buckets] (buckets = 1 without bucketing or when bucket_size >= P), equal to
    ``quantizers.row_norms(child.float() - parent.float()[parent_index], bucket_size)`` to fp32 rounding.
    The difference is never materialised; squares are summed in fp64.
    """
    block = _check_block(block)
    layer = _prepare(parent, child, parent_index, "row_norms_triton")
    return _norms(layer, _buckets(None, bucket_size, layer.shape[2]), block)


def supports(parent: Tensor, child: Tensor, compressor: Compressor, memory: Tensor | None = None,
             rows: Tensor | None = None, out: Tensor | None = None, layout: str = "segments") -> bool:
    """Whether :func:`aggregate_layer_triton_` implements this request (the dispatcher's question; devices are
    its concern). Storage (parent, child) fp32/fp16/bf16; fp64 storage is left to the torch reference, which
    computes it in fp64 (the kernels would in fp32).

    ``layout="segments"`` (the default): Identity, QSGD and ScaledSign (whole-row or bucketed) and
    NaturalCompression, each with error feedback None, "ef" or "ef21" (the memory float32), over all child rows
    or a subset ``rows``, adding into the parents or writing the aggregate to ``out`` (float32).
    ``layout="atomic"``: QSGD and Identity without error feedback, all rows, adding into the parents."""
    if parent.dtype not in _STORAGE_DTYPES or child.dtype not in _STORAGE_DTYPES:
        return False
    if torch.float64 in (parent.dtype, child.dtype):
        return False
    if layout == "atomic":
        return (type(compressor) in _ATOMIC_KINDS and compressor.error_feedback is None and rows is None
                and out is None)
    if layout != "segments" or type(compressor) not in KINDS:
        return False
    if compressor.error_feedback is not None and memory is not None and memory.dtype != torch.float32:
        return False
    return out is None or out.dtype == torch.float32


@torch.no_grad()
def aggregate_layer_triton_(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    weights: Tensor,
    quantizer: Compressor,
    seeds: Tensor,
    *,
    memory: Tensor | None = None,
    rows: Tensor | None = None,
    out: Tensor | None = None,
    layout: str = "segments",
    block: int | None = None,
) -> Tensor:
    """Eq. 4/6 for all parents of one layer, the Triton twin of ``aggregate_layer_torch_`` (the semantics are
    :func:`lightning_qmlhfl.kernels.aggregate_layer_`'s; the operations and their order in the module docstring).

    ``parent`` [M, P] and ``child`` [C, P] in fp32/fp16/bf16 (fp64 also accepted; arithmetic is fp32),
    ``parent_index`` int [C] (children need not be grouped by parent), ``weights`` float [C] (|C(c)| / |C(p)|),
    ``quantizer`` the layer's compressor (what :func:`supports` lists), ``seeds`` int64 [C] from ``row_seeds``
    (read only by the compressors that draw). ``memory`` float32 [C, P]: the error-feedback rows, updated in
    place (needed with ``quantizer.error_feedback``). ``rows``: int indices of the child rows that upload (the
    others are not read and their memory is not touched); default all. ``out`` float32 [M, P]: receives the
    aggregate sum_c w_c up_c (zero for parents without uploads) and the parent is left as it is; default: the
    aggregate is added into ``parent``.

    Returns float32 [len(rows), buckets] upload norms (L1 for ScaledSign, else L2), in the order of ``rows``. If
    one is NaN/Inf, nothing (parent, memory, out) is written.

    ``layout``: "segments" (default, deterministic, everything above) or "atomic" (QSGD and Identity without
    error feedback, all rows, adding into the parents; see the module docstring).
    ``block``: columns per program, a power of two >= 16 (default 1024).
    With the draws of :func:`triton_uniforms`, the result equals ``aggregate_layer_torch_`` on CPU element for
    element (fp32 products are not fused into FMAs, divisions are correctly rounded, children are summed in the
    same order); on GPU the torch reference itself differs by an ulp (it multiplies by 1/s and sums with
    atomics), so compare there with a relative tolerance of ~1e-6 of the update.
    """
    who = "aggregate_layer_triton_"
    if not isinstance(quantizer, Compressor):
        raise TypeError(f"{who}: quantizer must be a Compressor, got {quantizer!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {_LAYOUTS}, got {layout!r}")
    if type(quantizer) not in KINDS:
        raise ValueError(f"{who}: implements {', '.join(k.__name__ for k in KINDS)}; got {quantizer!r}; "
                         f"use the torch backend")
    ef = EF_MODES[quantizer.error_feedback]
    if layout == "atomic" and (type(quantizer) not in _ATOMIC_KINDS or ef or rows is not None or out is not None):
        raise ValueError(f"{who}: layout='atomic' implements QSGD and Identity without error feedback, over all rows, "
                         f"adding into the parents; got {quantizer!r}{' with rows' if rows is not None else ''}"
                         f"{' with out=' if out is not None else ''}; use layout='segments'")
    block = _check_block(block)
    layer = _prepare(parent, child, parent_index, who)
    M, C, P = layer.shape
    device = layer.parent.device
    weights = _per_row(weights, C, "weights", device, torch.float32, who)
    if ef and memory is None:
        raise ValueError(f"{who}: {quantizer!r} needs its memory [{C}, {P}], got None")
    mem = _state(memory, (C, P), "memory", device, who) if ef else None
    acc_out = _state(out, (M, P), "out", device, who) if out is not None else None
    uploads = _uploads(layer, rows, who)
    draws = quantizer.uses_uniforms
    seeds = _seeds(seeds, C, device, who) if draws else weights  # an unused placeholder pointer without draws
    bucket = _buckets(quantizer, None, P)
    norms = _norms(layer, bucket, block, uploads, mem, ef, quantizer.norm == "l1")
    if P == 0:
        return norms
    if uploads.count == 0:  # nothing uploads: the aggregate is zero
        if out is not None:
            out.zero_()
        return norms
    if not bool(torch.isfinite(norms).all()):
        return norms
    num_buckets = norms.shape[1]
    s = float(quantizer.levels) if isinstance(quantizer, QSGD) else 1.0
    bucket_const = 0 if bucket is None else bucket
    num_col = triton.cdiv(P, block)
    if layout == "segments":
        if M * num_col > _MAX_PROGRAMS:
            raise ValueError(
                f"{who}: {M} parents x {num_col} column blocks exceed the launch grid; use a larger block"
            )
        subset = uploads.rows is not None
        _aggregate_segments_kernel[(M * num_col,)](
            layer.parent,
            layer.child,
            uploads.order,
            uploads.rows if subset else uploads.order,  # unused without a subset
            uploads.segments,
            weights,
            seeds,
            norms,
            mem if ef else weights,  # unused without error feedback
            acc_out if out is not None else weights,  # unused without out
            P,
            layer.parent.stride(0),
            layer.child.stride(0),
            mem.stride(0) if ef else 0,
            acc_out.stride(0) if out is not None else 0,
            num_col,
            s,
            num_buckets,
            BUCKET=bucket_const,
            KIND=KINDS[type(quantizer)],
            EF=ef,
            SUBSET=subset,
            WRITE_OUT=out is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
            enable_fp_fusion=False,
        )
        if ef and mem is not memory:
            memory.copy_(mem)
        if out is not None:
            if acc_out is not out:
                out.copy_(acc_out)
            return norms
    else:
        if C * num_col > _MAX_PROGRAMS:
            raise ValueError(
                f"{who}: {C} children x {num_col} column blocks exceed the launch grid; use a larger block"
            )
        acc = torch.zeros(M, P, dtype=torch.float32, device=device)
        _upload_kernel[(C * num_col,)](
            layer.parent,
            layer.child,
            layer.order,
            layer.parent_index,
            weights,
            seeds,
            norms,
            acc,
            C,
            P,
            layer.parent.stride(0),
            layer.child.stride(0),
            s,
            num_buckets,
            BUCKET=bucket_const,
            QUANTIZE=not quantizer.is_identity,
            ATOMIC=True,
            BLOCK=block,
            num_warps=_num_warps(block),
            enable_fp_fusion=False,
        )
        layer.parent.copy_(layer.parent.to(torch.float32).add_(acc))
    _writeback(layer)
    return norms


@torch.no_grad()
def encode_uploads_triton(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    quantizer: Quantizer,
    seeds: Tensor,
    *,
    block: int | None = None,
) -> Encoded:
    """The wire messages Q(child[c] - parent[parent_index[c]]) of one aggregation event, for bit accounting/tests.

    QSGD: ``Encoded(norms float32 [C, buckets], levels [C, P] of ``quantizer.code_dtype``)``, drawn with the same
    random numbers as :func:`aggregate_layer_triton_` (so ``quantizer.decode`` of it is exactly what the fused
    kernel adds). NoQuantization: norms and the fp32 differences in ``values``, like ``encode_uploads``.
    """
    who = "encode_uploads_triton"
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"{who}: quantizer must be a Quantizer (QSGD or NoQuantization), got {quantizer!r}")
    block = _check_block(block)
    layer = _prepare(parent, child, parent_index, who)
    M, C, P = layer.shape
    device = layer.parent.device
    bucket = _buckets(quantizer, None, P)
    norms = _norms(layer, bucket, block)
    if quantizer.is_identity:
        diff = layer.child.to(torch.float32) - layer.parent.to(torch.float32)[layer.parent_index]
        return Encoded(norms=norms, levels=None, values=diff)
    if not isinstance(quantizer, QSGD):
        raise TypeError(f"{who}: the Triton kernels implement QSGD and NoQuantization, got {quantizer!r}")
    seeds = _seeds(seeds, C, device, who)
    levels = torch.zeros(C, P, dtype=quantizer.code_dtype, device=device)
    if C == 0 or P == 0:
        return Encoded(norms=norms, levels=levels)
    num_col = triton.cdiv(P, block)
    if C * num_col > _MAX_PROGRAMS:
        raise ValueError(f"{who}: {C} rows x {num_col} column blocks exceed the launch grid; use a larger block")
    _upload_kernel[(C * num_col,)](
        layer.parent,
        layer.child,
        layer.order,
        layer.parent_index,
        norms,  # weights: unused when ATOMIC=False
        seeds,
        norms,
        levels,
        C,
        P,
        layer.parent.stride(0),
        layer.child.stride(0),
        float(quantizer.levels),
        norms.shape[1],
        BUCKET=0 if bucket is None else bucket,
        QUANTIZE=True,
        ATOMIC=False,
        BLOCK=block,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return Encoded(norms=norms, levels=levels)


@torch.no_grad()
def triton_uniforms(
    seeds: Tensor, d: int, device: torch.device | str | None = None, *, block: int | None = None
) -> Tensor:
    """float32 [len(seeds), d]: the exact U[0, 1) draws the fused kernels use for row i with seed ``seeds[i]``.

    Feed them to ``aggregate_layer_torch_(..., uniforms=...)`` or ``QSGD.encode(..., uniforms=...)`` to reproduce
    the kernels' numbers with the torch reference. The draws do not depend on ``block``. On CPU this needs
    TRITON_INTERPRET=1 (set before import).
    """
    block = _check_block(block)
    if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > _MAX_COLS:
        raise ValueError(f"triton_uniforms: d must be an integer in [0, {_MAX_COLS}], got {d!r}")
    if not isinstance(seeds, Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64:
        desc = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"triton_uniforms: seeds must be a 1-D int64 tensor (from row_seeds), got {desc}")
    device = torch.device(device) if device is not None else seeds.device
    if device.type != "cuda" and not (device.type == "cpu" and INTERPRET):
        raise RuntimeError(
            f"triton_uniforms: needs a CUDA device (got {device}) or TRITON_INTERPRET=1 set before import"
        )
    seeds = seeds.to(device).contiguous()
    rows = seeds.shape[0]
    out = torch.empty(rows, d, dtype=torch.float32, device=device)
    if rows == 0 or d == 0:
        return out
    num_col = triton.cdiv(d, block)
    _uniforms_kernel[(rows * num_col,)](
        seeds, out, d, num_col, BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False
    )
    return out
