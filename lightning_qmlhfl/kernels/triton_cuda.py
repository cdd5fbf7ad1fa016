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

1. ``diff_sumsq_kernel``: per (row, bucket, column block), fp64 sums of squares (absolute values for
   ScaledSign's L1 norm) of the compressor input x, written as small partials (one fp64 per 4 KB of data read)
   that the host reduces (and square-roots for L2). Nothing of size [C, P] is written. fp64 accumulation (the
   square of an fp32 number is exact in fp64, and fp64 neither overflows at 1e30**2 * 1e7 nor underflows at
   1e-30**2) is what the torch reference does, so the norms agree to fp32 rounding, i.e. are identical except
   when the two fp64 sums (different orders) round to different fp32 numbers, a chance of about 1e-8 per norm.
   Identity and NaturalCompression need no norm; their L2 norms are computed all the same, to catch NaN/Inf.
2. Between the launches the host checks that all norms are finite; if one is not, nothing (parent, memory,
   ``out``) is written and the norms are returned (the engine names the layer, node and round). This costs one
   sync per call.
3. ``aggregate_segments_kernel``: forms x again, compresses it with counter-based random numbers, updates the
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

import torch
import triton
from torch import Tensor

from ..compressors import Compressor, Encoded, Kind
from ..compressors.base import fused_compressor_names
from .interface import AggregationRequest, KernelBackend
from .triton_host import (INTERPRET, MAX_COLS, MAX_PROGRAMS, STORAGE_DTYPES, bucket_length,
                          check_block, gather_uploads, per_row, prepare, row_norms_triton, seeds_tensor, state_tensor,
                          upload_norms, warps_for, write_back)
from .triton_kernels import (aggregate_segments_autotuned, aggregate_segments_kernel, atomic_upload_kernel,
                             encode_kernel, uniforms_kernel)

__all__ = ["INTERPRET", "supports", "aggregate_layer_triton_", "encode_uploads_triton", "row_norms_triton",
           "triton_uniforms", "TritonBackend"]

_LAYOUTS = ("segments", "atomic")
_ATOMIC_KINDS = (Kind.IDENTITY, Kind.QSGD)
_MIN_TUNED_BLOCK = 512  # the smallest block the autotuner tries (SEGMENT_CONFIGS)


def supports(parent: Tensor, child: Tensor, compressor: Compressor, memory: Tensor | None = None,
             rows: Tensor | None = None, out: Tensor | None = None, layout: str = "segments") -> bool:
    """Whether :func:`aggregate_layer_triton_` implements this request (the dispatcher's question; devices are
    its concern). Storage (parent, child) fp32/fp16/bf16; fp64 storage is left to the torch reference, which
    computes it in fp64 (the kernels would in fp32).

    ``layout="segments"`` (the default): Identity, QSGD and ScaledSign (whole-row or bucketed) and
    NaturalCompression, each with error feedback None, "ef" or "ef21" (the memory float32), over all child rows
    or a subset ``rows``, adding into the parents or writing the aggregate to ``out`` (float32).
    ``layout="atomic"``: QSGD and Identity without error feedback, all rows, adding into the parents."""
    if parent.dtype not in STORAGE_DTYPES or child.dtype not in STORAGE_DTYPES:
        return False
    if torch.float64 in (parent.dtype, child.dtype):
        return False
    spec = compressor.fused_spec()
    if spec is None:
        return False
    if layout == "atomic":
        return spec.kind in _ATOMIC_KINDS and not spec.error_feedback and rows is None and out is None
    if layout != "segments":
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
    spec = quantizer.fused_spec()
    if spec is None:
        raise ValueError(f"{who}: implements {', '.join(fused_compressor_names())}; got {quantizer!r}; use the torch "
                         f"backend")
    ef = spec.error_feedback
    if layout == "atomic" and (spec.kind not in _ATOMIC_KINDS or ef or rows is not None or out is not None):
        raise ValueError(f"{who}: layout='atomic' implements QSGD and Identity without error feedback, over all rows, "
                         f"adding into the parents; got {quantizer!r}{' with rows' if rows is not None else ''}"
                         f"{' with out=' if out is not None else ''}; use layout='segments'")
    block_given = block
    block = check_block(block)
    layer = prepare(parent, child, parent_index, who)
    M, C, P = layer.shape
    device = layer.parent.device
    weights = per_row(weights, C, "weights", device, torch.float32, who)
    if ef and memory is None:
        raise ValueError(f"{who}: {quantizer!r} needs its memory [{C}, {P}], got None")
    mem = state_tensor(memory, (C, P), "memory", device, who) if ef else None
    acc_out = state_tensor(out, (M, P), "out", device, who) if out is not None else None
    uploads = gather_uploads(layer, rows, who)
    draws = quantizer.uses_uniforms
    seeds = seeds_tensor(seeds, C, device, who) if draws else weights  # an unused placeholder pointer without draws
    bucket = bucket_length(quantizer, None, P)
    norms = upload_norms(layer, bucket, block, uploads, mem, ef, quantizer.norm == "l1")
    if P == 0:
        return norms
    if uploads.count == 0:  # nothing uploads: the aggregate is zero
        if out is not None:
            out.zero_()
        return norms
    if not bool(torch.isfinite(norms).all()):
        return norms
    num_buckets = norms.shape[1]
    s = spec.levels
    bucket_const = 0 if bucket is None else bucket
    num_col = triton.cdiv(P, block)
    if layout == "segments":
        if M * triton.cdiv(P, min(block, _MIN_TUNED_BLOCK)) > MAX_PROGRAMS:
            raise ValueError(
                f"{who}: {M} parents x {num_col} column blocks exceed the launch grid; use a larger block"
            )
        subset = uploads.rows is not None
        tuned = block_given is None and not INTERPRET
        launch = {} if tuned else {"BLOCK": block, "num_warps": warps_for(block)}
        kernel = aggregate_segments_autotuned if tuned else aggregate_segments_kernel
        kernel[lambda meta: (M * triton.cdiv(P, meta["BLOCK"]),)](
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
            s,
            num_buckets,
            BUCKET=bucket_const,
            KIND=int(spec.kind),
            EF=ef,
            SUBSET=subset,
            WRITE_OUT=out is not None,
            enable_fp_fusion=False,
            **launch,
        )
        if ef and mem is not memory:
            memory.copy_(mem)
        if out is not None:
            if acc_out is not out:
                out.copy_(acc_out)
            return norms
    else:
        if C * num_col > MAX_PROGRAMS:
            raise ValueError(
                f"{who}: {C} children x {num_col} column blocks exceed the launch grid; use a larger block"
            )
        acc = torch.zeros(M, P, dtype=torch.float32, device=device)
        atomic_upload_kernel[(C * num_col,)](
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
            QUANTIZE=spec.kind != Kind.IDENTITY,
            BLOCK=block,
            num_warps=warps_for(block),
            enable_fp_fusion=False,
        )
        layer.parent.copy_(layer.parent.to(torch.float32).add_(acc))
    write_back(layer)
    return norms


@torch.no_grad()
def encode_uploads_triton(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    quantizer: Compressor,
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
    if not isinstance(quantizer, Compressor):
        raise TypeError(f"{who}: quantizer must be a Compressor (QSGD or Identity), got {quantizer!r}")
    spec = quantizer.fused_spec()
    block = check_block(block)
    layer = prepare(parent, child, parent_index, who)
    M, C, P = layer.shape
    device = layer.parent.device
    bucket = bucket_length(quantizer, None, P)
    norms = upload_norms(layer, bucket, block)
    if quantizer.is_identity:
        diff = layer.child.to(torch.float32) - layer.parent.to(torch.float32)[layer.parent_index]
        return Encoded(norms=norms, levels=None, values=diff)
    if spec is None or spec.kind != Kind.QSGD:
        raise TypeError(f"{who}: the Triton kernels encode QSGD and Identity uploads, got {quantizer!r}")
    seeds = seeds_tensor(seeds, C, device, who)
    levels = torch.zeros(C, P, dtype=quantizer.code_dtype, device=device)
    if C == 0 or P == 0:
        return Encoded(norms=norms, levels=levels)
    num_col = triton.cdiv(P, block)
    if C * num_col > MAX_PROGRAMS:
        raise ValueError(f"{who}: {C} rows x {num_col} column blocks exceed the launch grid; use a larger block")
    encode_kernel[(C * num_col,)](
        layer.parent,
        layer.child,
        layer.order,
        layer.parent_index,
        seeds,
        norms,
        levels,
        C,
        P,
        layer.parent.stride(0),
        layer.child.stride(0),
        spec.levels,
        norms.shape[1],
        BUCKET=0 if bucket is None else bucket,
        BLOCK=block,
        num_warps=warps_for(block),
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
    block = check_block(block)
    if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > MAX_COLS:
        raise ValueError(f"triton_uniforms: d must be an integer in [0, {MAX_COLS}], got {d!r}")
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
    uniforms_kernel[(rows * num_col,)](
        seeds, out, d, num_col, BLOCK=block, num_warps=warps_for(block), enable_fp_fusion=False
    )
    return out


class TritonBackend(KernelBackend):
    """The fused kernels on CUDA tensors (or Triton's CPU interpreter), segments layout, what :func:`supports`
    lists."""

    name = "triton"

    def supports(self, request: AggregationRequest) -> bool:
        r = request
        on_device = r.parent.is_cuda or (r.parent.device.type == "cpu" and INTERPRET)
        return on_device and supports(r.parent, r.child, r.compressor, r.memory, r.rows, r.out)

    def run(self, request: AggregationRequest) -> Tensor:
        r = request
        return aggregate_layer_triton_(r.parent, r.child, r.parent_index, r.weights, r.compressor, r.seeds,
                                       memory=r.memory, rows=r.rows, out=r.out)
