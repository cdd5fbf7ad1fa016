"""The loop executor's two forward modes side by side in the engine: ``forwards="ordered"`` (the forwards in
device order, a chain between the workers) against ``"concurrent"`` (each worker on its own module copy, taking
the next free device), on the peers' LeNet with dropout (100 devices, batch 32, SGD), idle and with one busy-loop
process per core (``--competing-load``). Three configurations: ordered with torch's global generator (the
default), ordered with per-device streams (``device_rng="stream"``), concurrent with per-device streams (the only
random draws it allows).

Each measurement is a fresh process (``--child``) that runs ``--warm`` steps, then times ``--steps`` engine steps
(``compute_gradients`` + ``apply_step``) and reports the median in ms per client-step. The modes alternate,
``--repeats`` times, so that drift in the machine's speed falls on both.

    python bench/forwards.py --threads 1,2 --repeats 3 --competing-load both --jsonl bench/results/forwards.jsonl
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


def child(mode: str, device_rng: str, threads: int, warm: int, steps: int) -> float:
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

    torch.manual_seed(0)
    engine = QMLHFLEngine(common.build_model("lenet"), loss, Hierarchy.balanced([100]), (10,), executor="loop",
                          forwards=mode, optimizer_kwargs={"lr": 0.05}, device_rng=device_rng)
    x, y = torch.randn(100, 32, 1, 28, 28), torch.randint(0, 10, (100, 32))
    times = []
    for i in range(warm + steps):
        t = time.perf_counter()
        engine.compute_gradients((x, y))
        engine.apply_step()
        if i >= warm:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times) / 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--competing-load", default="off", choices=("off", "on", "both"))
    ap.add_argument("--jsonl", default=None, help="append one line per measurement")
    ap.add_argument("--child", nargs=3, metavar=("FORWARDS", "DEVICE_RNG", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child[0], args.child[1], int(args.child[2]), args.warm, args.steps))
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
                    for mode in MODES:
                        out = subprocess.run([sys.executable, __file__, "--child", *mode, str(t), "--warm",
                                              str(args.warm), "--steps", str(args.steps)], check=True,
                                             capture_output=True, text=True,
                                             preexec_fn=lambda t=t: os.sched_setaffinity(0, set(cores[:t])))
                        ms = float(out.stdout.strip().splitlines()[-1])
                        results.setdefault((busy, t, mode), []).append(ms)
                        line = {"load": "busy" if busy else "idle", "threads": t, "forwards": mode[0],
                                "device_rng": mode[1], "repeat": r,
                                "ms_per_client_step": round(ms, 4), "loadavg": os.getloadavg()[0]}
                        print(json.dumps(line), flush=True)
                        if args.jsonl:
                            with open(args.jsonl, "a") as f:
                                f.write(json.dumps(line) + "\n")
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
