"""Loading a checkpoint takes copies: training on does not change the caller's state dict, so one checkpoint can
start several runs (before, torch's Optimizer.load_state_dict kept the momentum buffers it was given, and the run
trained them in place inside the caller's dict)."""

from __future__ import annotations

import copy

import pytest
import torch
from golden.common import GOLDEN, batches_for, build_engine, snapshot
from golden.make_golden import CHECKPOINT_AT, CHECKPOINT_RUN, RUNS


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _continue(name: str, sd: dict, batches: list) -> dict:
    model, h, taus, kw, _ = RUNS[name]
    engine = build_engine(model, h, taus, kw)
    engine.load_state_dict(sd)
    for b in batches:
        engine.local_step(b)
    return snapshot(engine)


@pytest.mark.parametrize("name", ["participation", "compressors_ef", "server_optimizers"])
def test_one_checkpoint_starts_two_equal_runs_and_stays_as_it_was(name):
    torch.set_num_threads(1)
    model, h, taus, kw, steps = RUNS[name]
    engine = build_engine(model, h, taus, kw)
    batches = batches_for(engine, steps)
    half = steps // 2 + 1  # inside a period where the periods are longer than a step
    for b in batches[:half]:
        engine.local_step(b)
    sd = engine.state_dict()
    kept = copy.deepcopy(sd)
    first = _continue(name, sd, batches[half:])
    assert _equal(sd, kept), "training after load_state_dict changed the checkpoint it was loaded from"
    second = _continue(name, sd, batches[half:])
    assert _equal(first, second)


def test_an_old_format_checkpoint_stays_as_it_was():
    torch.set_num_threads(1)
    golden = torch.load(GOLDEN / "engine_checkpoint_v1.pt", weights_only=True)
    sd = golden["state_dict"]
    kept = copy.deepcopy(sd)
    model, h, taus, kw, steps = RUNS[CHECKPOINT_RUN]
    batches = batches_for(build_engine(model, h, taus, kw), steps)[CHECKPOINT_AT:]
    first = _continue(CHECKPOINT_RUN, sd, batches)
    assert _equal(sd, kept)
    assert _equal(first, _continue(CHECKPOINT_RUN, sd, batches))
