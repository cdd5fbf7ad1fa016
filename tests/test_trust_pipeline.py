"""Privacy, robust aggregation and attacks as stages of the aggregation chain, against plain per-node references:
off is today's chain; the materialised path equals the fused one; the noise's std is the formula's; a robust
aggregator at the edge equals its per-node loop; under 20 % sign-flip devices the median and the trimmed mean at
the edge layer keep the loss bounded where the plain average diverges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_qmlhfl import Hierarchy, QMLHFLEngine, SimulationConfig
from lightning_qmlhfl.compressors import QSGD, Identity
from lightning_qmlhfl.simulation.stages import CompressAndSum
from lightning_qmlhfl.simulation.trust_stages import (AttackUploads, CentralNoise, CompressUploads, ReceiverClip,
                                                      SenderNoise, SumMessages)

from test_engine import MLP, ce_loss, make_batches


def _engine(h, taus, lr=0.1, module=None, **options):
    torch.manual_seed(0)
    config = SimulationConfig.build(h, taus, options.pop("compressors", [Identity()] * h.num_layers), seed=0,
                                    compression_warning=None, **options)
    return QMLHFLEngine(module or MLP(), ce_loss, optimizer="sgd", optimizer_kwargs={"lr": lr}, config=config)


def _names(engine, n):
    return [type(s).__name__ for s in engine.layers[n - 1].stages]


def test_off_is_the_fused_chain():
    h = Hierarchy.balanced([4, 2])
    plain = _engine(h, [2, 1])
    off = _engine(h, [2, 1], privacy="none", robust="mean", attacks="none")
    assert _names(plain, 1) == _names(off, 1) == ["SelectUploads", "CompressAndSum", "Resync"]
    assert not off.config.uses_trust_stages
    assert off.config.identity() == plain.config.identity()
    for b in make_batches(8, 4):
        plain.local_step(b), off.local_step(b)
    assert torch.equal(plain.cloud_params(), off.cloud_params())


@pytest.mark.parametrize("compressor", [Identity(), QSGD(4), QSGD(4, error_feedback="ef")])
def test_materialised_path_equals_the_fused_sum(compressor):
    """Central DP with no noise and a clip no upload reaches: the messages, summed, are the fused kernel's sum
    (the same draws; only the summation order differs)."""
    h = Hierarchy.balanced([4, 2])
    comps = [compressor, Identity()]
    fused = _engine(h, [2, 2], compressors=comps)
    dp = {"name": "gaussian", "where": "central", "noise_multiplier": 0.0, "clip_norm": 1e6}
    mat = _engine(h, [2, 2], compressors=comps, privacy=[dp, "none"])
    assert _names(mat, 1) == ["SelectUploads", "CompressUploads", "ReceiverClip", "SumMessages", "CentralNoise",
                              "AddAggregate", "Resync"]
    for b in make_batches(8, 8):
        fused.local_step(b), mat.local_step(b)
    torch.testing.assert_close(mat.cloud_params(), fused.cloud_params(), rtol=1e-5, atol=1e-6)
    if compressor.error_feedback:
        torch.testing.assert_close(mat.layers[0].stage(CompressUploads).memory,
                                   fused.layers[0].stage(CompressAndSum).memory, rtol=1e-5, atol=1e-6)


def _edge_change(privacy, lr=0.0):
    h = Hierarchy.balanced([4, 16])  # 4 edge servers of 16 devices
    e = _engine(h, [1, 2], lr=lr, module=nn.Linear(200, 10), privacy=[privacy, "none"])
    before = e.state.params[1].clone()
    x = torch.randn(e.hierarchy.num_devices, 3, 200)
    y = torch.randint(0, 10, (e.hierarchy.num_devices, 3))
    e.local_step((x, y))  # tau_1 = 1: the edge servers aggregate once; tau_2 = 2: the cloud does not yet
    return e, (e.state.params[1] - before).double()


@pytest.mark.parametrize("where", ["local", "central"])
def test_noise_std_and_mean_match_the_formula(where):
    z, C = 1.3, 0.7
    e, change = _edge_change({"name": "gaussian", "where": where, "noise_multiplier": z, "clip_norm": C})
    w = e.weights[0][0].item()  # 1/16: every device of an edge weighs the same
    # local: sum of 16 w N(0, (zC)^2) -> std zC sqrt(16 w^2); central: N(0, (zC max w)^2)
    expected = z * C * (16 * w * w) ** 0.5 if where == "local" else z * C * w
    samples = change.flatten()
    n = samples.numel()  # 4 edges x 2010 coordinates
    # the sample std of n normals has relative standard error 1/sqrt(2n) ~ 0.8 %: 4 % is 5 errors away
    assert abs(samples.std().item() / expected - 1) < 0.04
    assert abs(samples.mean().item()) < 5 * expected / n ** 0.5
    stage = e.layers[0].stage(SenderNoise if where == "local" else CentralNoise)
    assert stage is not None
    stats = e.round_stats()
    assert stats["noise_std_layer1"] == pytest.approx(z * C if where == "local" else expected)


def test_sender_clipping_is_exact():
    """Local DP with no noise: every upload clipped to C, the ones below untouched (numpy reference)."""
    h = Hierarchy.balanced([4, 2])
    C = 0.05
    # tau = [1, 2]: the edge servers aggregate after the first step, the cloud not yet
    e = _engine(h, [1, 2], lr=0.5, privacy=[{"name": "gaussian", "where": "local", "noise_multiplier": 0.0,
                                            "clip_norm": C}, "none"])
    ref = _engine(h, [1, 2], lr=0.5)
    b = make_batches(8, 1)[0]
    anchor = ref.state.params[1][ref.parent_index[0]].double().numpy()
    # the devices' models after the step, before any aggregation: run the reference one step with tau large
    probe = _engine(h, [2, 2], lr=0.5)
    probe.local_step(b)
    x = probe.state.params[0].double().numpy() - anchor
    norms = np.linalg.norm(x, axis=1)
    clipped = x * np.minimum(1.0, C / norms)[:, None]
    expect_edges = ref.state.params[1].double().numpy() + np.stack([clipped[2 * p:2 * p + 2].mean(0)
                                                                    for p in range(4)])
    e.local_step(b)
    np.testing.assert_allclose(e.state.params[1].double().numpy(), expect_edges, rtol=1e-5, atol=1e-6)
    assert e.round_stats()["clip_fraction_layer1"] == pytest.approx(float((norms > C).mean()))


@pytest.mark.parametrize("robust", ["median", {"name": "trimmed_mean", "beta": 0.25}, {"name": "krum", "f": 1},
                                    "geomed", "centered_clip"])
def test_robust_edge_equals_its_per_node_loop(robust):
    """One layer-1 aggregation with a robust aggregator: every edge model = its old model + the aggregator over its
    own children's uploads (a Python loop over nodes calling the aggregator on each one alone)."""
    from lightning_qmlhfl.robust import make_robust_aggregator

    h = Hierarchy.balanced([3, 6])  # 3 edge servers of 6 devices
    agg = make_robust_aggregator(robust)
    e = _engine(h, [1, 2], lr=0.5, robust=[robust, "mean"])  # the edges aggregate after one step, the cloud not
    probe = _engine(h, [2, 2], lr=0.5)
    b = make_batches(18, 1)[0]
    probe.local_step(b)
    x = probe.state.params[0] - probe.state.params[1][probe.parent_index[0]]
    edges0 = probe.state.params[1].clone()
    expect = torch.stack([edges0[p] + agg.aggregate(x[6 * p:6 * p + 6], torch.zeros(6, dtype=torch.long), 1,
                                                    backend="torch").value[0] for p in range(3)])
    e.local_step(b)
    torch.testing.assert_close(e.state.params[1], expect, rtol=1e-5, atol=1e-6)


