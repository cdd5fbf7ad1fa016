"""Device-level accounting (lightning_qmlhfl.privacy.accounting) against Google's dp-accounting called directly:
every DpEvent below is built by hand from the adjacency and amplification rules of docs/privacy.md."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.federation.participation import Bernoulli, Fraction, Full, UniformK
from lightning_qmlhfl.privacy import GaussianDP, NoPrivacy
from lightning_qmlhfl.privacy.accounting import (NoisePoint, PrivacyAccountant, calibrate_noise_multiplier,
                                                 noise_points, point_epsilon)

DELTA = 1e-5
ADD, REPLACE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.NeighboringRelation.REPLACE_ONE


def _rdp(event, count, relation=ADD):
    return rdp.RdpAccountant(neighboring_relation=relation).compose(
        dpa.SelfComposedDpEvent(event, count)).get_epsilon(DELTA)


def _pld(event, count, relation=ADD):
    return pld.PLDAccountant(relation).compose(dpa.SelfComposedDpEvent(event, count)).get_epsilon(DELTA)


G = dpa.GaussianDpEvent


# ------------------------------------------------------------------------------------------ the library's conventions

def test_library_relation_conventions():
    """What the adjacency rules rely on: the PLD accountant's REPLACE_ONE doubles the shift (z there = z / 2 under
    add/remove), the RDP accountant's does not (its multiplier is over the relation's own sensitivity)."""
    assert _pld(G(1.6), 3, REPLACE) == pytest.approx(_pld(G(0.8), 3, ADD), rel=1e-9)
    assert _rdp(G(1.6), 3, REPLACE) == pytest.approx(_rdp(G(1.6), 3, ADD), rel=1e-12)
    assert not rdp.RdpAccountant(neighboring_relation=ADD).supports(dpa.SampledWithoutReplacementDpEvent(10, 2, G(1.0)))
    assert not pld.PLDAccountant(REPLACE).supports(dpa.SampledWithoutReplacementDpEvent(10, 2, G(1.0)))
    assert not rdp.RdpAccountant(neighboring_relation=REPLACE).supports(dpa.PoissonSampledDpEvent(0.1, G(1.0)))


# -------------------------------------------------------------------------------------- epsilon = the library's epsilon

@pytest.mark.parametrize("point, rounds, expected", [
    # layer 1 central, everyone: Gaussian z, add/remove one device
    (NoisePoint(1, "central", 1.3, 4), 5, lambda: _rdp(G(1.3), 20)),
    # layer 2 local: a layer-1 node's upload, replace-one at the sender: z / 2, no amplification
    (NoisePoint(2, "local", 3.0, 2), 7, lambda: _rdp(G(1.5), 14)),
    # layer 1 central Poisson: amplified
    (NoisePoint(1, "central", 1.1, 3, "poisson", 0.2), 10, lambda: _rdp(dpa.PoissonSampledDpEvent(0.2, G(1.1)), 30)),
    # layer 2 central Poisson with RDP: no replace-one Poisson analysis -> unamplified z / 2
    (NoisePoint(2, "central", 2.0, 1, "poisson", 0.3), 6, lambda: _rdp(G(1.0), 6)),
    # fixed-size k of n: RDP replace-one without replacement at z / 2, or unamplified, the smaller
    (NoisePoint(2, "central", 2.4, 2, "fixed", population=8, sample_size=2), 5,
     lambda: min(_rdp(dpa.SampledWithoutReplacementDpEvent(8, 2, G(1.2)), 10, REPLACE), _rdp(G(1.2), 10))),
    (NoisePoint(1, "central", 1.0, 2, "fixed", population=4, sample_size=3), 5,
     lambda: min(_rdp(dpa.SampledWithoutReplacementDpEvent(4, 3, G(0.5)), 10, REPLACE), _rdp(G(1.0), 10))),
])
def test_rdp_epsilon_equals_library(point, rounds, expected):
    acc = PrivacyAccountant([point])
    want = expected()
    assert acc.epsilon(rounds, DELTA) == pytest.approx(want, rel=1e-12)
    assert acc.epsilons(rounds, DELTA) == [pytest.approx(want, rel=1e-12)]
    assert point_epsilon(point, rounds, DELTA) == pytest.approx(want, rel=1e-12)


def test_fixed_size_keeps_the_smaller_analysis():
    small_q = NoisePoint(1, "central", 1.0, 2, "fixed", population=100, sample_size=5)
    big_q = NoisePoint(1, "central", 1.0, 2, "fixed", population=10, sample_size=9)
    r = PrivacyAccountant([small_q, big_q]).report(5, DELTA)
    assert "without replacement" in r[0]["analysis"]  # amplification wins at a small rate
    assert r[1]["analysis"].startswith("Gaussian, multiplier z/1")  # z beats z / 2 near rate 1
    assert r[0]["epsilon"] < _rdp(G(1.0), 10) and r[1]["epsilon"] == pytest.approx(_rdp(G(1.0), 10), rel=1e-12)


@pytest.mark.parametrize("point, expected", [
    (NoisePoint(1, "central", 2.0, 3), lambda: _pld(G(2.0), 6)),
    (NoisePoint(3, "local", 4.0, 1), lambda: _pld(G(2.0), 2)),
    (NoisePoint(1, "central", 1.5, 2, "poisson", 0.25), lambda: _pld(dpa.PoissonSampledDpEvent(0.25, G(1.5)), 4)),
    (NoisePoint(2, "central", 2.0, 1, "poisson", 0.25),
     lambda: _pld(dpa.PoissonSampledDpEvent(0.25, G(2.0)), 2, REPLACE)),
    (NoisePoint(2, "central", 3.0, 1, "fixed", population=5, sample_size=2), lambda: _pld(G(1.5), 2)),
])
def test_pld_epsilon_equals_library(point, expected):
    assert PrivacyAccountant([point], accountant="pld").epsilon(2, DELTA) == pytest.approx(expected(), rel=1e-12)


def test_gaussian_against_closed_form():
    """Independent of the plumbing: T Gaussian releases at z are one at z / sqrt(T) (Balle & Wang's exact epsilon);
    PLD matches it closely and RDP is an upper bound."""
    p = NoisePoint(1, "central", 3.0, 5)
    exact = dpa.get_epsilon_gaussian(3.0 / math.sqrt(20), DELTA)
    e_pld = PrivacyAccountant([p], accountant="pld").epsilon(4, DELTA)
    e_rdp = PrivacyAccountant([p]).epsilon(4, DELTA)
    assert e_pld == pytest.approx(exact, rel=2e-3) and e_pld >= exact - 1e-9
    assert exact < e_rdp < 1.3 * exact


def test_overall_minimum_observers_and_edge_cases():
    local1 = NoisePoint(1, "local", 0.8, 6)
    central2 = NoisePoint(2, "central", 4.0, 2)
    central3 = NoisePoint(3, "central", 6.0, 1)
    acc = PrivacyAccountant([local1, central2, central3])
    eps = acc.epsilons(3, DELTA)
    assert acc.epsilon(3, DELTA) == min(eps)
    assert acc.epsilon(3, DELTA, observer_layer=1) == eps[0]  # layer-1 nodes see noised uploads
    assert acc.epsilon(3, DELTA, observer_layer=2) == eps[0]  # layer 2's own noise does not hide from layer 2
    assert acc.epsilon(3, DELTA, observer_layer=3) == min(eps[:2])
    assert PrivacyAccountant([central2]).epsilon(3, DELTA, observer_layer=2) == math.inf
    assert PrivacyAccountant([]).epsilon(3, DELTA) == math.inf
    assert PrivacyAccountant([NoisePoint(1, "central", 0.0, 1)]).epsilon(3, DELTA) == math.inf
    assert acc.epsilon(0, DELTA) == 0.0
    e = [acc.epsilon(r, DELTA) for r in (1, 2, 5, 10)]
    assert e == sorted(e) and len(set(e)) == 4
    rep = acc.report(3, DELTA)
    assert [r["epsilon"] for r in rep] == eps and all("dp-accounting 0.6" in r["accountant"] for r in rep)


# ------------------------------------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("point", [
    NoisePoint(1, "central", None, 4),
    NoisePoint(2, "local", None, 1),
    NoisePoint(1, "central", None, 2, "poisson", 0.1),
])
def test_calibration_rdp(point):
    target = 3.0
    z = calibrate_noise_multiplier(point, target, DELTA, rounds=10)
    eps = point_epsilon(point.with_noise_multiplier(z), 10, DELTA)
    assert eps <= target and eps == pytest.approx(target, rel=1e-3)
    assert point_epsilon(point.with_noise_multiplier(z - 1e-3), 10, DELTA) > target
    z_more = calibrate_noise_multiplier(point, target, DELTA, rounds=40)
    z_less = calibrate_noise_multiplier(point, target, DELTA, rounds=3)
    assert z_less < z < z_more
    assert calibrate_noise_multiplier(point, 2 * target, DELTA, rounds=10) < z


def test_calibration_fixed_size_and_pld():
    p = NoisePoint(2, "central", None, 1, "fixed", population=6, sample_size=2)
    z = calibrate_noise_multiplier(p, 4.0, DELTA, rounds=5)
    assert point_epsilon(p.with_noise_multiplier(z), 5, DELTA) == pytest.approx(4.0, rel=1e-3)
    assert point_epsilon(p.with_noise_multiplier(z), 5, DELTA) <= 4.0
    q = NoisePoint(1, "central", None, 2)
    z_pld = calibrate_noise_multiplier(q, 2.0, DELTA, rounds=3, accountant="pld")
    eps = point_epsilon(q.with_noise_multiplier(z_pld), 3, DELTA, accountant="pld")
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=1e-3)
    assert z_pld < calibrate_noise_multiplier(q, 2.0, DELTA, rounds=3)  # PLD is tighter than RDP


def test_calibration_errors():
    p = NoisePoint(1, "central", None, 1)
    with pytest.raises(ValueError, match="-1"):
        calibrate_noise_multiplier(p, -1.0, DELTA, 10)
    with pytest.raises(ValueError, match="1.5"):
        calibrate_noise_multiplier(p, 1.0, 1.5, 10)
    with pytest.raises(ValueError, match="got 0"):
        calibrate_noise_multiplier(p, 1.0, DELTA, 0)
    with pytest.raises(ValueError, match="'moments'"):
        calibrate_noise_multiplier(p, 1.0, DELTA, 10, accountant="moments")
    with pytest.raises(ValueError, match="calibrate"):
        PrivacyAccountant([p])


# ------------------------------------------------------------------------------------------------------ noise points

def test_noise_points_balanced():
    # 3 layers: 48 devices, 12 layer-1 nodes (4 devices each), 3 layer-2 nodes (4 children each), cloud (3)
    privacy = [GaussianDP(1.0, where="local"), GaussianDP(2.0), GaussianDP(3.0, where="central")]
    parts = [Bernoulli(0.5), UniformK(3), Fraction(0.5)]
    pts = noise_points((48, 12, 3, 1), [2, 3, 4], privacy, parts)
    assert pts == [
        NoisePoint(1, "local", 1.0, 12),  # local: sampling ignored; 3 * 4 layer-1 aggregations per round
        NoisePoint(2, "central", 2.0, 4, "fixed", population=4, sample_size=3),
        NoisePoint(3, "central", 3.0, 1, "fixed", population=3, sample_size=2),  # round(1.5) = 2 (torch.round)
    ]
    pts = noise_points((48, 12, 3, 1), [2, 3, 4], [NoPrivacy(), "gaussian", NoPrivacy()],
                       [Full(), Bernoulli(0.25), Full()])
    assert pts == [NoisePoint(2, "central", 1.0, 4, "poisson", 0.25)]
    assert noise_points((8, 1), [5], GaussianDP(), None) == [NoisePoint(1, "central", 1.0, 1)]
    assert noise_points((8, 2, 1), [5, 3], NoPrivacy()) == []


def test_noise_points_irregular_tree():
    tree = Hierarchy.from_parents([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1], [0, 0]])
    # children per node: layer 1 (4, 3, 5), layer 2 (2, 1), layer 3 (2)
    privacy = [GaussianDP(1.0), GaussianDP(1.0), NoPrivacy()]
    # UniformK(1): the largest rate (1/3) is at the node with 3 children
    pts = noise_points(tree, [1, 2, 3], privacy, [UniformK(1), UniformK(1), Full()])
    assert pts == [NoisePoint(1, "central", 1.0, 6, "fixed", population=3, sample_size=1),
                   NoisePoint(2, "central", 1.0, 3)]  # a layer-2 node with a single child: rate 1, no sampling
    # Fraction(0.4): k = 2 of 4 (round 1.6), 1 of 3 (round 1.2), 2 of 5: the worst rate is 2/4
    pts = noise_points(tree, [1, 2, 3], privacy, [Fraction(0.4), Fraction(0.4), Full()])
    assert pts == [NoisePoint(1, "central", 1.0, 6, "fixed", population=4, sample_size=2),
                   NoisePoint(2, "central", 1.0, 3)]
    # over-selection: ceil(2 * 1.5) = 3 of 4 are drawn
    pts = noise_points(tree, [1, 2, 3], [GaussianDP(), NoPrivacy(), NoPrivacy()], UniformK(2, over_select=0.5))
    assert pts == [NoisePoint(1, "central", 1.0, 6)]  # the 3-children node draws all 3
    pts = noise_points(Hierarchy.balanced([2, 8]), [2, 2], [GaussianDP(), NoPrivacy()],
                       [UniformK(2, over_select=0.5), Full()])
    assert pts == [NoisePoint(1, "central", 1.0, 2, "fixed", population=8, sample_size=3)]


def test_noise_points_errors():
    with pytest.raises(ValueError, match="split evenly"):
        noise_points((10, 3, 1), [1, 1], GaussianDP())
    with pytest.raises(ValueError, match=r"UniformK\(5\)"):
        noise_points((16, 4, 1), [1, 1], GaussianDP(), UniformK(5))
    with pytest.raises(ValueError, match="length 3"):
        noise_points((16, 4, 1), [1, 1], [GaussianDP()] * 3)
    with pytest.raises(ValueError, match=r"taus\[1\]"):
        noise_points((16, 4, 1), [1, 0], GaussianDP())
    with pytest.raises(ValueError, match="N\\+1"):
        noise_points((16, 4), [1, 1], GaussianDP())


@pytest.mark.parametrize("kwargs, shown", [
    ({"layer": 0}, "0"),
    ({"where": "edge"}, "'edge'"),
    ({"noise_multiplier": -1.0}, "-1.0"),
    ({"events_per_round": 0}, "0"),
    ({"sampling": "shuffle"}, "'shuffle'"),
    ({"sampling": "poisson"}, "None"),
    ({"sampling": "poisson", "sampling_rate": 1.2}, "1.2"),
    ({"where": "local", "sampling": "poisson", "sampling_rate": 0.5}, "'poisson'"),
    ({"sampling": "fixed", "population": 4}, "None"),
    ({"sampling": "fixed", "population": 4, "sample_size": 5}, "5"),
    ({"sampling": "fixed", "population": 4, "sample_size": 2, "sampling_rate": 0.3}, "0.3"),
    ({"sampling_rate": 0.5}, "0.5"),
    ({"population": 3}, "3"),
])
def test_noise_point_validation(kwargs, shown):
    args = {"layer": 1, "where": "central", "noise_multiplier": 1.0, "events_per_round": 1, **kwargs}
    with pytest.raises(ValueError) as err:
        NoisePoint(**args)
    assert shown in str(err.value)


def test_accountant_option():
    with pytest.raises(ValueError, match="'moments'"):
        PrivacyAccountant([NoisePoint(1, "central", 1.0, 1)], accountant="moments")
