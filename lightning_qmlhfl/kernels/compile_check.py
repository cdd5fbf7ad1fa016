"""Compile every kernel variant for a CUDA target without a GPU, and summarise the PTX.

    python -m lightning_qmlhfl.kernels.compile_check            # sm_90 (H100/H200)
    python -m lightning_qmlhfl.kernels.compile_check --arch 80  # A100

CI has no GPU, so the tests run the kernels in Triton's interpreter, which accepts programs the GPU compiler
would reject (and vice versa for a few constructs). This compiles the real GPU path ahead of time (Triton ships
ptxas) so such errors surface on a CPU-only machine, and checks four properties of the generated PTX that the
numerics rely on or that matter for bandwidth: no fused multiply-adds in fp32 (results equal the torch reference
on CPU), correctly rounded divisions (``div.rn``), no flush-to-zero of fp32 subnormals (``ftz_f32``: the
``.ftz`` instructions other than floor's ``cvt.rmi.ftz``, which is exact for the non-negative numbers QSGD floors;
NaturalCompression and the EF memory keep subnormal entries exactly), and 128-bit vector loads when P is a
multiple of 16.

The variants cover every compressor of the segmented kernel (KIND: Identity, QSGD, ScaledSign, NaturalCompression;
whole-row and bucketed), each error-feedback mode (EF), a rows subset (SUBSET: uploads indexed through ``rows``)
and ``out=`` (WRITE_OUT), for each storage width, plus the norm pass (L2 and L1, with EF memory), the atomic
layout, the encoder and the uniforms. Must run with TRITON_INTERPRET unset (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

_PTR_OR_INT_ALIGNED = {"parent_ptr", "child_ptr", "order_ptr", "rows_ptr", "segment_ptr", "parent_index_ptr",
                       "weight_ptr", "seed_ptr", "norm_ptr", "memory_ptr", "out_ptr", "partial_ptr", "P",
                       "stride_parent", "stride_child", "stride_memory", "stride_out", "d", "bucket",
                       "partial_stride"}
# What the tests compile (--quick): one variant per kernel and storage width, and one per new compressor and
# feature of the segmented kernel (the full list is every variant below).
QUICK = ("segments fp32 qsgd bucket=0", "segments bf16 qsgd bucket=100", "segments fp32 sign bucket=64",
         "segments fp32 natural", "segments fp32 qsgd bucket=0 ef", "segments fp32 identity ef21 out",
         "segments fp32 qsgd bucket=100 ef21 rows", "upload atomic bf16 bucket=64", "encode fp16 int16",
         "sumsq whole-row", "sumsq l1 buckets ef rows", "uniforms")
_KIND_NAMES = {0: "identity", 1: "qsgd", 2: "sign", 3: "natural"}
_EF_NAMES = {0: "", 1: " ef", 2: " ef21"}


def _segments_name(storage: str, kind: int, bucket: int, ef: int, subset: bool, write_out: bool) -> str:
    name = f"segments {storage} {_KIND_NAMES[kind]}" + (f" bucket={bucket}" if kind in (1, 2) else "")
    return name + _EF_NAMES[ef] + (" rows" if subset else "") + (" out" if write_out else "")


def _variants():
    from . import triton_kernels as qa

    seg = ["parent_ptr", "child_ptr", "order_ptr", "rows_ptr", "segment_ptr", "weight_ptr", "seed_ptr", "norm_ptr",
           "memory_ptr", "out_ptr", "P", "stride_parent", "stride_child", "stride_memory", "stride_out", "s",
           "NUM_BUCKETS"]
    up = ["parent_ptr", "child_ptr", "order_ptr", "parent_index_ptr", "weight_ptr", "seed_ptr", "norm_ptr",
          "out_ptr", "C", "P", "stride_parent", "stride_child", "s", "NUM_BUCKETS"]
    enc = [n for n in up if n != "weight_ptr"]
    sq = ["parent_ptr", "child_ptr", "order_ptr", "rows_ptr", "parent_index_ptr", "memory_ptr", "partial_ptr", "C",
          "P", "stride_parent", "stride_child", "stride_memory", "bucket", "blocks_per_bucket", "partial_stride"]

    def types(names, storage, out="*fp32"):
        t = {"parent_ptr": storage, "child_ptr": storage, "order_ptr": "*i64", "rows_ptr": "*i64",
             "segment_ptr": "*i64", "parent_index_ptr": "*i64", "weight_ptr": "*fp32", "seed_ptr": "*i64",
             "norm_ptr": "*fp32", "memory_ptr": "*fp32", "out_ptr": out, "partial_ptr": "*fp64", "s": "fp32"}
        return {n: t.get(n, "i32") for n in names}

    def segments(storage, kind, bucket=0, ef=0, subset=False, write_out=False):
        return (_segments_name(storage[1:], kind, bucket, ef, subset, write_out), qa.aggregate_segments_kernel,
                types(seg, storage), {"BUCKET": bucket, "KIND": kind, "EF": ef, "SUBSET": subset,
                                      "WRITE_OUT": write_out, "BLOCK": 1024})

    for storage in ("*fp32", "*fp16", "*bf16"):
        for kind, bucket in ((1, 0), (1, 100), (0, 0), (2, 0), (2, 64), (3, 0)):
            yield segments(storage, kind, bucket)
    for ef in (1, 2):  # error feedback, a rows subset and out=, each compressor, fp32 (the memory is fp32)
        for kind, bucket in ((1, 0), (1, 100), (0, 0), (2, 64), (3, 0)):
            yield segments("*fp32", kind, bucket, ef)
    yield segments("*fp32", 1, 100, ef=2, subset=True)
    yield segments("*fp32", 0, 0, ef=2, write_out=True)
    yield segments("*fp32", 2, 64, ef=1, subset=True, write_out=True)
    yield segments("*bf16", 3, 0, ef=2, subset=True, write_out=True)
    yield segments("*fp16", 1, 0, subset=True, write_out=True)
    yield ("upload atomic bf16 bucket=64", qa.atomic_upload_kernel, types(up, "*bf16"),
           {"BUCKET": 64, "QUANTIZE": True, "BLOCK": 1024})
    yield ("upload atomic fp32 identity", qa.atomic_upload_kernel, types(up, "*fp32"),
           {"BUCKET": 0, "QUANTIZE": False, "BLOCK": 1024})
    yield ("encode fp16 int16", qa.encode_kernel, types(enc, "*fp16", out="*i16"), {"BUCKET": 0, "BLOCK": 1024})
    norm_pass = {"EF": 0, "L1": False, "SUBSET": False}
    yield ("sumsq whole-row", qa.diff_sumsq_kernel, types(sq, "*bf16"), {"R": 1, "W": 1024, **norm_pass})
    yield ("sumsq buckets", qa.diff_sumsq_kernel, types(sq, "*fp32"), {"R": 8, "W": 128, **norm_pass})
    yield ("sumsq l1 buckets ef rows", qa.diff_sumsq_kernel, types(sq, "*fp32"),
           {"R": 16, "W": 64, "EF": 1, "L1": True, "SUBSET": True})
    yield ("sumsq whole-row ef21 fp16", qa.diff_sumsq_kernel, types(sq, "*fp16"),
           {"R": 1, "W": 1024, "EF": 2, "L1": False, "SUBSET": False})
    yield ("uniforms", qa.uniforms_kernel, {"seed_ptr": "*i64", "out_ptr": "*fp32", "d": "i32",
                                              "num_col_blocks": "i32"}, {"BLOCK": 1024})


def check(arch: int = 90, warp_size: int = 32, only: tuple[str, ...] | None = None) -> list[dict]:
    """Compile the variants (all, or those named in ``only``) for ``cuda:arch``; one summary dict per variant.

    Compile errors propagate. Integer and pointer arguments are declared 16-divisible, as Triton specializes
    them at launch when P (the row length and stride) is a multiple of 16.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, warp_size)
    variants = list(_variants())
    unknown = sorted(set(only or ()) - {v[0] for v in variants})
    if unknown:
        raise ValueError(f"unknown kernel variants {unknown}; the variants are {[v[0] for v in variants]}")
    out = []
    for name, fn, signature, constexprs in variants:
        if only is not None and name not in only:
            continue
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        order = list(fn.arg_names)
        attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in signature if n in _PTR_OR_INT_ALIGNED}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": False})
        ptx = kernel.asm["ptx"]
        out.append({
            "variant": name,
            "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "div_rn_f32": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
            "div_approx": len(re.findall(r"\bdiv\.(?:full|approx)\.f32\b", ptx)),
            # floor is cvt.rmi.ftz: it flushes a subnormal input, whose floor is 0 anyway (QSGD floors only
            # numbers >= 0), so it is counted apart from the instructions whose results would change
            "ftz_f32": len(re.findall(r"\.ftz\.f32\b", ptx)) - len(re.findall(r"\bcvt\.rmi\.ftz\.f32\b", ptx)),
            "floor_ftz": len(re.findall(r"\bcvt\.rmi\.ftz\.f32\b", ptx)),
            "ld_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32\b", ptx)),
            "ld_v2": len(re.findall(r"\bld\.global(?:\.\w+)*\.v2\.b32\b", ptx)),
            "bar_sync": len(re.findall(r"\bbar\.sync\b", ptx)),
        })
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--quick", action="store_true", help="the QUICK variants (what the tests compile)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    rows = check(args.arch, only=QUICK if args.quick else None)
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['variant']:<45} " + " ".join(f"{k}={v}" for k, v in r.items() if k != "variant"))


if __name__ == "__main__":
    main()
