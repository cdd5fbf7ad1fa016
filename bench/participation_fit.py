"""Cost in proportion to the participants, through ``Trainer.fit`` (the path users run): the round time of a
partial-participation run against the same number of devices taking part without the others.

Workloads (the MLP of ``bench/engine.py``, 784-200-10; SGD lr 0.05, batch 32; 32-bit uploads; synthetic
MNIST-shaped data, 60,000 samples, IID; no validation, no logger, no checkpoints):

- ``50of50``: one aggregation layer, 50 devices, all of them every round, tau = 10;
- ``50of1000``: one aggregation layer, 1,000 devices, 50 drawn per round (``UniformK(50)``), tau = 10;
- ``full200``: two layers, 200 devices in [10, 20], tau = (5, 2), every device every period;
- ``p10of200``: the same with ``Fraction(0.1)`` at layer 1 (2 of every edge's 20 devices per layer-1 period).

Targets (issue: speed against the peers): a round of 50 of 1,000 costs at most 1.05x a round of 50 of 50; 10 %
participation costs at most 0.15x a full round.

Each configuration runs in a fresh subprocess (``--one``), alternating the configurations ``--repeats`` times;
per run, the median of the timed global rounds (after ``--warm`` untimed ones) is kept, and the ratios are taken
between the medians over runs. A callback records ``time.perf_counter()`` at the start and the end of every
epoch (one epoch = one global round).

Usage::

    python bench/participation_fit.py                       # all four, 3 repeats
    python bench/participation_fit.py --repeats 1 --rounds 1 --warm 1 --configs 50of50,50of1000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
sys.path.insert(0, HERE)

# name -> (branching, taus, participation at layer 1: None (full) | ("k", K) | ("fraction", f))
CONFIGS: dict[str, tuple[list[int], list[int], tuple[str, float] | None]] = {
    "50of50": ([50], [10], None),
    "50of1000": ([1000], [10], ("k", 50)),
    "full200": ([10, 20], [5, 2], None),
    "p10of200": ([10, 20], [5, 2], ("fraction", 0.1)),
}
PAIRS = [("50of1000", "50of50", 1.05), ("p10of200", "full200", 0.15)]  # (config, its reference, target ratio)
LR, BATCH = 0.05, 32


def run_one(name: str, warm: int, rounds: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from engine import MLP, make_data  # noqa: E402  (bench/engine.py)
    from lightning_qmlhfl import IID, Fraction, Full, Hierarchy, Identity, QMLHFLStrategy, UniformK

    branching, taus, part = CONFIGS[name]

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MLP()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.rounds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.rounds.append(time.perf_counter() - self.t0)

    X, Y, _ = make_data(1)
    first = None if part is None else (UniformK(int(part[1]), weighting="normalized") if part[0] == "k"
                                       else Fraction(part[1]))
    participation = None if first is None else [first] + [Full()] * (len(taus) - 1)
    torch.manual_seed(0)
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced(branching), taus=taus,
                              compressors=[Identity()] * len(taus), partition=IID(), seed=0, device="cpu",
                              participation=participation)
    clock = Clock()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_epochs=warm + rounds, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    t0 = time.perf_counter()
    trainer.fit(Net(), DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=True))
    timed = clock.rounds[warm:]
    return {"name": name, "round_seconds": timed, "median_round_s": statistics.median(timed),
            "fit_wall_s": time.perf_counter() - t0, "threads": threads, "executor": strategy.engine.executor_name,
            "devices": Hierarchy.balanced(branching).num_devices,
            "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", default=None, help="run one configuration in this process, print its JSON line")
    ap.add_argument("--warm", type=int, default=1, help="untimed global rounds")
    ap.add_argument("--rounds", type=int, default=3, help="timed global rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jsonl", default=None, help="append every run's JSON line to this file")
    args = ap.parse_args(argv)
    if args.one is not None:
        if args.one not in CONFIGS:
            raise SystemExit(f"--one must be one of {sorted(CONFIGS)}, got {args.one!r}")
        print(json.dumps(run_one(args.one, args.warm, args.rounds, args.threads)))
        return
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; known: {sorted(CONFIGS)}")
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, load average at start {os.getloadavg()[0]:.2f}")
    print(f"command: python bench/participation_fit.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--warm", str(args.warm), "--rounds",
                                  str(args.rounds), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True, timeout=3600)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["repeat"] = r
            medians[name].append(rec["median_round_s"])
            print(f"  run {r + 1} {name}: median round {rec['median_round_s']:.3f} s "
                  f"(rounds {', '.join(f'{s:.3f}' for s in rec['round_seconds'])}; load {rec['load_after']:.2f})",
                  flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    print("\n| config | median round (s), per run | median |\n|---|---|---:|")
    for name in names:
        print(f"| {name} | {', '.join(f'{s:.3f}' for s in medians[name])} | {statistics.median(medians[name]):.3f} |")
    print("\n| ratio | measured | target | met |\n|---|---:|---:|---|")
    for a, b, target in PAIRS:
        if a in medians and b in medians:
            ratio = statistics.median(medians[a]) / statistics.median(medians[b])
            print(f"| {a} / {b} | {ratio:.3f} | <= {target} | {'yes' if ratio <= target else 'no'} |")


if __name__ == "__main__":
    main()
