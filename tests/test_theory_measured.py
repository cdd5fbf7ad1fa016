"""The constants of Theorem 1 measured on a run (docs/algorithm.md#measured-constants): the estimators against numpy
and against their expectations, the engine's probe against a plain per-device recomputation with one nn.Module,
the probe changes no number of the run, its state resumes, the warning and the adaptive step size, the config
value, the summary block and ``recipes.plan calibrate_from=``."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from helpers.offline import data_env  # noqa: F401 (fixture)

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.compressors import QSGD, Identity
from lightning_qmlhfl.config import SimulationConfig
from lightning_qmlhfl.rng import Stream, generator
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.theory import LearningRateWarning, lr_headroom, max_learning_rate
from lightning_qmlhfl.theory.measured import (MeasureConstants, MeasuredConstants, heterogeneity,
                                              make_measure_constants, minibatch_variance, path_smoothness,
                                              relative_error, summarize)
from lightning_qmlhfl.theory.planner import plan_taus
from lightning_qmlhfl.theory.latency import LatencyModel

TREE = Hierarchy.from_parents([[0, 0, 0, 1, 2, 2], [0, 0, 1], [0, 0]])  # 6 devices, 3 edges, 2, the cloud
TAUS = [2, 2, 1]


# ---------------------------------------------------------------- the estimators
def test_estimators_match_numpy():
    rng = np.random.default_rng(0)
    a, b, w0, w1 = (rng.standard_normal((5, 7)) for _ in range(4))
    t = [torch.from_numpy(x) for x in (a, b, w0, w1)]
    np.testing.assert_allclose(minibatch_variance(t[0], t[1]).numpy(), ((a - b) ** 2).sum(1) / 4)
    np.testing.assert_allclose(path_smoothness(t[0], t[1], t[2], t[3]).numpy(),
                               np.linalg.norm(b - a, axis=1) / np.linalg.norm(w1 - w0, axis=1))
    assert math.isnan(float(path_smoothness(t[0], t[1], t[2], t[2])[0]))  # the same point: no estimate
    spread, zeta2 = heterogeneity(t[0], 0.3)
    S = ((a - a.mean(0)) ** 2).sum(1).mean()
    assert spread == pytest.approx(S) and zeta2 == pytest.approx(5 / 4 * S - 0.3)
    np.testing.assert_allclose(relative_error(t[0], t[1]).numpy(), ((b - a) ** 2).sum(1) / (a ** 2).sum(1))
    assert math.isnan(float(relative_error(torch.zeros(1, 3), torch.ones(1, 3))[0]))
    with pytest.raises(ValueError, match="at least 2 devices' gradients, got 1"):
        heterogeneity(t[0][:1], 0.0)


def test_variance_and_heterogeneity_estimates_are_unbiased():
    """Examples x ~ N(m_i, I) on device i, the 'gradient' the mean of B examples: sigma^2 = P / B exactly, and the
    heterogeneity of the K device means is known; averaged over 4000 draws the estimates land within 3 % (their
    standard errors are below 1 %)."""
    g = torch.Generator().manual_seed(0)
    K, P, B, k = 12, 6, 8, 4
    means = torch.randn(K, P, generator=g, dtype=torch.float64) * 0.7
    # the estimate's target over devices drawn without replacement: the population variance with K - 1
    zeta2 = float(((means - means.mean(0)) ** 2).sum(1).sum() / (K - 1))
    sig, het = [], []
    for _ in range(4000):
        pick = torch.randperm(K, generator=g)[:k]
        x = means[pick].unsqueeze(1) + torch.randn(k, B, P, generator=g, dtype=torch.float64)
        ga, gb = x[:, : B // 2].mean(1), x[:, B // 2:].mean(1)
        s2 = float(minibatch_variance(ga, gb).mean())
        sig.append(s2)
        het.append(heterogeneity((ga + gb) / 2, P / B)[1])
    assert np.mean(sig) == pytest.approx(P / B, rel=0.03)
    assert np.mean(het) == pytest.approx(zeta2, rel=0.03)


# ---------------------------------------------------------------- the probe in the engine
class Net(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.bn = nn.BatchNorm1d(7) if bn else nn.Identity()

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def loss_fn(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def batches(steps: int, seed: int = 1, devices: int = 6, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(devices, 1, 5, generator=g) * 2  # non-IID
    return [(torch.randn(devices, B, 5, generator=g) + shift, torch.randint(0, 3, (devices, B), generator=g))
            for _ in range(steps)]


def engine(theory=None, executor="vmap", participation="full", lr=0.3, compressors=(4, 8, None), bn=False,
           optimizer="sgd"):
    torch.manual_seed(0)
    cfg = SimulationConfig.build(hierarchy=TREE, taus=TAUS, compressors=list(compressors), executor=executor,
                                 participation=participation, theory=theory)
    return QMLHFLEngine(Net(bn), loss_fn, optimizer=optimizer, optimizer_kwargs={"lr": lr}, config=cfg)


def run(e, data):
    stats = []
    for b in data:
        if e.local_step(b).round_completed:
            stats.append(dict(e.last_round_stats))
    return stats


@pytest.mark.parametrize("executor", ["vmap", "loop"])
@pytest.mark.parametrize("participation", ["full", {"name": "bernoulli", "p": 0.6}])
def test_measuring_changes_no_number_of_the_run(executor, participation):
    data = batches(12)
    off, on = engine(None, executor, participation, bn=True), engine("measure", executor, participation, bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LearningRateWarning)
        stats_on = run(on, data)
    stats_off = run(off, data)
    for m in range(TREE.num_layers + 1):
        assert torch.equal(off.state.params[m], on.state.params[m])
        assert torch.equal(off.state.buffers[m], on.state.buffers[m])
    assert off.bits_sent == on.bits_sent
    assert [{k: v for k, v in s.items() if not k.startswith("theory/")} for s in stats_on] == stats_off
    assert all("theory/L_max" in s and "theory/compression_error_layer1" in s for s in stats_on)
    assert not any(k.startswith("theory/") for s in stats_off for k in s)


def test_the_probe_equals_a_plain_recomputation():
    """L, sigma^2, the spread and the heterogeneity of round 0 recomputed with one nn.Module per sampled device:
    the cloud model, each device's batch split into halves, the point w - lr g_i."""
    data = batches(4)
    e = engine({"name": "measure", "rows": 4}, compressors=(None, None, None))
    template = copy.deepcopy(e.load_cloud_into())  # the cloud model w, in the module's own parameter order
    w = parameters_to_vector(template.parameters()).detach().double()
    lr = e.optimizer.lr
    stats = run(e, data)[0]
    pick = torch.randperm(6, generator=generator(e.seed, Stream.THEORY, 0))[:4]
    x, y = data[0]

    def grad(vec, xb, yb):
        m = Net().double()
        m.load_state_dict(template.state_dict())
        vector_to_parameters(vec.clone(), m.parameters())
        return torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss_fn(m, (xb.double(), yb)),
                                                                        list(m.parameters()))])

    Ls, sig, gs = [], [], []
    for i in pick.tolist():
        ga, gb = grad(w, x[i, :2], y[i, :2]), grad(w, x[i, 2:], y[i, 2:])
        gi = (ga + gb) / 2
        w1 = (w - lr * gi).float().double()  # the probe steps in the model's dtype (float32)
        g1 = (grad(w1, x[i, :2], y[i, :2]) + grad(w1, x[i, 2:], y[i, 2:])) / 2
        Ls.append(float((g1 - gi).norm() / (w1 - w).norm()))
        sig.append(float((ga - gb).pow(2).sum() / 4))
        gs.append(gi)
    G = torch.stack(gs)
    spread = float((G - G.mean(0)).pow(2).sum(1).mean())
    assert stats["theory/L_max"] == pytest.approx(max(Ls), rel=1e-4)
    assert stats["theory/L_mean"] == pytest.approx(np.mean(Ls), rel=1e-4)
    assert stats["theory/sigma2"] == pytest.approx(np.mean(sig), rel=1e-4)
    assert stats["theory/spread"] == pytest.approx(spread, rel=1e-4)
    assert stats["theory/heterogeneity"] == pytest.approx(4 / 3 * spread - np.mean(sig), rel=1e-4, abs=1e-7)
    assert stats["theory/grad_norm2"] == pytest.approx(float(G.pow(2).sum(1).mean()), rel=1e-4)
    # Eq. 15 at the measured constants: identity compressors, q = 0
    mu_star = max_learning_rate(max(Ls), TAUS, [0.0, 0.0, 0.0], TREE)
    assert stats["theory/mu_star"] == pytest.approx(mu_star, rel=1e-4)
    assert stats["theory/lr_headroom"] == pytest.approx(lr_headroom(lr, max(Ls), TAUS, [0.0] * 3, TREE), rel=1e-4)
    assert stats["theory/compression_error_layer1"] == 0.0 and stats["theory/q_bound_layer1"] == 0.0


