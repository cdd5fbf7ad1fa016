"""End to end through ``Trainer.fit``: device-steps/s of QMLHFLStrategy, validation included, against the engine.

The same model, tree and schedule as ``bench/engine.py`` (100 devices in [4, 5, 5], tau = (5, 2, 2), QSGD s = 8 on
every layer, SGD lr 0.01, batch 32, the same executor), but as a user runs it: a LightningModule whose
``training_step`` computes the cross-entropy and logs it (``self.log("train_loss", ...)``), whose
``validation_step`` logs the accuracy and loss of the cloud model, a train DataLoader over 60,000 synthetic
MNIST-shaped images (batch 32, shuffled; the strategy materialises it once and partitions it IID) and a validation
DataLoader over 10,000 more (batch ``--val-batch``, default 1,000), validated once per global round
(Lightning's ``check_val_every_n_epoch=1``: one epoch = one global round). No checkpointing, no progress bar, no
logger: what is timed is the training loop, the strategy and the validation loop.

Timing: a callback records ``time.perf_counter()`` at the start and the end of every epoch (global round) and
around every validation run; the first ``--warm`` rounds are not timed (set-up, numba compilation, the first
validation); device-steps/s = 20 x 100 / median timed round (validation included). ``--no-val`` runs the same
without validation. Side by side in the same invocation, the script runs ``bench/engine.py --one`` for the same
configuration (a fresh subprocess; its device-steps/s has no validation and no Lightning), so the ratio
fit / engine is measured under the same machine conditions; each fit run is a fresh subprocess too.

Usage::

    python bench/fit.py                                # lenet100:loop and mlp100:vmap, engine and fit
    python bench/fit.py --configs lenet100:loop --rounds 3
    python bench/fit.py --one lenet100:loop --rounds 1 --warm 1     # one fit run, JSON line
    python bench/fit.py --configs mlp100:vmap --branching 2,2,2 --rounds 1   # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
sys.path.insert(0, HERE)

from engine import (  # noqa: E402  (bench/engine.py)
    BATCH, CONFIGS, INPUTS, LEVELS, LR, MODELS, PARTICIPATION, PRECISION, TAUS, make_data, parse_branching)

VAL = 10_000


def run_fit(name: str, warm: int, rounds: int, threads: int, val: bool, val_batch: int,
            branching: list[int] | None = None) -> dict:
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_qmlhfl import IID, QSGD, Hierarchy, QMLHFLStrategy
    from lightning_qmlhfl.federation.participation import Fraction, Full

    torch.set_num_threads(threads)
    model_name, tree, executor, _, _ = CONFIGS[name]
    branching = tree if branching is None else branching
    pool, shape = INPUTS[model_name]

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MODELS[model_name]()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.rounds: list[float] = []
            self.vals: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.t0 = time.perf_counter()

        def on_validation_start(self, trainer, module) -> None:
            self.v0 = time.perf_counter()

        def on_validation_end(self, trainer, module) -> None:
            self.vals.append(time.perf_counter() - self.v0)

        def on_train_epoch_end(self, trainer, module) -> None:
            self.rounds.append(time.perf_counter() - self.t0)

    X, Y, _ = make_data(1, pool=pool, shape=shape)  # bench/engine.py's synthetic data (the strategy partitions it)
    Xv, Yv, _ = make_data(1, seed=1, pool=VAL, shape=shape)
    train = DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=True)
    valid = DataLoader(TensorDataset(Xv, Yv), batch_size=val_batch)
    h = Hierarchy.balanced(list(branching))
    torch.manual_seed(0)
    fraction = PARTICIPATION.get(name)  # the partial-participation configurations, as in bench/engine.py
    participation = None if fraction is None else [Fraction(fraction)] + [Full()] * (len(TAUS) - 1)
    strategy = QMLHFLStrategy(hierarchy=h, taus=list(TAUS), compressors=[QSGD(LEVELS)] * len(TAUS), partition=IID(),
                              seed=0, executor=executor, device="cpu", participation=participation)
    clock = Clock()
    precision = PRECISION.get(name, "32-true")  # the +bf16 configurations: bf16-mixed, as in bench/engine.py
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", precision=precision, max_epochs=warm + rounds,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0, callbacks=[clock])
    t0 = time.perf_counter()
    trainer.fit(Net(), train, valid if val else None)
    wall = time.perf_counter() - t0
    timed = clock.rounds[warm:]
    dt = statistics.median(timed)
    steps = 20 * h.num_devices
    return {"name": name, "mode": "fit", "validation": val, "val_batch": val_batch, "warm": warm, "rounds": rounds,
            "round_seconds": timed, "seconds": dt, "device_steps_per_s": steps / dt,
            "best_device_steps_per_s": steps / min(timed), "val_seconds": clock.vals[warm:] if val else [],
            "fit_wall_s": wall, "threads": threads, "precision": precision, "devices": h.num_devices,
            "load_after": os.getloadavg()[0], "executor": executor,
            "executor_used": strategy.engine.executor_name}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="lenet100:loop,mlp100:vmap")
    ap.add_argument("--one", default=None, help="run one fit configuration in this process, print a JSON line")
    ap.add_argument("--warm", type=int, default=1, help="untimed global rounds (fit) / 20 x this local steps (engine)")
    ap.add_argument("--rounds", type=int, default=2, help="timed global rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-batch", type=int, default=1000)
    ap.add_argument("--no-val", action="store_true", help="fit without validation")
    ap.add_argument("--branching", default=None, help="replace the tree (e.g. 2,2,2; for smoke runs)")
    args = ap.parse_args(argv)
    bad = [n for n in ([args.one] if args.one else args.configs.split(",")) if n not in CONFIGS or "naive" in n]
    if bad:
        ap.error(f"unknown or naive configuration(s) {bad}; choose engine configurations of bench/engine.py")
    branching = parse_branching(args.branching)
    if args.one:
        print(json.dumps(run_fit(args.one, args.warm, args.rounds, args.threads, not args.no_val, args.val_batch,
                                 branching)))
        return
    common = ["--rounds", str(args.rounds), "--threads", str(args.threads)]
    if args.branching:
        common += ["--branching", args.branching]
    print(f"python bench/fit.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print("| config | engine device-steps/s | fit device-steps/s (validation incl.) | fit / engine | "
          "validation s per round | fit without validation | fit (no val) / engine |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.configs.split(","):
        eng = _subprocess([os.path.join(HERE, "engine.py"), "--one", name, "--warm", str(20 * args.warm), *common])
        fit = _subprocess([__file__, "--one", name, "--warm", str(args.warm), "--val-batch", str(args.val_batch),
                           *common])
        nov = _subprocess([__file__, "--one", name, "--warm", str(args.warm), "--no-val", *common])
        e, f, n = eng["device_steps_per_s"], fit["device_steps_per_s"], nov["device_steps_per_s"]
        val_s = statistics.median(fit["val_seconds"]) if fit["val_seconds"] else float("nan")
        print(f"| {name} | {e:,.0f} | {f:,.0f} | {f / e:.2f}x | {val_s:.2f} | {n:,.0f} | {n / e:.2f}x |", flush=True)
        for rec in (eng, fit, nov):
            print("  " + json.dumps({k: rec[k] for k in ("name", "seconds", "device_steps_per_s")
                                     if k in rec} | {"mode": rec.get("mode", "engine"),
                                                     "round_seconds": rec["round_seconds"]}))


if __name__ == "__main__":
    main()
