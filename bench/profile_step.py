"""Where the time of one engine local step goes: a manual timing breakdown and a torch.profiler operator table.

Same setup as ``bench/engine.py`` (100 devices in [4, 5, 5], tau = (5, 2, 2), QSGD s = 8, SGD lr 0.01, batch 32,
synthetic resident MNIST-shaped data). Phases, each timed with ``time.perf_counter`` around the engine's own calls
over whole global rounds (20 local steps, 4 + 2 + 1 aggregations), reported as milliseconds per local step:

- ``gather``: the batch gather (random positions, ``gather_batch`` of x and y), as the strategy does it;
- ``executor``: the executor call (forward + backward of every device, gradients out);
- ``optimizer``: ``DeviceOptimizer.step`` (Eq. 3 over the stack);
- ``aggregate``: every ``_aggregate(n)`` (Eq. 4/6 and the Eq. 5 resynchronisation), averaged over the 20 steps;
- ``other``: the rest of ``local_step`` (bookkeeping).

``--profile`` adds a ``torch.profiler`` table (self CPU time by operator) of one global round.

Usage::

    python bench/profile_step.py --model mlp --executor vmap
    python bench/profile_step.py --model lenet --executor loop --profile
    python bench/profile_step.py --model mlp --executor vmap --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine import BATCH, INPUTS, LEVELS, LR, MODELS, TAUS, ce_loss, make_data  # noqa: E402  (bench/engine.py)

from lightning_qmlhfl import QSGD, Hierarchy  # noqa: E402
from lightning_qmlhfl.simulation.engine import QMLHFLEngine, gather_batch  # noqa: E402


class Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self(name):
                return fn(*a, **k)

        setattr(obj, attr, timed)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp", choices=sorted(MODELS))
    ap.add_argument("--executor", default="vmap", help="vmap, loop, auto or any name make_executor accepts")
    ap.add_argument("--branching", default="4,5,5")
    ap.add_argument("--rounds", type=int, default=2, help="timed global rounds (20 local steps each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one round")
    ap.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    branching = [int(b) for b in args.branching.split(",")]
    h = Hierarchy.balanced(branching)
    pool, shape = INPUTS[args.model]
    X, Y, part = make_data(h.num_devices, pool=pool, shape=shape)
    torch.manual_seed(0)
    engine = QMLHFLEngine(MODELS[args.model](), ce_loss, h, TAUS, [QSGD(LEVELS, bucket_size=None)] * len(TAUS), optimizer="sgd",
                          optimizer_kwargs={"lr": LR}, executor=args.executor, seed=0)
    g = torch.Generator().manual_seed(1)
    per_dev = part.shape[1]
    timer = Timer()
    name = engine.executor_name
    timer.wrap(engine, "executor", "executor")
    timer.wrap(engine.optimizer, "step", "optimizer")
    timer.wrap(engine, "_aggregate", "aggregate")
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())

    def step() -> None:
        with timer("gather"):
            pos = torch.randint(0, per_dev, (part.shape[0], BATCH), generator=g)
            idx = part.gather(1, pos)
            batch = (gather_batch(X, idx), gather_batch(Y, idx))
        with timer("local_step"):
            with autocast:
                engine.compute_gradients(batch)
            engine.apply_step()

    for _ in range(20):
        step()
    timer.totals.clear()
    steps = 20 * args.rounds
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    t = {k: 1e3 * v / steps for k, v in timer.totals.items()}
    other = t["local_step"] - t["executor"] - t["optimizer"] - t["aggregate"]
    print(f"{args.model} x {h.num_devices} devices, executor {name}, precision {args.precision}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"  {1e3 * wall / steps:7.2f} ms per local step ({steps * h.num_devices / wall:,.0f} device-steps/s)")
    for k in ("gather", "executor", "optimizer", "aggregate"):
        print(f"  {k:>10}: {t[k]:7.2f} ms")
    print(f"  {'other':>10}: {other:7.2f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
