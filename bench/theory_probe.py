"""What measuring the constants costs (``theory=measure``, docs/algorithm.md#measured-constants): the time of a
global round with and without the probe, side by side in one process, alternating.

Workload: the MLP of ``bench/engine.py`` (784-200-10), 64 devices in ``Hierarchy.balanced([4, 4, 4])``, taus
(5, 4, 2) (40 local steps a round), QSGD(8, 512) on every uplink, SGD lr 0.05, batch 32 per device, synthetic
MNIST-shaped data, the vmap executor. The probe samples ``rows`` devices (default 8) once per round.

Usage::

    python bench/theory_probe.py                 # 5 repeats of 3 rounds each, both variants
    python bench/theory_probe.py --repeats 2 --rounds 1 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_qmlhfl import Hierarchy  # noqa: E402
from lightning_qmlhfl.config import SimulationConfig  # noqa: E402
from lightning_qmlhfl.simulation.engine import QMLHFLEngine  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))


def loss_fn(module: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def round_seconds(theory, rounds: int, rows: int) -> list[float]:
    torch.manual_seed(0)
    h = Hierarchy.balanced([4, 4, 4])
    cfg = SimulationConfig.build(h, [5, 4, 2], [8, 8, 8], executor="vmap", seed=0,
                                 theory=None if theory is None else {"name": "measure", "rows": rows, "warn": False})
    e = QMLHFLEngine(mlp(), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": 0.05}, config=cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, 784, generator=g)
    y = torch.randint(0, 10, (64, 32), generator=g)
    e.run_round(lambda: (x, y))  # warm-up (allocations, first vmap trace)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        e.run_round(lambda: (x, y))
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    off, on = [], []
    for _ in range(a.repeats):
        off.append(statistics.median(round_seconds(None, a.rounds, a.rows)))
        on.append(statistics.median(round_seconds("measure", a.rounds, a.rows)))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 64 devices, 40 local steps a round, "
          f"probe rows {a.rows}")
    print(f"round without the probe: {m_off:.3f} s (runs {[round(v, 3) for v in off]})")
    print(f"round with the probe:    {m_on:.3f} s (runs {[round(v, 3) for v in on]})")
    print(f"ratio with / without: {m_on / m_off:.3f}")


if __name__ == "__main__":
    main()
