"""Theorem 1's learning-rate condition (Eq. 15), its completion, the QSGD bound and the rate proxy.

The expected numbers are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.compressors import QSGD, NoQuantization
from lightning_qmlhfl.theory import (
    LearningRateWarning,
    aggregation_ratios,
    check_learning_rate,
    lr_condition_bracket,
    lr_condition_bracket_grid,
    lr_condition_terms,
    lr_condition_value,
    max_learning_rate,
    q_bound,
    quantizer_variances,
    rate_proxy,
    term_provenance,
)


# ------------------------------------------------------------------------------------------------ q(s, d)
def test_q_bound_hand_values():
    # d = 21840, s = 8: d/s^2 = 21840/64 = 341.25; sqrt(d)/s = 147.7836.../8 = 18.47295...; min = 18.47295...
    assert q_bound(8, 21840) == pytest.approx(math.sqrt(21840) / 8)
    assert q_bound(8, 21840) == pytest.approx(18.472953, rel=1e-6)
    # d = 4, s = 4: d/s^2 = 0.25 < sqrt(d)/s = 0.5
    assert q_bound(4, 4) == 0.25
    # d = 100, s = 10: both are 1
    assert q_bound(10, 100) == 1.0
    assert q_bound(None, 1000) == 0.0


def test_q_bound_matches_quantizer_and_rejects_bad_input():
    for s, d in [(1, 10), (4, 1000), (8, 21840), (255, 7)]:
        assert q_bound(s, d) == pytest.approx(QSGD(s, bucket_size=None).variance_bound(d))
    with pytest.raises(ValueError, match="s"):
        q_bound(0, 10)
    with pytest.raises(ValueError, match="d"):
        q_bound(4, 0)


def test_quantizer_variances_mixes_floats_and_quantizers():
    qs = quantizer_variances([QSGD(8, bucket_size=None), None, 0.3, NoQuantization(), QSGD(4, 16)], d=21840)
    # QSGD(4, bucket_size=None) with buckets of 16: min(16/16, 4/4) = 1
    assert qs == pytest.approx([q_bound(8, 21840), 0.0, 0.3, 0.0, 1.0])
    assert quantizer_variances([0.5, None]) == [0.5, 0.0]  # no d needed without real quantizers
    with pytest.raises(ValueError, match="pass d"):
        quantizer_variances([QSGD(8, bucket_size=None)])
    with pytest.raises(ValueError, match="q_1"):
        quantizer_variances([-0.1])
    with pytest.raises(ValueError, match="as a float"):
        quantizer_variances([0], d=10)  # an int is QSGD levels: 0 is not allowed


# ------------------------------------------------------------------------------------------------ Eq. 15, N = 1
def test_n1_hand_values():
    # tau_1 = 3, q_1 = 0.5:
    #   drift_1 = 3*2/2 = 3                       (paper)
    #   quant_1 = q_1 * tau_1^2 = 0.5*9 = 4.5     (ours: tau_{N+1} := 1)
    terms = lr_condition_terms([3], [0.5], Hierarchy.balanced([10]))
    assert terms == {"drift_1": 3.0, "quant_1": 4.5}
    assert term_provenance(1) == {"drift_1": "paper", "quant_1": "ours"}
    # L = 2, mu = 0.1: 1 - 4 * 0.01 * 7.5 = 1 - 0.3 = 0.7
    assert lr_condition_value(2.0, 0.1, [3], [0.5], [10]) == pytest.approx(0.7)
    # mu* = 1 / (2 sqrt(7.5)) = 1 / 5.47723 = 0.182574
    assert max_learning_rate(2.0, [3], [0.5], [10]) == pytest.approx(0.18257419, rel=1e-7)


def test_n1_without_quantization_is_local_sgd_drift_only():
    # tau_1 = 4: 4*3/2 = 6; mu* = 1/(L sqrt 6); at L = 1, mu = 0.2: 1 - 0.04*6 = 0.76
    assert lr_condition_terms([4], [None]) == {"drift_1": 6.0, "quant_1": 0.0}
    assert max_learning_rate(1.0, [4], [None]) == pytest.approx(1 / math.sqrt(6))
    assert lr_condition_value(1.0, 0.2, [4], [0.0]) == pytest.approx(0.76)


# ------------------------------------------------------------------------------------------------ Eq. 15, N = 2
def test_n2_hand_values():
    # tree [4, 5]: cloud with 4 edges of 5 devices; rho_2 = 5/20 = 0.25. tau = (2, 3), q = (0.5, 0.25):
    #   drift_1 = 2*1/2 = 1                                           (paper)
    #   drift_2 = tau_2(tau_2-1)/2 * tau_1^2 = 3 * 4 = 12             (paper)
    #   quant_1 = q_1 tau_2 tau_1^2 = 0.5 * 3 * 4 = 6                 (paper)
    #   quant_2 = rho_2 q_2 tau_3 (tau_1 tau_2)^2 (1 + q_1)
    #           = 0.25 * 0.25 * 1 * 36 * 1.5 = 3.375                  (ours)
    terms = lr_condition_terms([2, 3], [0.5, 0.25], Hierarchy.balanced([4, 5]))
    assert terms == pytest.approx({"drift_1": 1.0, "drift_2": 12.0, "quant_1": 6.0, "quant_2": 3.375})
    assert term_provenance(2) == {"drift_1": "paper", "drift_2": "paper", "quant_1": "paper", "quant_2": "ours"}
    # sum = 22.375; L = 1, mu = 0.1: 1 - 0.01 * 22.375 = 0.77625
    assert lr_condition_bracket([2, 3], [0.5, 0.25], [4, 5]) == pytest.approx(22.375)
    assert lr_condition_value(1.0, 0.1, [2, 3], [0.5, 0.25], [4, 5]) == pytest.approx(0.77625)
    # L = 0.5: mu* = 1 / (0.5 * sqrt(22.375)) = 2 / 4.7302220 = 0.4228131
    assert max_learning_rate(0.5, [2, 3], [0.5, 0.25], [4, 5]) == pytest.approx(0.4228131, rel=1e-6)


def test_n2_without_quantization_keeps_only_the_papers_drift_terms():
    # tau = (2, 3): 1 + 12 = 13
    terms = lr_condition_terms([2, 3], [None, None], [4, 5])
    assert terms["quant_1"] == terms["quant_2"] == 0.0
    assert sum(terms.values()) == 13.0


def test_irregular_tree_ratio():
    # devices 0,1,2 -> edge 0, device 3 -> edge 1; both edges -> cloud. Cloud weights 3/4 and 1/4: rho_2 = 0.75.
    h = Hierarchy.from_parents([[0, 0, 0, 1], [0, 0]])
    assert aggregation_ratios(h, 2) == [1.0, 0.75]
    # tau = (1, 2), q = (0, 1): quant_2 = 0.75 * 1 * 1 * (1*2)^2 * (1 + 0) = 3; drift_2 = 2*1/2*1 = 1
    terms = lr_condition_terms([1, 2], [0.0, 1.0], h)
    assert terms["quant_2"] == pytest.approx(3.0) and terms["drift_2"] == 1.0
    # without a hierarchy the ratios are taken as 1 (conservative)
    assert lr_condition_terms([1, 2], [0.0, 1.0])["quant_2"] == pytest.approx(4.0)


def test_n3_completion_propagates_lower_quantization():
    # tree [2, 2, 2]: rho_2 = rho_3 = 1/2. tau = (1, 1, 1), q = (1, 1, 1):
    #   quant_1 = 1*1*1 = 1; quant_2 = 0.5*1*1*1*(1+1) = 1; quant_3 = 0.5*1*1*1*(1+1)*(1+0.5) = 1.5
    terms = lr_condition_terms([1, 1, 1], [1.0, 1.0, 1.0], [2, 2, 2])
    assert [terms[f"quant_{n}"] for n in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.5])
    assert sum(terms[f"drift_{n}"] for n in (1, 2, 3)) == 0.0
    # q_1 enters every term above it: the bracket's slope in q_1 exceeds its slope in q_3 here
    base = lr_condition_bracket([1, 1, 1], [1.0, 1.0, 1.0], [2, 2, 2])
    d1 = lr_condition_bracket([1, 1, 1], [1.1, 1.0, 1.0], [2, 2, 2]) - base
    d3 = lr_condition_bracket([1, 1, 1], [1.0, 1.0, 1.1], [2, 2, 2]) - base
    assert d1 > d3 > 0


def test_all_ones_without_quantization_has_no_limit():
    assert lr_condition_bracket([1, 1, 1], [None] * 3, [2, 2, 2]) == 0.0
    assert max_learning_rate(3.0, [1, 1, 1], [None] * 3, [2, 2, 2]) == math.inf
    assert lr_condition_value(3.0, 100.0, [1, 1, 1], [None] * 3) == 1.0


def test_value_at_max_learning_rate_is_zero_and_below_is_positive():
    args = ([3, 2, 4], [0.2, 0.5, 0.1], [3, 2, 2])
    mu_star = max_learning_rate(1.7, *args)
    assert lr_condition_value(1.7, mu_star, *args) == pytest.approx(0.0, abs=1e-12)
    assert lr_condition_value(1.7, 0.99 * mu_star, *args) > 0
    assert lr_condition_value(1.7, 1.01 * mu_star, *args) < 0


def test_bracket_is_monotone_in_every_tau():
    # the planner's pruning relies on this
    qs, h = [0.3, 0.7, 0.2], Hierarchy.balanced([2, 3, 2])
    for tau in itertools.product(range(1, 5), repeat=3):
        b = lr_condition_bracket(tau, qs, h)
        for n in range(3):
            up = list(tau)
            up[n] += 1
            assert lr_condition_bracket(up, qs, h) >= b


def test_grid_matches_scalar_reference():
    rng = np.random.default_rng(0)
    for N in (1, 2, 3, 4):
        h = Hierarchy.balanced([int(x) for x in rng.integers(1, 5, size=N)])
        qs = [float(x) for x in rng.uniform(0, 3, size=N)]
        grid = rng.integers(1, 9, size=(50, N))
        got = lr_condition_bracket_grid(grid, qs, aggregation_ratios(h, N))
        want = [lr_condition_bracket(row.tolist(), qs, h) for row in grid]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_quantizer_objects_with_d():
    d = 1000
    a = lr_condition_terms([2, 2], [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)], [2, 2], d=d)
    b = lr_condition_terms([2, 2], [q_bound(4, d), q_bound(8, d)], [2, 2])
    assert a == pytest.approx(b)


# ------------------------------------------------------------------------------------------------ checks
def test_check_learning_rate_warns_raises_and_passes():
    # tau_1 = 4, no quantization: bracket 6, L = 1: mu* = 0.408248
    assert check_learning_rate(0.2, 1.0, [4], [None]) == pytest.approx(0.76)
    with pytest.warns(LearningRateWarning, match=r"mu < 0\.408248"):
        value = check_learning_rate(0.5, 1.0, [4], [None])
    assert value == pytest.approx(1 - 0.25 * 6)
    with pytest.raises(ValueError, match=r"violates .* mu < 0\.408248"):
        check_learning_rate(0.5, 1.0, [4], [None], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_learning_rate(0.4, 1.0, [4], [None])
    assert issubclass(LearningRateWarning, UserWarning)


def test_rate_proxy():
    # 0.1 * 10 * (2*3) = 6
    assert rate_proxy(0.1, 10, [2, 3]) == pytest.approx(6.0)
    assert rate_proxy(0.1, 0, [5]) == 0.0
    with pytest.raises(ValueError, match="T"):
        rate_proxy(0.1, -1, [2])
    with pytest.raises(ValueError, match="mu"):
        rate_proxy(0.0, 1, [2])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lr_condition_terms([0, 1], [0.0, 0.0]), r"taus\[0\].*>= 1, got 0"),
        (lambda: lr_condition_terms([1.5], [0.0]), r"taus\[0\].*integer"),
        (lambda: lr_condition_terms([True], [0.0]), r"integer"),
        (lambda: lr_condition_terms([], []), r"empty"),
        (lambda: lr_condition_terms([1, 2], [0.0]), r"2 tau values but 1"),
        (lambda: lr_condition_terms([1, 2], [0.0, 0.0], Hierarchy.balanced([3])), r"N = 1"),
        (lambda: lr_condition_terms([1, 2], [0.0, 0.0], [2, 2, 2]), r"N = 3"),
        (lambda: lr_condition_value(0.0, 0.1, [1], [0.0]), r"L .* positive"),
        (lambda: lr_condition_value(1.0, -0.1, [1], [0.0]), r"mu .* positive"),
        (lambda: max_learning_rate(float("inf"), [1], [0.0]), r"L .* positive"),
    ],
)
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
