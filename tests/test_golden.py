"""Refactors change no number: the engine and the strategy against the golden outputs of tests/golden/.

The files were written by ``tests/golden/make_golden.py`` on the commit before the redesign (engine runs with every
aggregation feature, an engine checkpoint and a Lightning checkpoint in the format of that commit). On the same torch
build, CPU instruction set and CPU vendor every number must be equal; elsewhere the float results of the same
program can differ in the last bits (MKL and oneDNN choose kernels by ISA and vendor). Another machine's numbers
can be kept in ``tests/golden/machines/KEY/`` (``make_golden.py --this-machine``, run on a commit whose numbers
equal the base files' on the base machine); the engine runs and the strategy run are then compared with those.
The continuations of the old checkpoints are compared bit for bit on the base machine only; elsewhere only the
machine-independent properties are checked: the old checkpoints load, and a resumed run equals the uninterrupted
one on this machine.
"""

from __future__ import annotations

import pytest
import torch
from golden.common import (
    GOLDEN,
    batches_for,
    build_engine,
    golden_numbers,
    machine,
    machine_dir,
    on_base_machine,
    snapshot,
    strategy_run,
)
from golden.make_golden import CHECKPOINT_AT, CHECKPOINT_RUN, RUNS

SAME_MACHINE = on_base_machine()  # the machine of the checkpoints' continuations
NUMBERS = golden_numbers()  # this machine's golden numbers (tests/golden/ or its machine directory), or None
NEEDS_NUMBERS = pytest.mark.skipif(
    NUMBERS is None, reason=f"no golden numbers for this machine ({machine()}; none in {machine_dir()}): bit for bit "
                            f"needs the same torch build, CPU instruction set and vendor")
RUNS_FILE = torch.load(NUMBERS / "engine_runs.pt", weights_only=True) if NUMBERS is not None else None


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # what make_golden.py used


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.shape == w.shape, key
            assert torch.equal(g.cpu(), w), f"{key}: max |diff| {(g.cpu().double() - w.double()).abs().max()}"
        else:
            assert g == w, f"{key}: {g!r} != {w!r}"


def _run(name: str, steps: int | None = None):
    model, h, taus, kw, n = RUNS[name]
    engine = build_engine(model, h, taus, kw)
    for b in batches_for(engine, n if steps is None else steps):
        engine.local_step(b)
    return engine


@NEEDS_NUMBERS
@pytest.mark.parametrize("name", list(RUNS))
def test_engine_runs_equal_the_golden_numbers(name):
    assert_same(snapshot(_run(name)), RUNS_FILE["runs"][name])


def test_an_old_engine_checkpoint_resumes_bit_for_bit():
    golden = torch.load(GOLDEN / "engine_checkpoint_v1.pt", weights_only=True)
    assert golden["run"] == CHECKPOINT_RUN and golden["at"] == CHECKPOINT_AT
    model, h, taus, kw, steps = RUNS[CHECKPOINT_RUN]
    engine = build_engine(model, h, taus, kw)
    batches = batches_for(engine, steps)
    engine.load_state_dict(golden["state_dict"])
    for b in batches[CHECKPOINT_AT:]:
        engine.local_step(b)
    resumed = snapshot(engine)
    if SAME_MACHINE:
        assert_same(resumed, golden["final"])
    else:  # the same continuation as an uninterrupted run on this machine, from the same state
        full = build_engine(model, h, taus, kw)
        for b in batches[:CHECKPOINT_AT]:
            full.local_step(b)
        full.load_state_dict(golden["state_dict"])
        for b in batches[CHECKPOINT_AT:]:
            full.local_step(b)
        assert_same(resumed, snapshot(full))


def test_an_old_strategy_checkpoint_resumes_bit_for_bit(tmp_path, data_root):
    golden = torch.load(GOLDEN / "strategy_final.pt", weights_only=True)
    cloud, history = strategy_run(tmp_path / "resumed", rounds=3, resume=GOLDEN / "strategy_checkpoint_v1.ckpt")
    if SAME_MACHINE:
        assert torch.equal(cloud, golden["cloud"])
        assert history == golden["history"]
    else:
        assert history[0] == golden["history"][0]  # round 1 comes from the checkpoint as it was written
        again, history2 = strategy_run(tmp_path / "again", rounds=3, resume=GOLDEN / "strategy_checkpoint_v1.ckpt")
        assert torch.equal(cloud, again) and history == history2


@NEEDS_NUMBERS
def test_the_strategy_run_equals_the_golden_numbers(tmp_path, data_root):
    golden = torch.load(NUMBERS / "strategy_final.pt", weights_only=True)
    cloud, history = strategy_run(tmp_path / "run", rounds=3)
    assert torch.equal(cloud, golden["cloud"])
    assert history == golden["history"]
