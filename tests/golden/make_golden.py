"""Write the golden outputs of the engine and the strategy, to hold a refactor to "changes no number".

    python tests/golden/make_golden.py          # (repository root) rewrites tests/golden/*.pt
    python tests/golden/make_golden.py --this-machine   # another machine's numbers: tests/golden/machines/KEY/

Run once on the commit before a refactor; tests/test_golden.py then reruns the same configurations and compares
every number. The files hold tensors and plain data only (loaded with ``weights_only=True``):

- ``engine_runs.pt``: for each configuration of :data:`RUNS` (every aggregation feature: compressors with and
  without error feedback, server optimizers, participation with availability and stragglers, mobility with edge
  failures, BatchNorm buffers, parameter groups with clipping and the module storage order, bf16 storage), the
  snapshot of the engine after its steps (:func:`snapshot`).
- ``engine_checkpoint_v1.pt``: an engine ``state_dict()`` written by the code of that commit in the middle of the
  richest configuration, and the snapshot after continuing it: a later engine must load the old checkpoint and
  continue bit for bit.
- ``strategy_checkpoint_v1.ckpt`` and ``strategy_final.pt``: a Lightning checkpoint of ``QMLHFLStrategy`` after one
  global round of a small MNIST run, and the cloud model and history after three rounds of the uninterrupted run.
- ``machine``: the torch version and CPU capability the files were made with. Bit-for-bit comparison holds on the
  same build and instruction set; elsewhere the test compares to float tolerance (oneDNN picks kernels by ISA).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from lightning_qmlhfl import (QSGD, Availability, EdgeFailures, FedAdam, FedAvgM, FedYogi, Fraction, Full,  # noqa: E402
                              Hierarchy, Identity, LatencyModel, NaturalCompression, RandomReassociation,
                              ScaledSign, TopK, UniformK)

from golden.common import (MLP, SmallCNN, batches_for, build_engine, machine, snapshot)  # noqa: E402

IRREGULAR = Hierarchy.from_parents([[0, 0, 0, 1, 2, 2, 3, 3], [0, 0, 1, 1], [0, 0]])
BALANCED = Hierarchy.balanced([2, 2, 3])


def _latency(h: Hierarchy) -> LatencyModel:
    return LatencyModel.lognormal(h, 0.01, [1e3, 1e2, 1e1], compute_sigma=0.5, rate_sigma=0.5, seed=3,
                                  deadlines=[0.6, None, None], straggler="drop")


# name -> (model, hierarchy, taus, engine options, steps)
RUNS: dict[str, tuple] = {
    "qsgd": ("mlp", IRREGULAR, [2, 2, 1], dict(compressors=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), QSGD(2, bucket_size=16)],
                                               optimizer="sgd", optimizer_kwargs={"lr": 0.2, "momentum": 0.5},
                                               executor="vmap", seed=7), 12),
    "compressors_ef": ("mlp", IRREGULAR, [2, 2, 1], dict(
        compressors=[TopK(ratio=0.3, error_feedback="ef"), ScaledSign(bucket_size=16, error_feedback="ef21"),
                     NaturalCompression("ef")],
        optimizer="sgd", optimizer_kwargs={"lr": 0.2}, executor="loop", seed=1), 12),
    "server_optimizers": ("mlp", BALANCED, [2, 1, 2], dict(
        compressors=[QSGD(4, bucket_size=None, error_feedback="ef"), Identity(), QSGD(8, bucket_size=None)], optimizer="adam",
        optimizer_kwargs={"lr": 0.01}, server_optimizers=[FedAvgM(lr=1.0, momentum=0.9), FedAdam(lr=0.05),
                                                          FedYogi(lr=0.05)], seed=2), 12),
    "participation": ("mlp", BALANCED, [2, 1, 2], dict(
        compressors=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), None], optimizer="sgd", optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
        participation=[Fraction(0.5), UniformK(1, over_select=1.0), Full(weighting="normalized")],
        availability=Availability(unavailable=0.2, dropout=0.15), latency=_latency(BALANCED), seed=3), 16),
    "mobility": ("mlp", Hierarchy.balanced([2, 3, 4]), [2, 2, 1], dict(
        compressors=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), None], optimizer_kwargs={"lr": 0.1}, seed=2,
        mobility=RandomReassociation(0.3, mid_period=0.1, failures=EdgeFailures(0.2, mode="fallback"))), 12),
    "batchnorm": ("cnn", Hierarchy.balanced([2, 2]), [2, 1], dict(
        compressors=[QSGD(8, bucket_size=None), None], optimizer_kwargs={"lr": 0.1}, executor="loop", seed=3), 8),
    "groups_clip_module_order": ("mlp", Hierarchy.balanced([2, 3]), [2, 2], dict(
        compressors=[QSGD(4, bucket_size=10), QSGD(8, bucket_size=None)], optimizer="sgd",
        param_groups=[{"params": ["fc1.weight", "fc1.bias"], "lr": 0.3, "momentum": 0.9},
                      {"params": ["fc2.weight"], "lr": 0.1, "weight_decay": 0.01}],
        grad_clip=("norm", 0.5), param_order="module", seed=4), 8),
    "bf16_storage": ("mlp_bf16", Hierarchy.balanced([2, 2]), [2, 2], dict(
        compressors=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None, error_feedback="ef")], optimizer_kwargs={"lr": 0.2}, seed=5), 8),
    "samples_weighting": ("mlp", IRREGULAR, [1, 2, 1], dict(
        compressors=[QSGD(4, bucket_size=None), None, QSGD(8, bucket_size=None)], optimizer_kwargs={"lr": 0.2},
        device_mass=torch.arange(1.0, 9.0, dtype=torch.float64), seed=6), 8),
}
CHECKPOINT_RUN = "participation"  # the richest state: population, clock, EF, per-device momentum
CHECKPOINT_AT = 7  # steps before the checkpoint (inside a period: selections and partial sums in flight)


def make_engine_runs() -> dict:
    out = {}
    for name, (model, h, taus, kw, steps) in RUNS.items():
        engine = build_engine(model, h, taus, kw)
        for b in batches_for(engine, steps):
            engine.local_step(b)
        out[name] = snapshot(engine)
    return out


def make_engine_checkpoint() -> dict:
    model, h, taus, kw, steps = RUNS[CHECKPOINT_RUN]
    engine = build_engine(model, h, taus, kw)
    batches = batches_for(engine, steps)
    for b in batches[:CHECKPOINT_AT]:
        engine.local_step(b)
    sd = copy.deepcopy(engine.state_dict())
    for b in batches[CHECKPOINT_AT:]:
        engine.local_step(b)
    return {"run": CHECKPOINT_RUN, "at": CHECKPOINT_AT, "state_dict": sd, "final": snapshot(engine)}


def make_strategy_checkpoint() -> dict:
    from golden.common import strategy_run

    final, history = strategy_run(HERE / "_strategy_tmp", rounds=3, keep_round_1=HERE / "strategy_checkpoint_v1.ckpt")
    return {"cloud": final, "history": history}


def main() -> None:
    torch.set_num_threads(1)
    if "--this-machine" in sys.argv[1:]:  # this machine's numbers of the same runs, beside the base files
        from golden.common import machine_dir, on_base_machine, strategy_run

        if on_base_machine():
            raise SystemExit("this is the machine of tests/golden/*.pt: rewrite those (no option) or leave them")
        out = machine_dir()
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"machine": machine(), "runs": make_engine_runs()}, out / "engine_runs.pt")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="golden-strategy-") as tmp:
            final, history = strategy_run(Path(tmp), rounds=3)
        torch.save({"machine": machine(), "cloud": final, "history": history}, out / "strategy_final.pt")
        print("written:", out)
        return
    torch.save({"machine": machine(), "runs": make_engine_runs()}, HERE / "engine_runs.pt")
    torch.save({"machine": machine(), **make_engine_checkpoint()}, HERE / "engine_checkpoint_v1.pt")
    torch.save({"machine": machine(), **make_strategy_checkpoint()}, HERE / "strategy_final.pt")
    print("written:", *sorted(p.name for p in HERE.glob("*.pt")), *sorted(p.name for p in HERE.glob("*.ckpt")))


if __name__ == "__main__":
    main()
