"""Engine throughput: simulated device-steps per second, QMLHFLEngine (vmap / loop executors) vs a naive baseline.

Setup (the issue's): 100 devices in a balanced tree with branching [4, 5, 5] (cloud -> 4 -> 20 edges -> 100
devices, N = 3), tau = (5, 2, 2) (edge aggregation every 5 local steps, layer 2 every 10, cloud every 20 = one
global round), QSGD with s = 8 on every layer, plain SGD (lr 0.01), batch 32, for

- ``lenet``: the HierFAVG MNIST LeNet (conv 1->10 k5, maxpool2, relu, conv 10->20 k5, dropout2d, maxpool2, relu,
  fc 320->50, relu, dropout, fc 50->10; 21,840 parameters),
- ``mlp``: a 784-200-10 MLP (159,010 parameters),
- ``cifar_small`` (configs ``cifar100:*``, ``cifar1000:*``): the recipes' small CIFAR-10 CNN (``model=cifar_small``,
  ``[conv 3x3 pad 1 -> relu -> maxpool 2] x 3`` with 32, 64, 128 channels, fc 2048->64, relu, fc 64->10; 225,034
  parameters), copied here as a plain nn.Module,

plus 1000 devices (branching [10, 10, 10], same tau and quantizers) of each model, and 64 CIFAR devices
(``cifar64:*``, branching [4, 4, 4], the device count of ``recipes.cifar``). The default set (no
``--configs``) is the 100-device MLP and LeNet configs and the 1000-device MLP without the loop executor; the
CIFAR CNN and the 1000-device LeNet/CIFAR configs are extras (the 1000-device ones are meant for CUDA).

Data: synthetic and resident in memory: for ``mlp``/``lenet`` 60,000 random MNIST-shaped images [1, 28, 28] (the
size of MNIST's training set), for ``cifar_small`` 50,000 random CIFAR-shaped images [3, 32, 32] (CIFAR-10's), with
random labels, partitioned IID by index over the devices (600 MNIST / 500 CIFAR samples per device for 100
devices, 60 / 50 for 1000). Random data is fine for throughput: the work per step does not depend on the values.

- ``vmap`` / ``loop``: :class:`lightning_qmlhfl.simulation.engine.QMLHFLEngine` with that executor. Each local step gathers
  one mini-batch per device from the resident tensors by one indexing operation (random positions inside each
  device's partition), x [N_tot, 32, 1, 28, 28], y [N_tot, 32], the way the Lightning strategy does.
- ``naive``: :class:`NaiveHierFL` (``bench/naive_hierfl.py``), written the way public hierarchical-FL code
  (HierFAVG and its forks) is written: one nn.Module + torch.optim.SGD + shuffling DataLoader (batch 32) per device, a Python loop over
  devices for every local step, uploads as ``copy.deepcopy(model.state_dict())``, per-node Python loops that
  flatten, QSGD-quantize (plain torch ops, one flat vector per child node, s = 8) and average the state dicts,
  and downloads by deep copies + ``load_state_dict``. Same schedule, same number of device-steps and of
  aggregations (asserted) as the engine run. With 60 or 50 samples per device (1000 devices) the loader's last
  batch of each local epoch is short (28 or 18 samples), as it is in such code.

FLOPs and peaks: the model's FLOPs per device-step are counted once per configuration with
``torch.utils.flop_counter.FlopCounterMode`` on one device's forward + backward of one mini-batch of 32 (it counts
the matmul/convolution-type operations and their backward, i.e. the GEMM work; element-wise operations, pooling,
the optimiser update and the aggregations are not counted). GFLOP/s = that count x device-steps/s (median round;
for the partial-participation configs, ``mlp1000p10:*``, only the device-steps of the drawn devices, which are the
ones that compute).
For the naive runs, whose loader ends each local epoch with a short batch, this overstates the work done by
32 / (mean batch) - 1: 1.3% (MNIST) and 2.4% (CIFAR) at 100 devices, 6.7% and 28% at 1000. In the same run the
driver measures the machine's fp32 and bf16 GEMM peaks with the benchmark's thread count (:func:`gemm_peaks`: a
4096 x 4096 matmul, best of a few repetitions); bf16 counts as available only if its measured GEMM rate beats
fp32's. The table gives each configuration's GFLOP/s as a fraction of both peaks. (The engine computes in fp32;
the bf16 column says how far a bf16 path could go, not what this run used.)

Precision: fp32 throughout, except the ``+bf16`` configurations (``mlp100:vmap+bf16``, ``lenet100:loop+bf16``,
``mlp1000:vmap+bf16``; extras), which run every device's forward and backward under
``torch.autocast(bfloat16)``, as the strategy does with ``precision="bf16-mixed"``: the stacked weights, the
optimiser and the aggregations stay fp32 (so the weights are cast to bf16 in every forward, and the weight
gradients back to fp32). Their FLOPs are counted as for fp32; the naive baseline stays fp32, as public code runs.

``--device cuda``: data, models and engine on the GPU (the naive baseline keeps its dataset on the host and moves
each batch with ``.to(device)``, as public code does), ``torch.cuda.synchronize()`` around every timed round, and
the memory column is ``torch.cuda.max_memory_allocated`` over the configuration (data included) instead of the
RSS. ``--in-process`` (CUDA only) runs the configurations in the driver process one after the other (the peak
memory counter is reset per configuration), which saves a process start and a CUDA initialisation per config.

Every configuration runs in a fresh subprocess (``--one NAME``) so that the peak RSS (``ru_maxrss``, monotone over
a process's life) belongs to that configuration alone; the reported memory is the peak RSS minus the RSS right
after the imports (so it includes the ~180 MB of resident data). Timing: a warm-up of ``--warm`` local steps
(default one global round = 20 steps; 5 for the 1000-device runs), then ``--rounds`` global rounds (20 local steps
each, with all their aggregations; default 2, 1 for the 1000-device runs), each timed on its own; device-steps/s
= 20 x devices / median round time (the best round is printed too: other processes on a shared machine make
single rounds slow). torch.set_num_threads(2) (``--threads``).

Usage::

    python bench/engine.py                          # the whole table (~6 min on a quiet 2-core CPU)
    python bench/engine.py --repeats 2              # run the whole set twice, report both
    python bench/engine.py --configs mlp1000:loop   # extra: the loop executor on 1000 devices (slow)
    python bench/engine.py --one mlp100:vmap        # one configuration, JSON line
    python bench/engine.py --device cuda --in-process --rounds 1 --configs lenet1000:vmap,lenet1000:naive
    python bench/engine.py --configs mlp100:vmap --branching 2,2,2 --rounds 1 --warm 2   # tiny smoke run
    python bench/engine.py --device cuda --configs cifar1000:vmap --dry-run              # check the options only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
sys.path.insert(0, HERE)  # the benchmarks' shared modules, also when this file is loaded by path

# the workloads, the machine's figures and the naive baseline live in their own modules; the names below stay
# importable from here (``from engine import MLP, make_data``)
from machine_info import cpu_bf16_flags, gemm_peaks, machine, peak_rss_mb, peaks_line, rss_mb, sync
from naive_hierfl import NaiveHierFL
from workloads import (BATCH, CIFAR_POOL, INPUTS, LEVELS, LR, MLP, MODELS, POOL, CifarSmall, LeNet, ce_loss,
                       count_flops, make_data)

from lightning_qmlhfl import QSGD, Hierarchy
from lightning_qmlhfl.federation.participation import Fraction, Full
from lightning_qmlhfl.simulation.engine import QMLHFLEngine, gather_batch

__all__ = ["BATCH", "CIFAR_POOL", "CONFIGS", "DEFAULT", "INPUTS", "LEVELS", "LR", "MLP", "MODELS", "POOL", "TAUS",
           "CifarSmall", "LeNet", "ce_loss", "count_flops", "gemm_peaks", "make_data", "run_one"]

# name -> (model, branching, executor, warm-up local steps, timed global rounds of 20 local steps)
CONFIGS: dict[str, tuple[str, list[int], str, int, int]] = {
    "mlp100:naive": ("mlp", [4, 5, 5], "naive", 20, 2),
    "mlp100:vmap": ("mlp", [4, 5, 5], "vmap", 20, 2),
    "mlp100:loop": ("mlp", [4, 5, 5], "loop", 20, 2),
    "lenet100:naive": ("lenet", [4, 5, 5], "naive", 20, 2),
    "lenet100:vmap": ("lenet", [4, 5, 5], "vmap", 20, 2),
    "lenet100:loop": ("lenet", [4, 5, 5], "loop", 20, 2),
    # 1000 devices: shorter warm-up (5 steps = one edge aggregation), one timed global round
    "mlp1000:naive": ("mlp", [10, 10, 10], "naive", 5, 1),
    "mlp1000:vmap": ("mlp", [10, 10, 10], "vmap", 5, 1),
    "mlp1000:loop": ("mlp", [10, 10, 10], "loop", 5, 1),  # not in the default set (slow)
    # extras, not in the default set: the small CIFAR-10 CNN, and 1000 LeNet / CIFAR devices (meant for CUDA)
    "cifar100:naive": ("cifar_small", [4, 5, 5], "naive", 20, 2),
    "cifar100:vmap": ("cifar_small", [4, 5, 5], "vmap", 20, 2),
    "cifar100:loop": ("cifar_small", [4, 5, 5], "loop", 20, 2),
    "lenet1000:naive": ("lenet", [10, 10, 10], "naive", 5, 1),
    "lenet1000:vmap": ("lenet", [10, 10, 10], "vmap", 5, 1),
    "lenet1000:loop": ("lenet", [10, 10, 10], "loop", 5, 1),
    "cifar64:naive": ("cifar_small", [4, 4, 4], "naive", 20, 1),  # the CIFAR recipe's 64 devices
    "cifar64:vmap": ("cifar_small", [4, 4, 4], "vmap", 20, 1),
    "cifar64:loop": ("cifar_small", [4, 4, 4], "loop", 20, 1),
    "cifar1000:naive": ("cifar_small", [10, 10, 10], "naive", 5, 1),
    "cifar1000:vmap": ("cifar_small", [10, 10, 10], "vmap", 5, 1),
    "cifar1000:loop": ("cifar_small", [10, 10, 10], "loop", 5, 1),
    # partial participation: 10% of every edge's devices per layer-1 period (Fraction(0.1) at layer 1); compare
    # its round time with mlp1000:vmap's (only the drawn devices compute)
    "mlp1000p10:vmap": ("mlp", [10, 10, 10], "vmap", 5, 2),
    "mlp1000p10:loop": ("mlp", [10, 10, 10], "loop", 5, 2),
    # bf16-mixed: each device's forward and backward under torch.autocast(bfloat16), as the strategy runs
    # precision="bf16-mixed" (the stacked state, the optimiser and the aggregations stay fp32)
    "mlp100:vmap+bf16": ("mlp", [4, 5, 5], "vmap", 20, 2),
    "lenet100:loop+bf16": ("lenet", [4, 5, 5], "loop", 20, 2),
    "mlp1000:vmap+bf16": ("mlp", [10, 10, 10], "vmap", 5, 1),
}
PARTICIPATION = {"mlp1000p10:vmap": 0.1, "mlp1000p10:loop": 0.1}  # the fraction of devices drawn per period
PRECISION = {name: "bf16-mixed" for name in CONFIGS if name.endswith("+bf16")}  # default: fp32 ("32-true")
DEFAULT = ["mlp100:naive", "mlp100:vmap", "mlp100:loop", "lenet100:naive", "lenet100:vmap", "lenet100:loop",
           "mlp1000:naive", "mlp1000:vmap"]
TAUS = (5, 2, 2)


def parse_device(spec: str) -> torch.device:
    """``cpu`` or ``cuda``/``cuda:i``; a CUDA device must exist."""
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise SystemExit(f"--device {spec!r}: not a device ({e}); use cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {spec!r}: only cpu and cuda[:i] are supported")
    return device


def check_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no usable CUDA device (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}; torch.cuda.is_available() is False)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


# ---------------------------------------------------------------------------------------------------- one config
def run_one(name: str, warm: int | None, rounds: int | None, threads: int, device: torch.device | None = None,
            branching: list[int] | None = None, peaks: dict | None = None, gemm_size: int | None = None,
            gemm_reps: int | None = None) -> dict:
    """Run one configuration and return its record (the JSON line); see the module docstring.

    ``branching`` replaces the configuration's tree (same tau and quantizers; for small smoke runs). ``peaks``:
    the driver's :func:`gemm_peaks` of this run; if None they are measured here after the timed rounds (with
    ``gemm_size``/``gemm_reps``), so that they do not enter the peak memory.
    """
    device = torch.device("cpu") if device is None else device
    on_gpu = device.type == "cuda"
    torch.set_num_threads(threads)
    cuda_base = 0
    if on_gpu:  # the peak counter belongs to this configuration alone (also when run in the driver's process)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    base = rss_mb()
    load0 = os.getloadavg()[0]
    model_name, branching0, executor, warm0, rounds0 = CONFIGS[name]
    branching = list(branching0) if branching is None else list(branching)
    warm = warm0 if warm is None else warm
    rounds = rounds0 if rounds is None else rounds
    steps = 20  # one global round: prod(TAUS)
    h = Hierarchy.balanced(branching)
    n_dev = h.num_devices
    pool, shape = INPUTS[model_name]
    X, Y, part = make_data(n_dev, pool=pool, shape=shape)
    data_mb = (X.numel() * 4 + Y.numel() * 8 + part.numel() * 8) / 2**20
    torch.manual_seed(0)
    model_fn = MODELS[model_name]
    if executor == "naive":
        sim = NaiveHierFL(model_fn, branching, TAUS, X, Y, part, device)

        def step() -> None:
            sim.local_step()

        def counts() -> list[int]:
            return list(sim.aggregations)
    else:
        if on_gpu:
            X, Y, part = X.to(device), Y.to(device), part.to(device)
        fraction = PARTICIPATION.get(name)
        participation = None if fraction is None else [Fraction(fraction)] + [Full()] * (len(TAUS) - 1)
        engine = QMLHFLEngine(model_fn().to(device), ce_loss, h, TAUS, [QSGD(LEVELS, bucket_size=None)] * len(TAUS), optimizer="sgd",
                              optimizer_kwargs={"lr": LR}, executor=executor, seed=0, participation=participation)
        per_dev = part.shape[1]
        g = torch.Generator(device=device).manual_seed(1)
        uploads = [0] * len(TAUS)
        trained = [0]  # device-steps actually computed (fewer than steps x devices with partial participation)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if PRECISION.get(name) == "bf16-mixed"
                    else contextlib.nullcontext())

        def step() -> None:
            active = engine.upcoming_devices()  # the strategy gathers only the drawn devices' batches
            rows = part if active is None else part.index_select(0, active)
            trained[0] += rows.shape[0]
            pos = torch.randint(0, per_dev, (rows.shape[0], BATCH), generator=g, device=device)
            idx = rows.gather(1, pos)  # [devices, B] indices into the resident pool
            with autocast:  # what the strategy does: gradients (under autocast for bf16-mixed), then Eq. 3-6
                engine.compute_gradients((gather_batch(X, idx), gather_batch(Y, idx)))
            r = engine.apply_step()
            if r.round_completed:
                for n in range(len(TAUS)):
                    uploads[n] += int(engine.last_round_stats[f"participants_layer{n + 1}"])

        def counts() -> list[int]:
            if participation is not None:  # the uploads the population reported (full rounds only)
                return [u + engine.population.uploads[n] for n, u in enumerate(uploads)]
            # uploads per layer = aggregations x senders
            return [engine.aggregation_counts[n] * h.nodes_per_layer[n] for n in range(len(TAUS))]

    for _ in range(warm):
        step()
    sync(device)
    if executor != "naive":
        trained[0] = 0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    total = warm + steps * rounds
    # same work check: uploads per layer after `total` local steps
    expected, period = [], 1
    for n, tau in enumerate(TAUS):
        period *= tau
        expected.append((total // period) * h.nodes_per_layer[n])
    got = counts()
    if executor == "naive" or PARTICIPATION.get(name) is None:
        assert got == expected, f"{name}: uploads per layer {got} != expected {expected}"
    else:  # 10% of the devices upload into layer 1; every edge (it always receives some) into the layers above
        assert got[0] < expected[0] and got[1:] == expected[1:], f"{name}: uploads {got} vs full {expected}"
    peak = peak_rss_mb()
    cuda_peak = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20 if on_gpu else None
    load1 = os.getloadavg()[0]
    flops = count_flops(model_name)
    if peaks is None:
        peaks = gemm_peaks(device, gemm_size, gemm_reps)
    rate, best_rate = steps * n_dev / dt, steps * n_dev / min(times)
    # FLOPs are done only by the devices that train (with partial participation, fewer than all of them)
    computed = steps * n_dev if executor == "naive" else trained[0] / rounds
    gflops = flops * computed / dt / 1e9
    bf16 = peaks["bf16_gflops"]
    return {
        "name": name, "model": model_name, "participation": PARTICIPATION.get(name),
        "precision": PRECISION.get(name, "32-true"), "devices": n_dev, "executor": executor, "warm": warm,
        "steps": steps,
        "rounds": rounds, "round_seconds": times, "seconds": dt, "device_steps_per_s": rate,
        "best_device_steps_per_s": best_rate, "peak_rss_mb": peak, "base_rss_mb": base,
        "delta_rss_mb": peak - base, "data_mb": data_mb, "uploads": got, "threads": threads,
        "load_before": load0, "load_after": load1,
        "device": str(device), "branching": branching, "cuda_peak_mb": cuda_peak,
        "flops_per_device_step": flops, "gflops_per_s": gflops,
        "best_gflops_per_s": flops * computed / min(times) / 1e9, "computed_device_steps_per_round": computed,
        "fp32_peak_gflops": peaks["fp32_gflops"], "frac_fp32_peak": gflops / peaks["fp32_gflops"],
        "bf16_peak_gflops": bf16, "frac_bf16_peak": gflops / bf16 if bf16 else None,
        "bf16_note": peaks["bf16_note"], "gemm": peaks, "cpu_bf16_flags": cpu_bf16_flags(),
    }


# ---------------------------------------------------------------------------------------------------- driver


def table(results: list[dict]) -> str:
    naive = {(r["model"], r["devices"]): r["device_steps_per_s"] for r in results if r["executor"] == "naive"}
    on_gpu = any(r.get("cuda_peak_mb") is not None for r in results)
    mem = "peak CUDA MB" if on_gpu else "peak RSS delta MB"
    lines = [
        "| config | executor | warm-up steps + timed rounds | device-steps/s (median round) | vs naive | "
        f"best round | {mem} | load avg before/after | GFLOP/s | of fp32 peak | of bf16 peak |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        base = naive.get((r["model"], r["devices"]))
        ratio = f"{r['device_steps_per_s'] / base:.2f}x" if base else "n/a"
        cfg = f"{r['model']} x {r['devices']} devices"
        if r.get("participation"):
            cfg += f" ({100 * r['participation']:g}% per period)"
        mb = r["cuda_peak_mb"] if on_gpu else r["delta_rss_mb"]
        bf16 = f"{100 * r['frac_bf16_peak']:.1f}%" if r.get("frac_bf16_peak") else "n/a"
        executor = r["executor"] + (" bf16-mixed" if r.get("precision") == "bf16-mixed" else "")
        lines.append(f"| {cfg} | {executor} | {r['warm']} + {r['rounds']} x {r['steps']} | "
                     f"{r['device_steps_per_s']:,.0f} | {ratio} | {r['best_device_steps_per_s']:,.0f} | "
                     f"{mb:,.0f} | {r['load_before']:.1f}/{r['load_after']:.1f} | {r['gflops_per_s']:,.1f} | "
                     f"{100 * r['frac_fp32_peak']:.1f}% | {bf16} |")
    return "\n".join(lines)


class _Terminated(BaseException):
    """SIGTERM arrived (e.g. from ``timeout``): stop, print what was measured."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def parse_branching(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        b = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--branching {text!r}: expected {len(TAUS)} comma-separated integers, e.g. 2,2,2") from None
    if len(b) != len(TAUS) or min(b) < 1:
        raise SystemExit(f"--branching {text!r}: expected {len(TAUS)} integers >= 1 (one per layer, tau = {TAUS})")
    return b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help="run one configuration in this process and print its JSON line")
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--warm", type=int, default=None, help="warm-up local steps (default: per config)")
    ap.add_argument("--rounds", type=int, default=None, help="timed global rounds (default: per config)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole set this many times, interleaved")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]: where data, models and engine live")
    ap.add_argument("--branching", default=None,
                    help=f"replace every config's tree by this one ({len(TAUS)} comma-separated fan-outs, e.g. "
                         "2,2,2 = 8 devices; for smoke runs)")
    ap.add_argument("--in-process", action="store_true",
                    help="CUDA only: run the configs in this process (peak CUDA memory is reset per config)")
    ap.add_argument("--jsonl", default=None, help="append each configuration's JSON line to this file as it ends")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no further configuration after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--gemm-size", type=int, default=None, help="n of the n x n peak GEMMs (default 4096)")
    ap.add_argument("--gemm-reps", type=int, default=None, help="timed repetitions of the peak GEMMs (best of)")
    ap.add_argument("--gemm-peaks", default=None, help=argparse.SUPPRESS)  # the driver's peaks, to --one
    ap.add_argument("--dry-run", action="store_true", help="check the options, print the plan, run nothing")
    args = ap.parse_args(argv)

    names = [args.one] if args.one else [n for n in args.configs.split(",") if n]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        ap.error(f"unknown configuration(s) {bad or names!r}; choose from {', '.join(CONFIGS)}")
    for opt, value, low in (("--warm", args.warm, 0), ("--rounds", args.rounds, 1), ("--threads", args.threads, 1),
                            ("--repeats", args.repeats, 1), ("--gemm-size", args.gemm_size, 1),
                            ("--gemm-reps", args.gemm_reps, 1)):
        if value is not None and value < low:
            ap.error(f"{opt} must be >= {low}, got {value}")
    branching = parse_branching(args.branching)
    if branching is not None:
        n_dev = math.prod(branching)
        small = [n for n in names if INPUTS[CONFIGS[n][0]][0] // n_dev < 1]
        if small:
            ap.error(f"--branching {args.branching}: {n_dev} devices leave no sample per device for {small}")
    device = parse_device(args.device)
    if args.in_process and device.type != "cuda":
        ap.error("--in-process needs --device cuda: on CPU the peak RSS of a configuration is only its own in a "
                 "fresh process")
    if args.dry_run:
        print(f"dry run: device {device}, {args.threads} threads, configs {names}, warm {args.warm}, rounds "
              f"{args.rounds}, branching {branching}, {'in-process' if args.in_process else 'one process each'}")
        for n in names:
            model_name, b, executor, warm0, rounds0 = CONFIGS[n]
            b = branching or b
            print(f"  {n}: {model_name} x {math.prod(b)} devices {b}, {executor}, warm-up "
                  f"{warm0 if args.warm is None else args.warm} steps, "
                  f"{rounds0 if args.rounds is None else args.rounds} timed round(s)")
        return
    check_cuda(device)
    if args.one:
        peaks = json.loads(args.gemm_peaks) if args.gemm_peaks else None
        r = run_one(args.one, args.warm, args.rounds, args.threads, device, branching, peaks, args.gemm_size,
                    args.gemm_reps)
        print(json.dumps(r), flush=True)
        return
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _on_sigterm)
    cmd = "python bench/engine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {cmd.strip()}")
    print(f"machine: {machine(device, args.threads)}")
    pool_txt = f"{POOL} MNIST-shaped / {CIFAR_POOL} CIFAR-shaped samples"
    mem_txt = ("peak CUDA MB = torch.cuda.max_memory_allocated over the config (includes the data)"
               if device.type == "cuda" else
               "peak RSS delta = peak RSS - RSS after imports (includes ~188 MB data; ~614 MB for CIFAR)")
    print(f"setup: tau={TAUS}, QSGD s={LEVELS} on every layer, SGD lr={LR}, batch {BATCH}, synthetic resident "
          f"data ({pool_txt}); {mem_txt}; GFLOP/s = FlopCounterMode forward+backward FLOPs of one device-step x "
          f"device-steps/s\n", flush=True)
    t_run = time.perf_counter()
    for rep in range(args.repeats):
        results: list[dict] = []
        skipped: list[str] = []
        t_start = time.perf_counter()
        try:
            peaks = gemm_peaks(device, args.gemm_size, args.gemm_reps)
            print(peaks_line(peaks), flush=True)
            for name in names:
                if args.budget_s is not None and time.perf_counter() - t_run > args.budget_s:
                    skipped.append(name)
                    continue
                if args.in_process:
                    try:
                        r = run_one(name, args.warm, args.rounds, args.threads, device, branching, peaks)
                    except Exception as e:  # noqa: BLE001 - report it and go on with the next configuration
                        print(f"{name}: FAILED ({type(e).__name__}: {e})", flush=True)
                        continue
                else:
                    extra = ["--threads", str(args.threads), "--device", str(device), "--gemm-peaks",
                             json.dumps(peaks)]
                    if args.warm is not None:
                        extra += ["--warm", str(args.warm)]
                    if args.rounds is not None:
                        extra += ["--rounds", str(args.rounds)]
                    if args.branching is not None:
                        extra += ["--branching", args.branching]
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, *extra],
                                         capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"{name}: FAILED (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(r)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
                rs = ", ".join(f"{t:.1f}" for t in r["round_seconds"])
                mem = (f"peak CUDA {r['cuda_peak_mb']:,.0f} MB" if r["cuda_peak_mb"] is not None else
                       f"peak RSS delta {r['delta_rss_mb']:,.0f} MB")
                print(f"  {name}: {r['device_steps_per_s']:,.0f} device-steps/s (rounds of {r['steps']} steps: "
                      f"{rs} s), {r['gflops_per_s']:,.1f} GFLOP/s ({100 * r['frac_fp32_peak']:.1f}% of fp32 "
                      f"peak), {mem}, load {r['load_before']:.1f}->{r['load_after']:.1f}", flush=True)
        except _Terminated:
            print(f"\nterminated (SIGTERM) after {time.perf_counter() - t_start:.0f} s; partial results of run "
                  f"{rep + 1}:\n")
            print(table(results) + "\n", flush=True)
            sys.exit(143)
        print(f"\nrun {rep + 1} of {args.repeats} ({time.perf_counter() - t_start:.0f} s, load average now "
              f"{os.getloadavg()[0]:.2f}):\n")
        print(table(results) + "\n", flush=True)
        if skipped:
            print(f"skipped (--budget-s {args.budget_s:g} s reached): {', '.join(skipped)}\n", flush=True)


if __name__ == "__main__":
    main()
