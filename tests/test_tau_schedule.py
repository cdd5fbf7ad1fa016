"""Adaptive tau (docs/algorithm.md#adaptive-tau): the rules against their formulas, the engine under a changing
schedule against the per-node reference of test_engine run round by round with the same tau, the schedule's state
resumes, the option's errors, and the strategy's rounds follow the new period."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_engine import MLP, ReferenceQMLHFL, ce_loss, make_batches

from lightning_qmlhfl import QSGD, Hierarchy
from lightning_qmlhfl.config import SimulationConfig
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.theory import lr_condition_bracket
from lightning_qmlhfl.theory.schedules import (Eq15Tau, LossRatioTau, eq15_tau, loss_ratio_tau,
                                               make_tau_schedule)

H = Hierarchy.balanced([2, 3])
TAUS = [3, 2]


def test_the_rules_follow_their_formulas():
    assert loss_ratio_tau(8, 2.0, 0.5, 0.1, 0.1) == math.ceil(8 * math.sqrt(0.25)) == 4
    assert loss_ratio_tau(8, 2.0, 0.5, 0.1, 0.025) == math.ceil(8 * math.sqrt(0.25 * 4)) == 8  # lr decayed x4
    assert loss_ratio_tau(5, 2.0, 1e-9, 0.1, 0.1) == 1
    with pytest.raises(ValueError, match="loss0 > 0"):
        loss_ratio_tau(5, 0.0, 1.0, 0.1, 0.1)
    qs, L, lr = [0.5, 0.2], 2.0, 0.05
    t = eq15_tau([1, 2], 1, L, lr, qs, H, 0.5, 40)
    ok = lambda tau: L * lr * math.sqrt(lr_condition_bracket([tau, 2], qs, H)) <= 0.5  # noqa: E731
    assert ok(t) and not ok(t + 1)
    assert eq15_tau([1, 2], 1, 1e3, 1.0, qs, H, 0.5, 40) == 1  # nothing fits: the smallest period
    assert eq15_tau([1, 2], 2, 1e-6, 1e-3, qs, H, 0.5, 7) == 7  # everything fits: the bound


def learnable_batches(steps: int, seed: int = 0):
    """Labels a function of the inputs (the argmax of the first three features), so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, H.num_devices, 4, 6, generator=g)
    return [(x, x[..., :3].argmax(-1)) for x in xs]


def _engines(schedule, rounds_batches, lr=0.2, theory=None, taus=TAUS):
    torch.manual_seed(0)
    template = MLP()
    qs = [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)]
    cfg = SimulationConfig.build(H, taus, qs, executor="vmap", seed=7, tau_schedule=schedule, theory=theory)
    engine = QMLHFLEngine(copy.deepcopy(template), ce_loss, optimizer="sgd", optimizer_kwargs={"lr": lr},
                          config=cfg)
    ref = ReferenceQMLHFL(copy.deepcopy(template), H, taus, qs, lr=lr, momentum=0.0, seed=7)
    return engine, ref


def _run(engine, batches):
    """Whole rounds while the batches last; the tau each round ran with, and the stats."""
    ran, stats, used = [], [], 0
    while used + math.prod(engine.taus) <= len(batches):
        taus = engine.taus
        for b in batches[used:used + math.prod(taus)]:
            r = engine.local_step(b)
        used += math.prod(taus)
        assert r.round_completed
        ran.append(taus)
        stats.append(dict(engine.last_round_stats))
    return ran, stats


@pytest.mark.parametrize("rule, taus", [(LossRatioTau(layer=1, tau_min=1, tau_max=8), [8, 2]),
                                        (LossRatioTau(layer=2, tau_min=2, tau_max=5), [2, 5])])
