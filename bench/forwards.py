"""The loop executor's two forward modes side by side in the engine: ``forwards="ordered"`` (the forwards in
device order, a chain between the workers) against ``"concurrent"`` (each worker on its own module copy, taking
the next free device), on the peers' LeNet with dropout (100 devices, batch 32, SGD), idle and with one busy-loop
process per core (``--competing-load``). Three configurations: ordered with torch's global generator (the
default), ordered with per-device streams (``device_rng="stream"``), concurrent with per-device streams (the only
random draws it allows).

Each measurement is a fresh process (``--child``) that runs ``--warm`` steps, then times ``--steps`` engine steps
(``compute_gradients`` + ``apply_step``) and reports the median in ms per client-step. The modes alternate,
``--repeats`` times, so that drift in the machine's speed falls on both. With ``--in-process`` each repeat is one
fresh process holding the three engines, stepped in turn, which removes the spread between processes (a few
percent to 20 % on this VM) from the comparison.

    python bench/forwards.py --threads 1,2 --repeats 3 --competing-load both --jsonl bench/results/forwards.jsonl
    python bench/forwards.py --threads 1,2 --repeats 3 --in-process --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = (("ordered", "global"), ("ordered", "stream"), ("concurrent", "stream"))  # (forwards, device_rng)


def _engines(modes: tuple[tuple[str, str], ...], threads: int) -> tuple[list, tuple]:
    """One engine per mode (same model, seed and tree) and the resident mini-batch of the 100 devices."""
    import torch

    torch.set_num_threads(threads)
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE / "peers"))
    import common  # the peers' model definition (LeNet with Dropout2d and Dropout)

    from lightning_qmlhfl import Hierarchy
    from lightning_qmlhfl.simulation.engine import QMLHFLEngine

    def loss(module, batch):
        x, y = batch
        return F.cross_entropy(module(x), y), {}

    engines = []
    for mode, device_rng in modes:
        torch.manual_seed(0)
        engines.append(QMLHFLEngine(common.build_model("lenet"), loss, Hierarchy.balanced([100]), (10,),
                                    executor="loop", forwards=mode, optimizer_kwargs={"lr": 0.05},
                                    device_rng=device_rng))
    return engines, (torch.randn(100, 32, 1, 28, 28), torch.randint(0, 10, (100, 32)))


def _step(engine, batch) -> float:
    t = time.perf_counter()
    engine.compute_gradients(batch)
    engine.apply_step()
    return time.perf_counter() - t


def child(mode: str, device_rng: str, threads: int, warm: int, steps: int) -> float:
    (engine,), batch = _engines(((mode, device_rng),), threads)
    times = [_step(engine, batch) for _ in range(warm + steps)][warm:]
    return 1000 * statistics.median(times) / 100


def in_process(threads: int, warm: int, steps: int) -> list[float]:
    """The three modes' engines in one process, stepped in turn (mode 1, 2, 3, 1, 2, 3, ...), so that the
    machine's drift and the process's own state (allocator, thread pools) fall on all of them alike; ms per
    client-step per mode (medians)."""
    engines, batch = _engines(MODES, threads)
    times: list[list[float]] = [[] for _ in MODES]
    for i in range(warm + steps):
        for k, engine in enumerate(engines):
            t = _step(engine, batch)
            if i >= warm:
                times[k].append(t)
    return [1000 * statistics.median(t) / 100 for t in times]


def child_line(flags: list[str], threads: int, args: argparse.Namespace, cores: list[int]) -> str:
    """The last output line of this script run with ``flags`` on the first ``threads`` cores."""
    out = subprocess.run([sys.executable, __file__, *flags, "--warm", str(args.warm), "--steps", str(args.steps)],
                         check=True, capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, set(cores[:threads])))
    return out.stdout.strip().splitlines()[-1]


def record(jsonl: str | None, busy: bool, threads: int, mode: tuple[str, str], repeat: int, ms: float,
           in_process: bool) -> None:
    line = {"load": "busy" if busy else "idle", "threads": threads, "forwards": mode[0], "device_rng": mode[1],
            "repeat": repeat, "in_process": in_process, "ms_per_client_step": round(ms, 4),
            "loadavg": os.getloadavg()[0]}
    print(json.dumps(line), flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--competing-load", default="off", choices=("off", "on", "both"))
    ap.add_argument("--jsonl", default=None, help="append one line per measurement")
    ap.add_argument("--in-process", action="store_true",
                    help="all three modes in one process per repeat, stepped in turn (idle machine only)")
    ap.add_argument("--child", nargs=3, metavar=("FORWARDS", "DEVICE_RNG", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--child-all", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child[0], args.child[1], int(args.child[2]), args.warm, args.steps))
        return
    if args.child_all:
        print(json.dumps(in_process(args.child_all, args.warm, args.steps)))
        return
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        sys.exit(f"--threads {args.threads!r}: allowed are comma-separated integers >= 1")
    if any(t < 1 for t in threads) or args.repeats < 1 or args.steps < 1 or args.warm < 0:
        sys.exit(f"--threads {args.threads}, --repeats {args.repeats}, --steps {args.steps}, --warm {args.warm}: "
                 "allowed are threads, repeats and steps >= 1, warm >= 0")
    cores = sorted(os.sched_getaffinity(0))
    loads = {"off": [False], "on": [True], "both": [False, True]}[args.competing_load]
    results: dict[tuple, list[float]] = {}
    for busy in loads:
        for t in threads:
            hogs = []
            if busy:  # one busy loop per core the run may use, pinned to it
                for c in cores[:t]:
                    hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                                 preexec_fn=lambda c=c: os.sched_setaffinity(0, {c})))
                time.sleep(0.5)
            try:
                for r in range(args.repeats):
                    if args.in_process:  # one process, the three modes stepped in turn
                        measured = dict(zip(MODES, json.loads(child_line(["--child-all", str(t)], t, args, cores))))
                    else:  # a fresh process per mode
                        measured = {mode: float(child_line(["--child", *mode, str(t)], t, args, cores))
                                    for mode in MODES}
                    for mode in MODES:
                        results.setdefault((busy, t, mode), []).append(measured[mode])
                        record(args.jsonl, busy, t, mode, r, measured[mode], in_process=args.in_process)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    names = [f"{f}, {g}" for f, g in MODES]
    print(f"\n| load | threads | ms per client-step: {' | '.join(names)} | speed / ordered, global (medians) |")
    print("|---|---:|" + "---|" * len(MODES) + "---|")
    for busy in loads:
        for t in threads:
            runs = [results[(busy, t, m)] for m in MODES]
            base = statistics.median(runs[0])
            cells = " | ".join(", ".join(f"{v:.2f}" for v in r) for r in runs)
            speed = ", ".join(f"{base / statistics.median(r):.2f}x" for r in runs[1:])
            print(f"| {'busy' if busy else 'idle'} | {t} | {cells} | {speed} |")


if __name__ == "__main__":
    main()
