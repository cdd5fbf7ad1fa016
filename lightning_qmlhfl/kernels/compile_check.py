"""Compile every kernel variant for a CUDA target without a GPU, and summarise the PTX.

    python -m lightning_qmlhfl.kernels.compile_check            # sm_90 (H100/H200)
    python -m lightning_qmlhfl.kernels.compile_check --arch 80  # A100

CI has no GPU, so the tests run the kernels in Triton's interpreter, which accepts programs the GPU compiler
would reject (and vice versa for a few constructs). This compiles the real GPU path ahead of time (Triton ships
ptxas) so such errors surface on a CPU-only machine, and checks three properties of the generated PTX that the
numerics rely on or that matter for bandwidth: no fused multiply-adds in fp32 (results equal the torch reference
on CPU), correctly rounded divisions (``div.rn``), and 128-bit vector loads when P is a multiple of 16.
Must run with TRITON_INTERPRET unset (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

_PTR_OR_INT_ALIGNED = {"parent_ptr", "child_ptr", "order_ptr", "segment_ptr", "parent_index_ptr", "weight_ptr",
                       "seed_ptr", "norm_ptr", "out_ptr", "partial_ptr", "P", "stride_parent", "stride_child", "d",
                       "bucket", "partial_stride"}
# One variant per kernel and storage width: what the tests compile (the full list takes ~15 s).
QUICK = ("segments fp32 bucket=0 quantize=True", "segments bf16 bucket=100 quantize=True",
         "upload atomic bf16 bucket=64", "encode fp16 int16", "sumsq whole-row", "uniforms")


def _variants():
    from . import triton_cuda as qa

    seg = ["parent_ptr", "child_ptr", "order_ptr", "segment_ptr", "weight_ptr", "seed_ptr", "norm_ptr", "P",
           "stride_parent", "stride_child", "num_col_blocks", "s", "NUM_BUCKETS"]
    up = ["parent_ptr", "child_ptr", "order_ptr", "parent_index_ptr", "weight_ptr", "seed_ptr", "norm_ptr",
          "out_ptr", "C", "P", "stride_parent", "stride_child", "s", "NUM_BUCKETS"]
    sq = ["parent_ptr", "child_ptr", "order_ptr", "parent_index_ptr", "partial_ptr", "C", "P", "stride_parent",
          "stride_child", "bucket", "blocks_per_bucket", "partial_stride"]

    def types(names, storage, out="*fp32"):
        t = {"parent_ptr": storage, "child_ptr": storage, "order_ptr": "*i64", "segment_ptr": "*i64",
             "parent_index_ptr": "*i64", "weight_ptr": "*fp32", "seed_ptr": "*i64", "norm_ptr": "*fp32",
             "out_ptr": out, "partial_ptr": "*fp64", "s": "fp32"}
        return {n: t.get(n, "i32") for n in names}

    for storage in ("*fp32", "*fp16", "*bf16"):
        for bucket, quantize in ((0, True), (100, True), (0, False)):
            yield (f"segments {storage[1:]} bucket={bucket} quantize={quantize}", qa._aggregate_segments_kernel,
                   types(seg, storage), {"BUCKET": bucket, "QUANTIZE": quantize, "BLOCK": 1024})
    yield ("upload atomic bf16 bucket=64", qa._upload_kernel, types(up, "*bf16"),
           {"BUCKET": 64, "QUANTIZE": True, "ATOMIC": True, "BLOCK": 1024})
    yield ("upload atomic fp32 identity", qa._upload_kernel, types(up, "*fp32"),
           {"BUCKET": 0, "QUANTIZE": False, "ATOMIC": True, "BLOCK": 1024})
    yield ("encode fp16 int16", qa._upload_kernel, types(up, "*fp16", out="*i16"),
           {"BUCKET": 0, "QUANTIZE": True, "ATOMIC": False, "BLOCK": 1024})
    yield ("sumsq whole-row", qa._diff_sumsq_kernel, types(sq, "*bf16"), {"R": 1, "W": 1024})
    yield ("sumsq buckets", qa._diff_sumsq_kernel, types(sq, "*fp32"), {"R": 8, "W": 128})
    yield ("uniforms", qa._uniforms_kernel, {"seed_ptr": "*i64", "out_ptr": "*fp32", "d": "i32",
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
    out = []
    for name, fn, signature, constexprs in _variants():
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
            "ld_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32\b", ptx)),
            "ld_v2": len(re.findall(r"\bld\.global(?:\.\w+)*\.v2\.b32\b", ptx)),
            "bar_sync": len(re.findall(r"\bbar\.sync\b", ptx)),
        })
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--quick", action="store_true", help="one variant per kernel (what the tests compile)")
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