def _regression(robust, attack, rounds=30, seed=0):
    """Linear regression, 40 devices under 2 edge servers, 20 % of the devices sign-flip with scale 10: the loss
    of the cloud model after ``rounds`` rounds."""
    torch.manual_seed(seed)
    h = Hierarchy.balanced([2, 20])  # 2 edge servers of 20 devices
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(8, generator=g)
    config = SimulationConfig.build(h, [2, 1], [Identity()] * 2, seed=seed, compression_warning=None,
                                    robust=[robust, "mean"], attacks=[attack, "none"])

    def loss(module, batch):
        xb, yb = batch
        return ((module(xb).squeeze(-1) - yb) ** 2).mean()

    e = QMLHFLEngine(nn.Linear(8, 1, bias=False), loss, optimizer="sgd", optimizer_kwargs={"lr": 0.05},
                     config=config)
    xs = torch.randn(rounds * 2, 40, 16, 8, generator=g)
    batches = [(xs[t], xs[t] @ w_true) for t in range(rounds * 2)]
    for b in batches:
        e.local_step(b)
    xt = torch.randn(512, 8, generator=g)
    w = e.cloud_params()
    return float(((xt @ w - xt @ w_true) ** 2).mean()), float((w_true ** 2).sum()), e


def test_median_and_trimmed_mean_at_the_edge_survive_sign_flips():
    attack = {"name": "sign_flip", "fraction": 0.2, "scale": 10.0}
    mean_loss, start, e = _regression("mean", attack)
    assert e.last_round_stats["attacked_layer1"] == 8  # 8 Byzantine devices, one edge aggregation a round
    assert e.layers[0].stage(AttackUploads) is not None
    assert mean_loss > 10 * start  # the plain average diverges
    for robust in ("median", {"name": "trimmed_mean", "beta": 0.3}):
        loss, _, _ = _regression(robust, attack)
        assert loss < 0.1 * start, robust  # bounded, and close to the truth
    honest, _, _ = _regression("mean", "none")
    assert honest < 0.1 * start


def test_trust_stages_refuse_a_multi_process_run_and_label_flip_above_devices():
    with pytest.raises(ValueError, match="label flipping .* layer 1 only"):
        SimulationConfig.build(Hierarchy.balanced([4, 2]), [1, 1], attacks=["none", {"name": "label_flip", "fraction": 0.2}])


def test_adaptive_clip_follows_the_quantile_rule():
    """Central DP with adaptive clipping (Andrew et al. 2021) and a negligible count noise: after one edge
    aggregation every edge's clip norm is C exp(-eta (b - gamma)), b the fraction of its uploads below C (numpy)."""
    h = Hierarchy.balanced([4, 2])
    C, gamma, eta = 0.05, 0.5, 0.2
    dp = {"name": "gaussian", "where": "central", "noise_multiplier": 0.0, "clip_norm": C, "target_quantile": gamma,
          "clip_lr": eta, "count_noise": 1e-9}
    e = _engine(h, [1, 2], lr=0.5, privacy=[dp, "none"])
    probe = _engine(h, [2, 2], lr=0.5)
    b = make_batches(8, 1)[0]
    probe.local_step(b)
    x = (probe.state.params[0] - probe.state.params[1][probe.parent_index[0]]).double().numpy()
    below = (np.linalg.norm(x, axis=1) <= C).reshape(4, 2).mean(1)
    e.local_step(b)
    np.testing.assert_allclose(e.layers[0].stage(ReceiverClip).clip.numpy(), C * np.exp(-eta * (below - gamma)),
                               rtol=1e-6)
    assert "privacy/1/clip" in e.registry.names