def test_the_engine_under_a_changing_tau_equals_the_per_node_reference(rule, taus):
    batches = learnable_batches(120)
    engine, ref = _engines(rule, batches, lr=0.5, taus=taus)
    ran, stats = _run(engine, batches)
    assert len(set(ran)) > 1, f"the schedule never changed tau: {ran}"
    used = 0
    for round_taus in ran:  # the reference's nested loops, round by round with the same tau
        ref.taus = list(round_taus)
        steps = math.prod(round_taus)
        ref.global_round(batches[used:used + steps])
        used += steps
    torch.testing.assert_close(engine.state.params[0], ref.device_matrix(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(engine.cloud_params(), ref.cloud_flat(), atol=1e-6, rtol=1e-6)
    for s, round_taus in zip(stats, ran):
        assert [s["tau_layer1"], s["tau_layer2"]] == list(round_taus)
    # the decisions: the loss-ratio rule on the rounds' mean training loss
    n = rule.layer
    assert all(f"tau_wanted_layer{n}" in s and s[f"tau_next_layer{n}"] == min(max(s[f"tau_wanted_layer{n}"],
                                                                                  rule.tau_min), rule.tau_max)
               for s in stats)
    assert stats[-1][f"tau_wanted_layer{n}"] < taus[n - 1]  # the loss fell, so did the period


def test_a_constant_rule_is_the_fixed_run_bit_for_bit():
    batches = make_batches(H.num_devices, 24)
    fixed, _ = _engines(None, batches)
    pinned, _ = _engines(LossRatioTau(layer=1, tau_min=3, tau_max=3), batches)
    for b in batches:
        fixed.local_step(b)
        pinned.local_step(b)
    assert torch.equal(fixed.state.params[0], pinned.state.params[0])
    assert torch.equal(fixed.cloud_params(), pinned.cloud_params())


def test_eq15_rule_follows_the_measured_constants():
    batches = make_batches(H.num_devices, 60)
    engine, _ = _engines({"name": "eq15", "layer": 1, "safety": 0.5, "tau_max": 8}, batches, lr=0.2,
                         theory={"name": "measure", "rows": 4, "warn": False})
    ran, stats = _run(engine, batches)
    for s, taus in zip(stats, ran):
        # decided at the round's end from the round's own measurements: L along the path, the realised q_n
        qs = [s[f"theory/compression_error_layer{n}"] for n in (1, 2)]
        want = eq15_tau(list(taus), 1, s["theory/L_max"], 0.2, qs, H, 0.5, 8)
        assert s["tau_wanted_layer1"] == want and s["tau_next_layer1"] == want
    assert len(ran) >= 3


def test_the_schedule_resumes_bit_for_bit():
    batches = make_batches(H.num_devices, 40)
    rule = LossRatioTau(layer=1, tau_max=6)
    a, _ = _engines(rule, batches)
    ran, _ = _run(a, batches)
    b, _ = _engines(rule, batches)
    used = math.prod(ran[0]) + math.prod(ran[1])
    for x in batches[:used]:
        b.local_step(x)
    sd = b.state_dict()
    c, _ = _engines(rule, batches)
    c.load_state_dict(sd)
    assert c.taus == b.taus and c.steps_per_round == b.steps_per_round
    for x in batches[used:used + sum(math.prod(t) for t in ran[2:])]:
        c.local_step(x)
    assert torch.equal(a.cloud_params(), c.cloud_params()) and a.taus == c.taus


def test_the_option():
    assert make_tau_schedule(None) is None and make_tau_schedule("fixed") is None
    assert make_tau_schedule("loss_ratio") == LossRatioTau()
    assert make_tau_schedule({"name": "eq15", "safety": 0.8}) == Eq15Tau(safety=0.8)
    with pytest.raises(ValueError, match="unknown tau schedule 'bogus'"):
        make_tau_schedule("bogus")
    with pytest.raises(ValueError, match="tau_schedule tau_max=2 is below tau_min=3"):
        LossRatioTau(tau_min=3, tau_max=2)
    with pytest.raises(ValueError, match="tau_schedule layer=3: the hierarchy has N = 2"):
        SimulationConfig.build(H, TAUS, tau_schedule={"name": "loss_ratio", "layer": 3})
    with pytest.raises(ValueError, match="add theory=measure"):
        SimulationConfig.build(H, TAUS, tau_schedule="eq15")
    with pytest.raises(ValueError, match="accountant needs the schedule"):
        SimulationConfig.build(H, TAUS, tau_schedule="loss_ratio", privacy=[
            {"name": "gaussian", "noise_multiplier": 1.0, "clip_norm": 1.0, "where": "local"}, "none"])
    e, _ = _engines(None, [])
    with pytest.raises(RuntimeError, match="only between rounds"):
        e.local_step(make_batches(H.num_devices, 1)[0])
        e.set_taus([1, 1])


@pytest.mark.usefixtures("data_root")
def test_through_fit_each_round_runs_its_own_period_and_resumes(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers.fl_modules import MnistCNN, loaders
    from lightning_qmlhfl.data import IID
    from lightning_qmlhfl.strategy import QMLHFLStrategy

    def make(rounds, ckpt_path=None):
        torch.manual_seed(0)
        strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[6, 2], partition=IID(), seed=4,
                                  compressors=[QSGD(8)] * 2,
                                  tau_schedule=LossRatioTau(layer=1, tau_min=1, tau_max=12))
        ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        t = L.Trainer(strategy=strategy, max_epochs=rounds, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, logger=False, callbacks=[ck])
        train_dl, val_dl = loaders(n_train=400, n_val=50, batch_size=8)
        t.fit(MnistCNN(lr=0.1), train_dl, val_dl, ckpt_path=ckpt_path)
        return strategy

    full = make(5)
    assert [r["round"] for r in full.history] == [1, 2, 3, 4, 5]  # one epoch = one round, whatever its length
    steps = [r["local_steps"] for r in full.history]
    periods = [b - a for a, b in zip([0] + steps, steps)]
    assert periods == [r["tau_layer1"] * r["tau_layer2"] for r in full.history]
    assert len(set(periods)) > 1, f"tau never changed: {periods}"
    make(3)
    resumed = make(5, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.engine.state.params[0], full.engine.state.params[0])
    assert resumed.history == full.history
