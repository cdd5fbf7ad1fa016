"""What the benchmarks record about the machine and the process: RSS and peak RSS, the fp32/bf16 GEMM peaks
measured with the benchmark's thread count, the CPU's bf16 flags, a one-line description of the machine, and a
CUDA synchronisation for timing."""

from __future__ import annotations

import math
import os
import platform
import resource
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peaks(device: torch.device, n: int | None = None, reps: int | None = None) -> dict:
    """The machine's fp32 and bf16 GEMM rates in GFLOP/s (1e9 x 2 n^3 / seconds of one n x n matmul, best of
    ``reps`` timed repetitions after a warm-up; on CUDA each repetition is 10 back-to-back matmuls between two
    synchronisations). Runs with the current ``torch.get_num_threads()`` (the driver sets the benchmark's).
    Defaults: n = 4096; 3 repetitions on CPU, 5 on CUDA.

    bf16 counts as available only if its measured rate is above the fp32 rate (a CPU without bf16 GEMM support
    runs it through conversions, slower than fp32); otherwise ``bf16_gflops`` is None and ``bf16_note`` says why.
    """
    on_gpu = device.type == "cuda"
    n = n if n is not None else 4096
    reps = reps if reps is not None else (5 if on_gpu else 3)
    if n < 1 or reps < 1:
        raise ValueError(f"GEMM size and repetitions must be >= 1, got n={n}, reps={reps}")
    iters = 10 if on_gpu else 1
    g = torch.Generator().manual_seed(0)
    base_a = torch.randn(n, n, generator=g)
    base_b = torch.randn(n, n, generator=g)

    def rate(dtype: torch.dtype) -> float:
        a = base_a.to(device=device, dtype=dtype)
        b = base_b.to(device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=c)  # warm-up (library initialisation, kernel choice)
        sync(device)
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            sync(device)
            best = min(best, (time.perf_counter() - t0) / iters)
        return 2 * n**3 / best / 1e9

    fp32 = rate(torch.float32)
    out = {"gemm_n": n, "gemm_reps": reps, "gemm_threads": torch.get_num_threads(), "fp32_gflops": fp32,
           "fp32_matmul_precision": torch.get_float32_matmul_precision(), "bf16_gflops": None,
           "bf16_measured_gflops": None, "bf16_note": ""}
    try:
        bf16 = rate(torch.bfloat16)
    except RuntimeError as e:  # no bf16 matmul on this device
        out["bf16_note"] = f"bf16 matmul failed: {e}"
        return out
    out["bf16_measured_gflops"] = bf16
    if bf16 > fp32:
        out["bf16_gflops"] = bf16
        out["bf16_note"] = f"bf16 GEMM {bf16 / fp32:.2f}x fp32"
    else:
        out["bf16_note"] = f"not available: bf16 GEMM {bf16:,.0f} GFLOP/s is not faster than fp32 ({fp32:,.0f})"
    return out


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16-related feature flags from /proc/cpuinfo (informational; availability is measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in {"avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni"})


def machine(device: torch.device, threads: int) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    where = f"CPU, {threads} threads"
    if device.type == "cuda":
        where = (f"CUDA {torch.version.cuda} on {torch.cuda.get_device_name(device)}, host {threads} threads; "
                 f"triton {_version('triton')}")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} "
            f"({where}), Python {platform.python_version()}, load average at start "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def peaks_line(p: dict) -> str:
    bf16 = f"bf16 {p['bf16_gflops']:,.0f} GFLOP/s ({p['bf16_note']})" if p["bf16_gflops"] else f"bf16 {p['bf16_note']}"
    return (f"GEMM peaks (this run, {p['gemm_n']}x{p['gemm_n']} matmul, best of {p['gemm_reps']}, "
            f"{p['gemm_threads']} threads): fp32 {p['fp32_gflops']:,.0f} GFLOP/s "
            f"(float32 matmul precision '{p['fp32_matmul_precision']}'), {bf16}")