def test_measured_compression_error_follows_the_levels():
    data = batches(16)
    coarse = run(engine("measure", compressors=(2, 2, 2)), data)
    fine = run(engine("measure", compressors=(64, 64, 64)), data)
    for n in (1, 2, 3):
        c = np.mean([s[f"theory/compression_error_layer{n}"] for s in coarse])
        f = np.mean([s[f"theory/compression_error_layer{n}"] for s in fine])
        assert 0 < f < c / 10
        assert coarse[0][f"theory/q_bound_layer{n}"] == pytest.approx(QSGD(2).variance_bound(e_params()))
        assert all(s[f"theory/upload_norm_layer{n}"] > 0 for s in coarse)


def e_params() -> int:
    return sum(p.numel() for p in Net().parameters())


def test_every_measures_every_kth_round_only():
    stats = run(engine({"name": "measure", "every": 2}, lr=0.01), batches(16))
    assert ["theory/L_max" in s for s in stats] == [True, False, True, False]
    assert ["theory/compression_error_layer1" in s for s in stats] == [True, False, True, False]


def test_one_warning_when_eq15_fails_none_when_it_holds():
    with pytest.warns(LearningRateWarning, match="violates Eq. 15") as record:
        run(engine("measure", lr=5.0), batches(12))
    assert len([w for w in record if issubclass(w.category, LearningRateWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearningRateWarning)
        run(engine("measure", lr=1e-4, compressors=(None, None, None)), batches(12))
        run(engine({"name": "measure", "warn": False}, lr=5.0), batches(12))


def test_adaptive_step_size_caps_the_learning_rate_at_the_measured_bound():
    e = engine({"name": "measure", "adapt_lr": 0.5}, lr=5.0, optimizer="sgd")
    used = []
    step = e.optimizer.step

    def recording_step(*a, **k):
        used.append([g["lr"] for g in e.optimizer.optimizer.param_groups])
        return step(*a, **k)

    e.optimizer.step = recording_step
    stats = run(e, batches(12))
    for r, s in enumerate(stats):
        assert s["theory/lr"] == pytest.approx(min(5.0, 0.5 * s["theory/mu_star"]))
        assert s["theory/eq15"] == pytest.approx(0.75)  # 1 - (s)^2 with s = 0.5: the cap sits at half of mu*
        steps = used[r * 4:(r + 1) * 4]  # 4 local steps per round, each with the round's cap
        assert all(lr == [pytest.approx(s["theory/lr"])] for lr in steps)
    assert e.optimizer.lr == 5.0  # the optimizer keeps its own rate between steps (schedules, checkpoints)
    assert all(math.isfinite(float(p.abs().max())) for p in e.state.params)
    # the optimizer's own learning rate stays the upper bound
    e.set_lr(1e-6)
    used.clear()
    run(e, batches(4, seed=9))
    assert all(lr == [1e-6] for lr in used)


def test_probe_state_resumes_bit_for_bit():
    data = batches(16)
    spec = {"name": "measure", "adapt_lr": 0.5}
    a = engine(spec, lr=5.0)
    full = run(a, data)
    b = engine(spec, lr=5.0)
    run(b, data[:6])
    sd = b.state_dict()
    assert "theory/probe" in sd["state"]
    c = engine(spec, lr=5.0)
    c.load_state_dict(sd)
    rest = run(c, data[6:])
    assert torch.equal(a.cloud_params(), c.cloud_params()) and torch.equal(a.state.params[0], c.state.params[0])
    assert torch.equal(a.probe.state, c.probe.state)
    assert full[-1] == rest[-1]


# ---------------------------------------------------------------- the option, the summary, the tools
def test_the_theory_option():
    assert make_measure_constants(None) is None and make_measure_constants("none") is None
    assert make_measure_constants({"name": "none"}) is None
    assert make_measure_constants("measure") == MeasureConstants()
    assert make_measure_constants({"name": "measure", "rows": 3, "adapt_lr": None}) == MeasureConstants(rows=3)
    assert SimulationConfig.build(hierarchy=TREE, taus=TAUS, theory="measure").theory == MeasureConstants()
    assert SimulationConfig.build(hierarchy=TREE, taus=TAUS).theory is None
    with pytest.raises(ValueError, match="theory rows .* must be an integer >= 2, got 1"):
        MeasureConstants(rows=1)
    with pytest.raises(ValueError, match="adapt_lr"):
        MeasureConstants(adapt_lr=1.5)
    with pytest.raises(ValueError, match="unknown theory option 'bogus'"):
        make_measure_constants("bogus")
    with pytest.raises(ValueError, match="'none' takes no options"):
        make_measure_constants({"name": "none", "rows": 3})
    with pytest.raises(ValueError, match="theory must be None"):
        SimulationConfig.build(hierarchy=TREE, taus=TAUS, theory=3)


def test_summarize_and_the_round_trip(tmp_path):
    records = [{"L_max": 2.0, "sigma2": 1.0, "heterogeneity": 0.5, "spread": 1.2, "compression_error_layer1": 0.4,
                "upload_norm_layer1": 3.0},
               {"L_max": 5.0, "sigma2": 3.0, "heterogeneity": 0.7, "spread": 1.6, "compression_error_layer1": 0.6,
                "upload_norm_layer1": 1.0},
               {"L_max": 4.0, "sigma2": 2.0, "heterogeneity": 0.9, "spread": 1.4},
               {}]
    m = summarize(records, [1.5, 0.0])
    assert (m.L, m.L_median, m.sigma2, m.heterogeneity, m.rounds) == (5.0, 4.0, 2.0, 0.7, 3)
    assert m.q[1] is None and m.qs() == [pytest.approx(0.4), 0.0]  # torch's median: the lower of two middles
    assert summarize([{}], [0.0]) is None
    (tmp_path / "summary.json").write_text(json.dumps({"theory": m.to_dict()}))
    assert MeasuredConstants.from_run(tmp_path) == m
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 3}))
    with pytest.raises(ValueError, match="no measured constants: run the pilot with theory=measure"):
        MeasuredConstants.from_run(tmp_path)
    with pytest.raises(ValueError, match="no summary.json there"):
        MeasuredConstants.from_run(tmp_path / "missing")


