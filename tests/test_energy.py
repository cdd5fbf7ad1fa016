"""The energy model (docs/algorithm.md#energy): a per-node loop reference for E_glob against the vectorised grid, the
planner under an energy budget against brute force, energy-only and two-budget plans, bad input, and the engine's
energy count under partial participation and dropouts against the count of steps taken and uploads delivered."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from lightning_qmlhfl.compressors import QSGD, make_quantizer
from lightning_qmlhfl.federation.availability import Availability
from lightning_qmlhfl.federation.participation import Fraction, Full
from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.theory import lr_condition_bracket, quantizer_variances, rate_proxy
from lightning_qmlhfl.theory.energy import (DEVICE_TRANSMIT_POWER, EDGE_TRANSMIT_POWER, EnergyModel, RoundEnergy,
                                            default_energy)
from lightning_qmlhfl.theory.latency import LatencyModel, upload_bits
from lightning_qmlhfl.theory.planner import evaluate_taus, plan_taus

from test_engine import MLP, ce_loss, make_batches


def _loop_energy(tau, h, lat, energy, bits):
    """E_glob by walking every node: each device's steps, each sender's uploads (power x bits / its rate)."""
    N = h.num_layers
    e_dev = energy.device_step_joules(h.num_devices).tolist()
    total = sum(math.prod(tau) * e for e in e_dev)
    for n in range(1, N + 1):
        senders = h.nodes_per_layer[n - 1]
        rates = lat.sender_rates(n, senders).tolist()
        powers = energy.sender_powers(n, senders).tolist()
        uploads = math.prod(tau[n:])  # one per aggregation of layer n
        for c in range(senders):
            total += uploads * powers[c] * bits[n - 1] / rates[c]
    return total


# ================================================================================================ the model
def test_defaults_are_the_cited_powers():
    assert DEVICE_TRANSMIT_POWER == 0.2  # 23 dBm
    assert EDGE_TRANSMIT_POWER == pytest.approx(6.30957, rel=1e-5)  # 38 dBm
    e = default_energy(3, 0.002)
    assert e.step_joules == pytest.approx(0.01)  # 5 W x 2 ms (an assumption)
    assert e.transmit_power == (0.2, EDGE_TRANSMIT_POWER, EDGE_TRANSMIT_POWER)


def test_one_layer_by_hand():
    # 3 devices, 0.5 J per step, 2 W while sending 1000 bits at 500 bit/s (2 s): tau = 4 -> 3 * 4 * 0.5 + 3 * 2 * 2
    lat = LatencyModel(0.1, [500.0])
    re = EnergyModel(0.5, [2.0]).round_energy([4], [3], lat, [1000])
    assert isinstance(re, RoundEnergy)
    assert (re.total, re.compute, re.per_layer_comm, re.per_aggregation) == (18.0, 6.0, (12.0,), (12.0,))
    assert re.fractions() == pytest.approx({"compute": 1 / 3, "layer_1": 2 / 3})


def test_round_energy_grid_matches_a_per_node_loop():
    h = Hierarchy.balanced([2, 3, 4])
    lat = LatencyModel.lognormal(h, 0.01, [1e6, 1e5, 1e4], compute_sigma=0.5, rate_sigma=0.7, seed=1)
    classes = torch.arange(h.num_devices) % 3
    energy = EnergyModel.lognormal(h, [0.01, 0.05, 0.2], [[0.1 + 0.01 * i for i in range(24)], 2.0, 0.0],
                                   sigma=0.3, seed=2, classes=classes)
    qz = [QSGD(4, bucket_size=None), QSGD(16, bucket_size=64), None]
    bits = upload_bits(qz, 3000)
    grid = np.array(list(itertools.product(range(1, 5), repeat=3)))
    got = energy.round_energy_grid(grid, h, lat, bits)
    want = [_loop_energy(tuple(t), h, lat, energy, bits) for t in grid.tolist()]
    assert got == pytest.approx(want, rel=1e-12)
    for t in ([1, 1, 1], [3, 2, 4]):
        re = energy.round_energy_for(t, h, lat, qz, 3000)
        assert re.total == pytest.approx(_loop_energy(tuple(t), h, lat, energy, bits), rel=1e-12)
        assert re.compute + re.communication == pytest.approx(re.total, rel=1e-12)
    # non-decreasing in every tau_n (the planner's down-set argument)
    by_tau = dict(zip(map(tuple, grid.tolist()), got))
    for t, e in by_tau.items():
        for n in range(3):
            up = list(t)
            up[n] += 1
            assert by_tau.get(tuple(up), math.inf) >= e


# ================================================================================================ planner
def _brute_force(h, quantizers, d, lat, energy, deadline, budget, L, mu, tau_max, safety=0.5):
    """Best objective over the box with the scalar functions (adapt_mu=True), and the taus achieving it."""
    qs = quantizer_variances([make_quantizer(q) for q in quantizers], d)
    bits = upload_bits(quantizers, d)
    scores = {}
    for tau in itertools.product(range(1, tau_max + 1), repeat=h.num_layers):
        b = lr_condition_bracket(tau, qs, h)
        m = mu if (L * mu) ** 2 * b < 1 else safety / (L * math.sqrt(b))
        fits = [budget / energy.round_energy(tau, h, lat, bits).total] if budget is not None else []
        if deadline is not None:
            fits.append(deadline / lat.round_time(tau, bits).total)
        rounds = math.floor(min(fits) + 1e-9)
        if rounds >= 1:
            scores[tau] = rate_proxy(m, rounds, tau)
    best = max(scores.values())
    return best, [t for t, obj in scores.items() if obj >= best * (1 - 1e-9)]


H2 = Hierarchy.balanced([3, 4])
LAT2 = LatencyModel(0.005, [1e6, 1e5])
EN2 = EnergyModel(0.02, [0.2, 6.0])
QZ2 = [QSGD(4, 64), QSGD(8, 64)]


@pytest.mark.parametrize("deadline,budget", [(None, 60.0), (None, 400.0), (20.0, 150.0), (5.0, 1e4), (1e4, 80.0)])
def test_energy_budget_plan_agrees_with_brute_force(deadline, budget):
    plan = plan_taus(H2, QZ2, 2000, LAT2, deadline, 1.0, 0.02, tau_max=8, method="exact", energy=EN2,
                     energy_budget=budget)
    best, taus = _brute_force(H2, QZ2, 2000, LAT2, EN2, deadline, budget, 1.0, 0.02, 8)
    assert plan.feasible and plan.objective == pytest.approx(best, rel=1e-9)
    assert plan.taus == min(taus, key=lambda t: (math.prod(t), t))
    assert plan.rounds * plan.round_energy.total <= budget * (1 + 1e-9)
    e_glob = EN2.round_energy(plan.taus, H2, LAT2, upload_bits(QZ2, 2000)).total
    assert plan.energy == pytest.approx(plan.rounds * e_glob)
    if deadline is not None:
        assert plan.rounds * plan.round_time.total <= deadline * (1 + 1e-9)
    heur = plan_taus(H2, QZ2, 2000, LAT2, deadline, 1.0, 0.02, tau_max=8, method="heuristic", energy=EN2,
                     energy_budget=budget)
    assert heur.feasible and heur.objective <= plan.objective * (1 + 1e-12)
    assert heur.objective >= 0.9 * plan.objective
    assert "energy E_glob" in plan.summary() and f"of the {budget:g} J budget" in plan.summary()


def test_which_budget_binds_changes_the_plan():
    by_time = plan_taus(H2, QZ2, 2000, LAT2, 20.0, 1.0, 0.02, tau_max=8, energy=EN2)
    by_energy = plan_taus(H2, QZ2, 2000, LAT2, None, 1.0, 0.02, tau_max=8, energy=EN2, energy_budget=60.0)
    both = plan_taus(H2, QZ2, 2000, LAT2, 20.0, 1.0, 0.02, tau_max=8, energy=EN2, energy_budget=60.0)
    assert by_time.energy_budget is None and by_time.round_energy is not None  # energy reported, not a constraint
    assert "without a deadline" in by_energy.summary() and "no energy budget" in by_time.summary()
    assert both.objective <= min(by_time.objective, by_energy.objective) * (1 + 1e-12)
    assert both.rounds * both.round_time.total <= 20.0 * (1 + 1e-9)
    assert both.rounds * both.round_energy.total <= 60.0 * (1 + 1e-9)


def test_no_energy_model_gives_todays_plans():
    plain = plan_taus(H2, QZ2, 2000, LAT2, 20.0, 1.0, 0.02, tau_max=8)
    with_model = plan_taus(H2, QZ2, 2000, LAT2, 20.0, 1.0, 0.02, tau_max=8, energy=EN2)
    on_latency = plan_taus(H2, QZ2, 2000, dataclasses.replace(LAT2, energy=EN2), 20.0, 1.0, 0.02, tau_max=8)
    assert plain.round_energy is None and plain.energy is None and "energy" not in plain.summary()
    for other in (with_model, on_latency):
        assert (other.taus, other.rounds, other.objective, other.mu) == (plain.taus, plain.rounds, plain.objective,
                                                                        plain.mu)
    assert on_latency.round_energy == with_model.round_energy


def test_infeasible_energy_names_the_budget():
    e1 = EN2.round_energy([1, 1], H2, LAT2, upload_bits(QZ2, 2000)).total
    plan = plan_taus(H2, QZ2, 2000, LAT2, None, 1.0, 0.02, energy=EN2, energy_budget=e1 / 2)
    assert not plan.feasible
    assert "energy budget E_b" in plan.message and "The energy budget binds" in plan.message
    assert f"E_b >= {e1:.6g} J" in plan.message and "T_d" not in plan.message
    both = plan_taus(H2, QZ2, 2000, LAT2, 1e-4, 1.0, 0.02, energy=EN2, energy_budget=e1 / 2)
    assert "T_d >=" in both.message and "The energy budget binds" in both.message
    only_time = plan_taus(H2, QZ2, 2000, LAT2, 1e-4, 1.0, 0.02, energy=EN2, energy_budget=e1 * 100)
    assert "T_d >=" in only_time.message and "energy budget binds" not in only_time.message
    given = evaluate_taus([1, 1], H2, QZ2, 2000, LAT2, None, 1.0, 0.02, energy=EN2, energy_budget=e1 / 2)
    assert not given.feasible and "> energy budget" in given.message


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: EnergyModel(0.0, [0.2]), r"step_joules \(J per local step\) must be a positive"),
        (lambda: EnergyModel([0.1, -1.0], [0.2]), r"step_joules\[1\]"),
        (lambda: EnergyModel([], [0.2]), "step_joules is an empty list"),
        (lambda: EnergyModel(0.1, []), "one power"),
        (lambda: EnergyModel(0.1, [-0.2]), r"transmit_power\[0\] \(layer 1\) must be a finite number >= 0"),
        (lambda: EnergyModel(0.1, [0.2, [1.0, math.nan]]), r"transmit_power\[1\]\[1\] \(layer 2\)"),
        (lambda: EnergyModel(0.1, [[]]), "empty list"),
        (lambda: EnergyModel.lognormal([2], 0.1, [0.2], sigma=-1), "sigma"),
        (lambda: EnergyModel.lognormal([2], [0.1, 0.2], [0.2]), "give classes"),
        (lambda: EnergyModel.lognormal([2], [0.1], [0.2], classes=[0, 1]), r"indices in \[0, 0\]"),
        (lambda: EnergyModel.lognormal([2], [0.1], [0.2], classes=[0]), "one integer class index per device"),
        (lambda: EnergyModel([0.1] * 3, [0.2]).round_energy([1], [2], LatencyModel(1.0, [1.0]), [8]),
         "3 entries but there are 2 devices"),
        (lambda: EnergyModel(0.1, [[0.2] * 3]).round_energy([1], [2], LatencyModel(1.0, [1.0]), [8]),
         "3 powers but layer 0 has 2 senders"),
        (lambda: EnergyModel(0.1, [0.2, 0.2]).round_energy([1], [2], LatencyModel(1.0, [1.0]), [8]),
         "energy model describes 2 layers"),
        (lambda: LatencyModel(1.0, [1.0], energy=EnergyModel(0.1, [0.2, 0.2])), "EnergyModel for 1 layers"),
        (lambda: default_energy(0, 1.0), "num_layers"),
        (lambda: plan_taus(H2, QZ2, 2000, LAT2, None, 1.0, 0.02), "deadline.*energy_budget.*or both"),
        (lambda: plan_taus(H2, QZ2, 2000, LAT2, 10.0, 1.0, 0.02, energy_budget=5.0), "needs an energy model"),
        (lambda: plan_taus(H2, QZ2, 2000, LAT2, 10.0, 1.0, 0.02, energy=EN2, energy_budget=-5.0), "energy_budget"),
        (lambda: plan_taus(H2, QZ2, 2000, LAT2, 10.0, 1.0, 0.02, energy="EN2"), "energy must be an EnergyModel"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ================================================================================================ the engine
def _run(engine, steps):
    """Run ``steps`` local steps; the round stats of every completed round."""
    out = []
    for b in make_batches(engine.tree.num_devices, steps):
        if engine.local_step(b).round_completed:
            out.append(dict(engine.last_round_stats))
    return out


def test_engine_energy_counts_the_steps_taken_and_uploads_delivered():
    h = Hierarchy.balanced([3, 4])
    lat = LatencyModel(0.01, [1e5, 1e4])
    energy = EnergyModel.lognormal(h, 0.05, [0.2, 5.0], sigma=0.5, seed=3)
    qz = [QSGD(4, bucket_size=None), None]
    torch.manual_seed(0)
    engine = QMLHFLEngine(MLP(), ce_loss, h, [2, 2], qz, optimizer_kwargs={"lr": 0.1}, seed=5,
                          latency=dataclasses.replace(lat, energy=energy), participation=[Fraction(0.5), Fraction(0.7)],
                          availability=Availability(dropout=0.3))
    stats = _run(engine, 16)
    assert len(stats) == 4
    per_upload = [energy.sender_powers(n, 1).item() * engine.upload_bits(n) / lat.slowest_uplink_rates[n - 1]
                  for n in (1, 2)]
    steps = engine.optimizer.device_steps.to(torch.float64)
    delivered = sum(s[f"participants_layer{n}"] * per_upload[n - 1] for s in stats for n in (1, 2))
    reference = float((steps * energy.device_step_joules(h.num_devices)).sum()) + delivered
    assert sum(s["drops_layer1"] for s in stats) > 0 and not bool((steps == 16).all())  # something was lost
    assert stats[-1]["energy"] == pytest.approx(reference, rel=1e-12)
    assert sum(s["round_energy"] for s in stats) == pytest.approx(stats[-1]["energy"], rel=1e-12)


def test_engine_energy_with_everyone_equals_the_model_and_changes_no_time():
    h = Hierarchy.balanced([2, 3])
    lat = LatencyModel.lognormal(h, 0.01, [1e5, 1e4], compute_sigma=0.4, rate_sigma=0.4, seed=2)
    energy = EnergyModel.lognormal(h, [0.03, 0.3], [[0.1, 0.2, 0.3, 0.2, 0.1, 0.2], 4.0], sigma=0.2, seed=1,
                                   classes=[0, 1, 0, 1, 0, 1])
    runs = {}
    for name, latency in (("plain", lat), ("energy", dataclasses.replace(lat, energy=energy))):
        torch.manual_seed(0)
        engine = QMLHFLEngine(MLP(), ce_loss, h, [3, 1], [QSGD(4, bucket_size=None), None],
                              optimizer_kwargs={"lr": 0.1}, seed=0, latency=latency, participation=[Full(), Full()])
        runs[name] = (engine, _run(engine, 6))
    (plain, plain_stats), (eng, stats) = runs["plain"], runs["energy"]
    assert "energy" not in plain_stats[-1] and "round_energy" not in plain_stats[-1]
    assert {k: v for k, v in stats[-1].items() if k not in ("energy", "round_energy")} == plain_stats[-1]
    bits = [eng.upload_bits(n) for n in (1, 2)]
    want = energy.round_energy([3, 1], h, lat, bits).total
    assert [s["round_energy"] for s in stats] == pytest.approx([want, want], rel=1e-12)
    # the energy survives a checkpoint of the clock
    sd = eng.clock.state_dict()
    eng.clock.energy = 0.0
    eng.clock.load_state_dict(sd)
    assert eng.clock.energy == pytest.approx(2 * want, rel=1e-12)


# ================================================================================================ recipe
def test_recipe_energy_options(capsys):
    from hydra import compose, initialize_config_dir
    from pathlib import Path

    from recipes.plan import run

    conf = str(Path(__file__).resolve().parents[1] / "recipes" / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("plan", overrides=["deadline=null", "energy_budget=500", "energy.transmit_power=[0.2,1.0,0.0]",
                                         "tau_max=8"])
        plan = run(cfg)
        off = run(compose("plan", overrides=["tau_max=8"]))
    out = capsys.readouterr().out
    assert plan.feasible and plan.deadline is None and plan.energy <= 500
    assert "transmit power layer 1: 0.2 W, layer 2: 1 W, layer 3: 0 W; budget 500 J" in out
    assert "of the 500 J budget" in out and "deadline            : none" in out
    assert off.round_energy is None
