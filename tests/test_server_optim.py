"""Server optimizers at every aggregation layer: exact identities, the rules against a per-node loop in float64,
the engine against its per-node reference, checkpoints and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_qmlhfl import QSGD, Average, FedAdagrad, FedAdam, FedAvgM, FedYogi, Hierarchy, TopK
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.optimizers.server import adaptive_update_, layer_server_optimizers, make_server_optimizer

from helpers.server_optim_by_hand import server_step_by_hand
from test_engine import HIERARCHIES, MLP, _run_both, ce_loss, make_batches


class _Node:
    pass


RULES = [FedAvgM(lr=0.7, momentum=0.8), FedAdam(lr=0.05, betas=(0.8, 0.95), tau=1e-2),
         FedAdam(lr=0.05, tau=1e-3, bias_correction=True), FedYogi(lr=0.05, betas=(0.5, 0.9), tau=1e-2),
         FedYogi(lr=0.02, bias_correction=True), FedAdagrad(lr=0.1, tau=1e-1),
         FedAdagrad(lr=0.1, betas=(0.5, 0.9), bias_correction=True)]


@pytest.mark.parametrize("opt", RULES, ids=repr)
def test_every_rule_against_a_per_node_loop_in_float64(opt):
    g = torch.Generator().manual_seed(0)
    M, P = 3, 7
    v = torch.randn(M, P, generator=g, dtype=torch.float64)
    state = opt.init_state(M, P, torch.float64, torch.device("cpu"))
    nodes = [_Node() for _ in range(M)]
    ref = [v[i].clone() for i in range(M)]
    for step in range(6):
        delta = torch.randn(M, P, generator=g, dtype=torch.float64) * 0.1
        active = torch.tensor([True, step % 2 == 0, True])  # node 1 gets no uploads every other period
        opt.step_(v, delta, state, active)
        for i in range(M):
            if bool(active[i]):
                ref[i] = server_step_by_hand(opt, nodes[i], ref[i], delta[i])
        torch.testing.assert_close(v, torch.stack(ref), rtol=1e-12, atol=1e-14)
    assert state["t"].tolist() == [6, 3, 6]


def test_fedavgm_with_lr_1_and_no_momentum_equals_average_bit_for_bit():
    a, _ = _run_both("N3", quantized=True, executor="vmap", server_optimizers=[FedAvgM(lr=1.0, momentum=0.0)] * 3)
    b, _ = _run_both("N3", quantized=True, executor="vmap", server_optimizers=[Average()] * 3)
    c, _ = _run_both("N3", quantized=True, executor="vmap")  # the default: today's run
    for n in range(4):
        assert torch.equal(a.state.params[n], b.state.params[n]) and torch.equal(b.state.params[n], c.state.params[n])


def test_fedadam_without_moments_and_tau_is_a_signed_step():
    """beta1 = beta2 = 0 and tau = 0: v <- v + lr * sign(Delta), exactly (Delta without zeros)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 50, generator=g)
    delta = torch.randn(4, 50, generator=g)
    delta[delta == 0] = 1e-3
    m, u = torch.zeros_like(v), torch.zeros_like(v)
    expected = v + 0.3 * torch.sign(delta)
    adaptive_update_(v, m, u, delta, lr=0.3, beta1=0.0, beta2=0.0, tau=0.0, rule="adam")
    assert torch.equal(v, expected)


def test_yogi_second_moment_stays_non_negative():
    g = torch.Generator().manual_seed(2)
    opt = FedYogi(lr=0.1, betas=(0.9, 0.5), tau=1e-6)
    v = torch.zeros(2, 1000)
    state = opt.init_state(2, 1000, torch.float32, torch.device("cpu"))
    for step in range(50):
        scale = 10.0 ** torch.randint(-20, 20, (1,), generator=g).item()  # huge jumps in magnitude, both ways
        opt.step_(v, torch.randn(2, 1000, generator=g) * scale, state)
        assert bool((state["u"] >= 0).all()), step