def test_planner_takes_measured_qs():
    lat = LatencyModel(compute_time=0.005, uplink_rates=[1e7, 1e5])
    kw = dict(d=21840, latency=lat, deadline=30.0, L=3.0, mu=0.01, tau_max=12)
    measured = plan_taus([8, 8], [8, 8], qs=[0.9, 1.0], **kw)
    bounds = plan_taus([8, 8], [8, 8], **kw)
    assert measured.mu_max != bounds.mu_max
    assert measured.taus is not None and measured.mu_max == pytest.approx(
        max_learning_rate(3.0, measured.taus, [0.9, 1.0], Hierarchy.balanced([8, 8])))
    with pytest.raises(ValueError, match="qs .* one number >= 0 per layer"):
        plan_taus([8, 8], [8, 8], qs=[0.9], **kw)
    assert lr_headroom(0.01, 3.0, [2, 2], [0.9, 1.0], [8, 8]) == pytest.approx(
        max_learning_rate(3.0, [2, 2], [0.9, 1.0], [8, 8]) / 0.01)


# ---------------------------------------------------------------- the recipes: a pilot run, then the planner
TINY = ["model=mlp", "dataset.train_subset=1200", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
        "hierarchy.taus=[2,1,2]", "rounds=2", "trainer.enable_progress_bar=false", "logger=csv", "seed=3"]


