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

``--breakdown`` also splits every timed round into where its time goes (wall-clock timers around the strategy's
and the engine's methods and around Lightning's ``LightningModule.log``; the timers add a few microseconds a call):

- ``fwd+bwd``: the engine's ``compute_gradients`` (every training device's forward and backward);
- ``update``: the engine's ``apply_step`` without the aggregations (the devices' optimizer step, the write-back);
- ``aggregate``: the aggregations that fall due (Eqs. 4-6);
- ``batches``: the strategy's batch gather (``next_batch``: the sampler and the stacked mini-batches);
- ``self.log``: time inside Lightning's ``LightningModule.log`` (the per-step device mean of the module's own
  ``self.log("train_loss", ...)`` and the strategy's per-round ``fl/...`` record);
- ``strategy other``: the rest of the strategy's ``training_step`` and ``optimizer_step``;
- ``Lightning loop``: the rest of the round (Lightning's loop, hooks and epoch-end metric handling).

Usage::

    python bench/participation_fit.py                       # all four, 3 repeats
    python bench/participation_fit.py --repeats 1 --rounds 1 --warm 1 --configs 50of50,50of1000   # quick
    python bench/participation_fit.py --configs full200,p10of200 --breakdown       # and where the time goes
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
PARTS = ("fwd+bwd", "update", "aggregate", "batches", "self.log", "strategy other", "Lightning loop")


class Timers:
    """Wall-clock totals of wrapped methods since the last :meth:`take` (the breakdown above)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, owner: type, name: str, label: str) -> None:
        import functools

        fn = getattr(owner, name)

        @functools.wraps(fn)  # keeps the signature (the strategy binds LightningModule.log's arguments)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.total = self.total, {}
        return out


def install_timers() -> Timers:
    import lightning.pytorch as pl

    from lightning_qmlhfl.simulation.engine import QMLHFLEngine
    from lightning_qmlhfl.strategy.core import QMLHFLCore

    t = Timers()
    for owner, name, label in ((QMLHFLEngine, "compute_gradients", "fwd+bwd"),
                               (QMLHFLEngine, "apply_step", "apply_step"),
                               (QMLHFLEngine, "_aggregate", "aggregate"),
                               (QMLHFLCore, "next_batch", "batches"),
                               (QMLHFLCore, "training_step", "core.training_step"),
                               (QMLHFLCore, "optimizer_step", "core.optimizer_step"),
                               (pl.LightningModule, "log", "self.log")):
        t.wrap(owner, name, label)
    return t


def split_round(raw: dict[str, float], round_s: float) -> dict[str, float]:
    """One round's timer totals as the disjoint parts of ``PARTS`` (seconds). ``self.log`` is called from inside
    the strategy's hooks, the aggregations from inside ``apply_step`` and that from inside ``optimizer_step``."""
    g = raw.get
    hooks = g("core.training_step", 0.0) + g("core.optimizer_step", 0.0)
    return {"fwd+bwd": g("fwd+bwd", 0.0), "update": g("apply_step", 0.0) - g("aggregate", 0.0),
            "aggregate": g("aggregate", 0.0), "batches": g("batches", 0.0), "self.log": g("self.log", 0.0),
            "strategy other": hooks - g("fwd+bwd", 0.0) - g("apply_step", 0.0) - g("self.log", 0.0),
            "Lightning loop": round_s - hooks - g("batches", 0.0)}


def run_one(name: str, warm: int, rounds: int, threads: int, breakdown: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from workloads import MLP, make_data  # bench/workloads.py
    from lightning_qmlhfl import IID, Fraction, Full, Hierarchy, Identity, QMLHFLStrategy, UniformK

    timers = install_timers() if breakdown else None
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
            self.parts: list[dict[str, float]] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            if timers is not None:
                timers.take()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.rounds.append(time.perf_counter() - self.t0)
            if timers is not None:
                self.parts.append(split_round(timers.take(), self.rounds[-1]))

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
    rec = {"name": name, "round_seconds": timed, "median_round_s": statistics.median(timed),
           "fit_wall_s": time.perf_counter() - t0, "threads": threads, "executor": strategy.engine.executor_name,
           "devices": Hierarchy.balanced(branching).num_devices,
           "load_after": os.getloadavg()[0]}
    if breakdown:  # seconds per round, the median over the timed rounds of every part
        rec["parts_s"] = {p: statistics.median(r[p] for r in clock.parts[warm:]) for p in PARTS}
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", default=None, help="run one configuration in this process, print its JSON line")
    ap.add_argument("--warm", type=int, default=1, help="untimed global rounds")
    ap.add_argument("--rounds", type=int, default=3, help="timed global rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jsonl", default=None, help="append every run's JSON line to this file")
    ap.add_argument("--breakdown", action="store_true", help="split every round into where its time goes")
    args = ap.parse_args(argv)
    if args.one is not None:
        if args.one not in CONFIGS:
            raise SystemExit(f"--one must be one of {sorted(CONFIGS)}, got {args.one!r}")
        print(json.dumps(run_one(args.one, args.warm, args.rounds, args.threads, args.breakdown)))
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
    parts: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--warm", str(args.warm), "--rounds",
                                  str(args.rounds), "--threads", str(args.threads)]
                                 + (["--breakdown"] if args.breakdown else []),
                                 check=True, capture_output=True, text=True, timeout=3600)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["repeat"] = r
            medians[name].append(rec["median_round_s"])
            if args.breakdown:
                parts[name].append(rec["parts_s"])
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
    if args.breakdown:
        print_breakdown(names, medians, parts)


def print_breakdown(names: list[str], medians: dict[str, list[float]],
                    parts: dict[str, list[dict[str, float]]]) -> None:
    """ms per round of every part (medians over the runs), and the pairs' ratio part by part."""
    ms = {n: {p: 1e3 * statistics.median(r[p] for r in parts[n]) for p in PARTS} for n in names}
    print("\nWhere a round's time goes, ms per round (median over the runs of each run's median round):\n")
    print("| config | " + " | ".join(PARTS) + " | round |\n|---|" + "---:|" * (len(PARTS) + 1))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{ms[n][p]:.1f}" for p in PARTS)
              + f" | {1e3 * statistics.median(medians[n]):.1f} |")
    own = [p for p in PARTS if p not in ("self.log", "Lightning loop")]
    for a, b, _ in PAIRS:
        if a in ms and b in ms:
            cells = " | ".join(f"{ms[a][p] / ms[b][p]:.2f}" if ms[b][p] > 0 else "-" for p in PARTS)
            rounds = statistics.median(medians[a]) / statistics.median(medians[b])
            print(f"| {a} / {b} | {cells} | {rounds:.3f} |")
    for a, b, target in PAIRS:
        if a in ms and b in ms:
            rest = sum(ms[a][p] for p in own) / sum(ms[b][p] for p in own)
            print(f"\n{a} / {b} without Lightning's self.log and loop (the parts this project runs): {rest:.3f} "
                  f"(target <= {target})")


if __name__ == "__main__":
    main()
