"""Effective bandwidth of compress-and-aggregate (Eqs. 4/6) against a plain copy and against the torch reference.

    python bench/kernels.py                      # CUDA if present (torch reference + Triton), else CPU (torch + numba)
    python bench/kernels.py --device cpu --sizes 21840 1000000 --rows 100 --repeat 3
    python bench/kernels.py --device cpu --compressor qsgd sign natural topk --ef none ef21
    python bench/kernels.py --device cuda --layout both --pairs 100x1000000 1000x159010   # the GPU check's sizes

For each layer size P (parameters) and number of child rows C, a tree of M = ceil(C / fanout) parents with the
children interleaved over the parents (child c -> parent c mod M, so the kernels' host-side sort is exercised) is
aggregated with each compressor of ``--compressor`` (default QSGD(s, bucket_size=None), ``--levels``; whole-row norms by default,
``--bucket`` for QSGD's and ScaledSign's buckets; ``--ratio`` for top-k and random-k) and each error-feedback mode
of ``--ef`` (default none; with EF the fp32 memory [C, P] is read and written in place at every call).

Backends timed: the torch reference (every compressor), the fused numba kernel on CPU and the Triton kernels on
CUDA, each only where it implements the compressor (its ``supports()``; top-k and random-k run on the torch path
only, with ``torch.topk`` per row); "n/a" elsewhere.

Effective bytes = C * P * b (one read of the child rows) + 2 * M * P * b (one read and one write of the parent
rows), b the storage bytes per element, plus 2 * C * P * 4 with error feedback (one read and one write of the
fp32 memory): the ideal traffic of the operation. GB/s = effective bytes / time; ms = time per call. The ceiling
is a plain ``copy_`` of the (C + M) * P elements the operation reads, reported as (read + written bytes) / time.
QSGD and ScaledSign need each row's norm before any of its entries can be compressed, so the fused kernels read
the child rows (and the memory) twice (norms, then the fused pass): their DRAM traffic is at least
(2 C + 3 M) P b (+ 3 C P 4 with EF), and the table gives the best effective/copy ratio that allows
(``2-pass limit`` = ideal / that traffic; (C + 2 M) / (2 C + 3 M) without EF).

On CPU, C is capped so that C * P <= ``--max-elems`` (the torch path is slow on a few cores); sizes whose
buffers would exceed ``--max-gb`` are skipped. Both are listed in the output. The copy buffer is capped at
``--copy-cap-gb`` (bandwidth is flat far beyond the caches); the cap is stated in the output when it applies.
When other processes share the cores, run with ``OMP_WAIT_POLICY=PASSIVE``: torch's and numba's OpenMP workers
otherwise spin at every parallel region, and a descheduled spinner stalls each region for a scheduler time slice
(bench/RESULTS.md, "Compressors on the CPU").
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_qmlhfl.compressors import (QSGD, Compressor, Identity, NaturalCompression, RandomK,  # noqa: E402
                                          ScaledSign, TopK)
from lightning_qmlhfl.kernels import aggregate_layer_torch_  # noqa: E402
from lightning_qmlhfl.rng import row_seeds  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPRESSORS = ("qsgd", "identity", "sign", "natural", "topk", "randomk")
EF_CHOICES = ("none", "ef", "ef21")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument("--sizes", type=int, nargs="+", default=[21_840, 1_000_000, 5_850_000], help="P values")
    p.add_argument("--rows", type=int, nargs="+", default=[100, 1000], help="numbers of child rows C")
    p.add_argument("--pairs", nargs="+", default=None, metavar="CxP",
                   help="exact (rows C, size P) pairs instead of --rows x --sizes, e.g. 100x1000000 1000x159010")
    p.add_argument("--fanout", type=int, default=10, help="children per parent (M = ceil(C / fanout))")
    p.add_argument("--compressor", nargs="+", choices=COMPRESSORS, default=["qsgd"],
                   help="compressors to time (one table row each): qsgd (--levels, --bucket), identity, sign\n"
                        "(ScaledSign, --bucket), natural (NaturalCompression), topk, randomk (--ratio)")
    p.add_argument("--ef", nargs="+", choices=EF_CHOICES, default=["none"], help="error-feedback modes to time")
    p.add_argument("--levels", type=int, default=8, help="QSGD levels s; 0 = no quantization (identity)")
    p.add_argument("--bucket", type=int, default=None, help="QSGD / ScaledSign bucket size (default: whole rows)")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k / random-k: fraction of the entries kept")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype")
    p.add_argument("--layout", choices=["segments", "atomic", "both"], default="segments", help="Triton layout")
    p.add_argument("--block", type=int, default=None, help="Triton columns per program (default 1024)")
    p.add_argument("--repeat", type=int, default=1, help="CPU: timed calls after one warm-up (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads, which the numba kernel follows (default: torch's default)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="GPU: do_bench time budget per measurement, ms")
    p.add_argument("--max-gb", type=float, default=None, help="skip sizes needing more (default: 6 CPU, 100 GPU)")
    p.add_argument(
        "--max-elems", type=float, default=None, help="cap C so that C * P <= this (default: 1.5e8 CPU, none GPU)"
    )
    p.add_argument("--copy-cap-gb", type=float, default=None, help="cap the copy buffer (default: 1 CPU, none GPU)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference (GPU: Triton vs copy only)")
    args = p.parse_args(argv)
    if args.levels < 0:
        p.error(f"--levels must be >= 0 (0 = identity), got {args.levels}")
    if not 0 < args.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.bucket is not None and args.bucket < 1:
        p.error(f"--bucket must be an integer >= 1, got {args.bucket}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be an integer >= 1, got {args.threads}")
    if args.pairs is not None:
        pairs = []
        for text in args.pairs:
            parts = text.lower().split("x")
            if len(parts) != 2 or not all(q.isdigit() and int(q) > 0 for q in parts):
                p.error(f"--pairs takes CxP with integers C, P >= 1 (e.g. 100x1000000), got {text!r}")
            pairs.append((int(parts[1]), int(parts[0])))
        args.pairs = pairs
    return args


def make_compressor(name: str, ef: str, args: argparse.Namespace) -> Compressor:
    """The compressor ``name`` of --compressor with error feedback ``ef`` ("none", "ef", "ef21")."""
    e = None if ef == "none" else ef
    if name == "qsgd":
        return Identity(e) if args.levels == 0 else QSGD(args.levels, args.bucket, e)
    if name == "identity":
        return Identity(e)
    if name == "sign":
        return ScaledSign(args.bucket, e)
    if name == "natural":
        return NaturalCompression(e)
    if name == "topk":
        return TopK(ratio=args.ratio, error_feedback=e)
    if name == "randomk":
        return RandomK(ratio=args.ratio, error_feedback=e)
    raise ValueError(f"unknown compressor {name!r}; allowed: {COMPRESSORS}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeat: int, rep_ms: float = 200.0) -> float:
    """Median time of one ``fn()`` call in ms.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, as many calls as fit in ``rep_ms``).
    CPU: one warm-up call, then ``repeat`` calls timed with ``time.perf_counter``.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def footprint_gb(C: int, M: int, P: int, itemsize: int, copy_elems: int, with_torch: bool, with_ef: bool) -> float:
    """Peak bytes of one configuration: buffers, EF memory, copy buffers, torch-reference temporaries (fp32 acc +
    parent)."""
    base = (C + M) * P * itemsize + 2 * copy_elems * itemsize + (C * P * 4 if with_ef else 0)
    torch_tmp = (2 * M * P * 4 + 6 * (64 << 20)) if with_torch else 0
    return (base + torch_tmp) / 1e9


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda"
    repeat = args.repeat
    max_elems = args.max_elems if args.max_elems is not None else (None if on_gpu else 1.5e8)
    max_gb = args.max_gb if args.max_gb is not None else (100.0 if on_gpu else 6.0)
    copy_cap_gb = args.copy_cap_gb if args.copy_cap_gb is not None else (None if on_gpu else 1.0)
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    compressors = [make_compressor(name, ef, args) for name in args.compressor for ef in args.ef]
    any_ef = any(c.error_feedback is not None for c in compressors)
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    triton_layouts: list[str] = []
    if on_gpu:
        from lightning_qmlhfl.kernels import triton_available

        if triton_available():
            from lightning_qmlhfl.kernels.triton_cuda import aggregate_layer_triton_, row_norms_triton
            from lightning_qmlhfl.kernels.triton_cuda import supports as triton_supports

            triton_layouts = ["segments", "atomic"] if args.layout == "both" else [args.layout]
        else:
            print("Triton is not available: only the torch reference is measured.")
    # the fused numba kernel: the default CPU path for float32 (lightning_qmlhfl.kernels.numba_cpu)
    with_numba = not on_gpu and dtype == torch.float32
    if with_numba:
        from lightning_qmlhfl.kernels import numba_cpu as cpu_kernels

    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, "\
        f"{torch.get_num_threads()} threads)"
    print(f"# compress-and-aggregate: {', '.join(map(repr, compressors))}; {args.dtype} storage, fanout "
          f"{args.fanout}, on {name}")
    timing = f"do_bench median over {args.rep_ms:g} ms" if on_gpu else f"median of {repeat} call(s) after a warm-up"
    print(f"torch {torch.__version__}; {timing}; GB = 1e9 bytes; ms per call")
    print()
    header = ["compressor", "P", "C", "M", "eff. MB", "copy GB/s"]
    if not args.no_torch:
        header += ["torch GB/s", "torch ms", "torch/copy"]
    for lay in triton_layouts:
        header += [f"triton[{lay}] GB/s", "ms", "/copy", "/torch", "of 2-pass limit"]
    if triton_layouts:
        header += ["pass-1 ms"]
    if with_numba:
        header += ["numba GB/s", "numba ms", "/copy", "/torch"]
    header += ["2-pass limit"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    skipped, notes, done = [], [], set()
    pairs = args.pairs if args.pairs is not None else [(P, C) for P in args.sizes for C in args.rows]
    for P, C in pairs:
        if max_elems is not None and C * P > max_elems:
            capped = max(args.fanout, int(max_elems // P) // args.fanout * args.fanout)
            notes.append(f"P={P}, C={C}: rows capped to C={capped} (C * P <= --max-elems {max_elems:g})")
            C = capped
        if (P, C) in done:
            continue
        done.add((P, C))
        M = -(-C // args.fanout)
        copy_elems = (C + M) * P
        if copy_cap_gb is not None and copy_elems * itemsize > copy_cap_gb * 1e9:
            copy_elems = int(copy_cap_gb * 1e9) // itemsize
            notes.append(f"P={P}, C={C}: copy measured on a {copy_elems * itemsize / 1e9:.2f} GB buffer")
        need = footprint_gb(C, M, P, itemsize, copy_elems, not args.no_torch, any_ef)
        if need > max_gb:
            skipped.append(f"P={P}, C={C} (needs ~{need:.1f} GB > --max-gb {max_gb:g})")
            continue
        g = torch.Generator(device=device).manual_seed(P + C)
        parent = torch.randn(M, P, device=device, generator=g).to(dtype)
        parent_index = torch.arange(C, device=device) % M
        child = parent[parent_index].float()
        child.add_(torch.randn(C, P, device=device, generator=g), alpha=0.01)
        child = child.to(dtype)
        weights = 1.0 / torch.bincount(parent_index, minlength=M).float()[parent_index]
        seeds = row_seeds(seed=0, round_idx=0, layer=1, event=0, num_rows=C)
        memory = torch.zeros(C, P, device=device) if any_ef else None

        # Both buffers written before timing: untouched pages of a fresh CPU allocation all map to the
        # kernel's shared zero page, and copying from them runs from cache (an earlier version measured
        # 55-158 GB/s on this 2-core machine that way).
        src = torch.ones(copy_elems, dtype=dtype, device=device)
        dst = torch.zeros_like(src)
        t_copy = time_ms(lambda: dst.copy_(src), device, max(repeat, 10), args.rep_ms)  # cheap: more samples
        copy_gbs = 2 * copy_elems * itemsize / t_copy / 1e6
        del src, dst

        for comp in compressors:
            ef = comp.error_feedback is not None
            mem = memory if ef else None
            eff_bytes = (C + 2 * M) * P * itemsize + (2 * C * P * 4 if ef else 0)
            two_pass = ((2 * C + 3 * M) * P * itemsize + (3 * C * P * 4 if ef else 0))
            fused = not isinstance(comp, (TopK, RandomK))
            row = [repr(comp), f"{P:,}", str(C), str(M), f"{eff_bytes / 1e6:,.1f}", fmt(copy_gbs)]
            torch_gbs = float("nan")
            if not args.no_torch:
                work = parent.clone()

                def run_torch() -> None:
                    aggregate_layer_torch_(work, child, parent_index, weights, comp, seeds, memory=mem)

                t_torch = time_ms(run_torch, device, repeat, args.rep_ms)
                torch_gbs = eff_bytes / t_torch / 1e6
                row += [fmt(torch_gbs), fmt(t_torch), fmt(torch_gbs / copy_gbs)]
                del work
            for lay in triton_layouts:
                if not triton_supports(parent, child, comp, mem, layout=lay):
                    row += ["n/a"] * 5
                    continue
                work = parent.clone()

                def run_triton(lay: str = lay) -> None:
                    aggregate_layer_triton_(work, child, parent_index, weights, comp, seeds, memory=mem,
                                            layout=lay, block=args.block)

                t_tri = time_ms(run_triton, device, repeat, args.rep_ms)
                tri_gbs = eff_bytes / t_tri / 1e6
                # the share of the best possible: copy bandwidth x (ideal bytes / two-pass bytes)
                limit = f"{tri_gbs / (copy_gbs * eff_bytes / two_pass):.0%}" if fused else "n/a"
                row += [fmt(tri_gbs), fmt(t_tri), fmt(tri_gbs / copy_gbs), fmt(tri_gbs / torch_gbs), limit]
                del work
            if triton_layouts:  # the norms pass alone (child and parent read once; without EF memory)
                if fused and not ef and comp.norm is not None:
                    t_norm = time_ms(lambda: row_norms_triton(parent, child, parent_index, comp.bucket_size,
                                                              block=args.block), device, repeat, args.rep_ms)
                    row.append(fmt(t_norm))
                else:
                    row.append("n/a")
            if with_numba:
                if cpu_kernels.supports(parent, child, comp, mem):
                    work = parent.clone()

                    def run_numba() -> None:
                        cpu_kernels.aggregate_layer_numba_(work, child, parent_index, weights, comp, seeds,
                                                           memory=mem)

                    t_nb = time_ms(run_numba, device, repeat, args.rep_ms)
                    nb_gbs = eff_bytes / t_nb / 1e6
                    row += [fmt(nb_gbs), fmt(t_nb), fmt(nb_gbs / copy_gbs), fmt(nb_gbs / torch_gbs)]
                    del work
                else:
                    row += ["n/a"] * 4
            row.append(f"{eff_bytes / two_pass:.2f}" if fused else "n/a")
            print("| " + " | ".join(row) + " |", flush=True)
        del parent, child, memory
        if on_gpu:
            torch.cuda.empty_cache()
    print()
    print("eff. MB = ((C + 2M) P b + 2 C P 4 with EF) / 1e6: child rows read once, parent rows read and written "
          "once, EF memory read and written once (the ideal).")
    print("copy GB/s = (read + written bytes) / time of dst.copy_(src) over the (C + M) P elements read.")
    print("2-pass limit = ideal / ((2C + 3M) P b + 3 C P 4 with EF): the best fused/copy possible when norms need "
          "their own pass.")
    if triton_layouts:
        print("pass-1 ms = row_norms_triton alone (the norms pass with its host-side reduction), whole-row or "
              "bucketed like the compressor; n/a with EF or without a norm.")
        print("of 2-pass limit = triton GB/s / (copy GB/s x 2-pass limit): the share of the fastest a two-pass "
              "kernel can be at the bandwidth measured in this run.")
    for n in notes:
        print(f"note: {n}")
    for s in skipped:
        print(f"skipped: {s}")


if __name__ == "__main__":
    main()