@pytest.mark.usefixtures("data_env")
def test_a_pilot_run_calibrates_the_planner(tmp_path, monkeypatch, capsys):
    from recipes.config import compose
    from recipes.plan import run as plan
    from recipes.train import run

    monkeypatch.setenv("QMLHFL_THREADS", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LearningRateWarning)
        summary = run(compose("mnist", [*TINY, "theory=measure", "theory.rows=4"]), tmp_path / "pilot")
    block = summary["theory"]
    history = json.loads((tmp_path / "pilot" / "history.json").read_text())
    assert block["rounds"] == 2 and block["L"] == max(r["theory/L_max"] for r in history) > 0
    assert len(block["q"]) == 3 and all(0 < q < b for q, b in zip(block["q"], block["q_bound"]))
    metrics = (next((tmp_path / "pilot").rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "theory/L_max" in metrics and "theory/lr_headroom" in metrics
    m = MeasuredConstants.from_run(tmp_path / "pilot")
    cfg = compose("plan", [f"calibrate_from={tmp_path / 'pilot'}", "hierarchy.branching=[2,2,2]", "mu=0.01"])
    result = plan(cfg)
    out = capsys.readouterr().out
    assert "calibrated from" in out and "headroom mu*/mu" in out
    assert result.mu_max == pytest.approx(max_learning_rate(m.L, result.taus, m.qs(), Hierarchy.balanced([2, 2, 2])))
    with pytest.raises(ValueError, match="the pilot run has 3 layers, this plan N = 2"):
        plan(compose("plan", [f"calibrate_from={tmp_path / 'pilot'}", "hierarchy.branching=[2,2]",
                              "uplink_rates=[1e7,1e5]", "quantizer.levels=[8,8]"]))