@pytest.mark.parametrize("servers", [[FedAvgM(lr=1.0, momentum=0.9), Average(), FedAdam(lr=0.05)],
                                     [FedYogi(lr=0.05, bias_correction=True), FedAdagrad(lr=0.1), FedAvgM()]],
                         ids=["avgm-edge/adam-cloud", "yogi/adagrad/avgm"])
def test_engine_matches_the_per_node_reference_with_server_optimizers(servers):
    engine, ref = _run_both("N3", quantized=True, executor="vmap", rounds=3, server_optimizers=servers)
    for n in range(1, engine.N + 1):
        theirs = torch.stack([ref._flat(node.state) for node in ref.layers[n]])
        torch.testing.assert_close(engine.state.params[n], theirs, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(engine.state.params[0], ref.device_matrix(), atol=2e-5, rtol=2e-5)


def test_server_state_checkpoint_round_trip():
    h, taus = HIERARCHIES["N2"]
    servers = [FedAvgM(), FedAdam(lr=0.02, bias_correction=True)]
    batches = make_batches(h.num_devices, 12)
    torch.manual_seed(0)
    template = MLP()

    def engine():
        return QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, [QSGD(4), TopK(ratio=0.5, error_feedback="ef")],
                            optimizer_kwargs={"lr": 0.2}, seed=2, server_optimizers=servers)

    full = engine()
    for b in batches:
        full.local_step(b)
    half = engine()
    for b in batches[:4]:
        half.local_step(b)
    sd = half.state_dict()
    assert sd["state"]["server/1"]["m"].abs().sum() > 0 and sd["state"]["server/2"]["t"].tolist() == [1]
    resumed = engine()
    resumed.load_state_dict(sd)
    for b in batches[4:]:
        resumed.local_step(b)
    assert torch.equal(resumed.cloud_params(), full.cloud_params())
    for a, b in zip(resumed.server_state, full.server_state):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, [QSGD(4), TopK(ratio=0.5, error_feedback="ef")],
                         optimizer_kwargs={"lr": 0.2}, seed=2)
    with pytest.raises(ValueError, match="server_optimizers"):
        other.load_state_dict(sd)


def test_config_values():
    assert layer_server_optimizers(["average", "fedavgm", "fedadam"], 3, lr=[None, 0.5, 0.01], momentum=0.8,
                                   betas=[0.9, 0.999], tau=None) == [Average(), FedAvgM(0.5, 0.8),
                                                                      FedAdam(0.01, (0.9, 0.999))]
    assert make_server_optimizer({"name": "fedyogi", "tau": 1e-2}) == FedYogi(tau=1e-2)
    assert make_server_optimizer(None) == Average()


@pytest.mark.parametrize("build, match", [
    (lambda: FedAvgM(lr=-1.0), "lr must be a finite number > 0"),
    (lambda: FedAvgM(momentum=1.0), r"momentum must be a number in \[0, 1\)"),
    (lambda: FedAdam(betas=(0.9, 1.0)), r"beta2 must be a number in \[0, 1\)"),
    (lambda: FedAdam(betas=(-0.1, 0.9)), r"beta1 must be a number in \[0, 1\)"),
    (lambda: FedYogi(tau=0.0), "tau .* must be a number > 0"),
    (lambda: FedAdagrad(tau=-1e-3), "tau .* must be a number > 0"),
    (lambda: make_server_optimizer("sgd"), "unknown server optimizer 'sgd'"),
    (lambda: make_server_optimizer({"name": "fedavgm", "tau": 1.0}), r"FedAvgM takes the options \['lr'"),
    (lambda: layer_server_optimizers(["average", "fedadam"], 3), "server_optim.layers has 2 entries"),
    (lambda: QMLHFLEngine(MLP(), ce_loss, Hierarchy.balanced([2, 2]), [1, 1], None,
                          server_optimizers=[Average()]), "server_optimizers has length 1"),
])
def test_bad_input(build, match):
    with pytest.raises(ValueError, match=match):
        build()
