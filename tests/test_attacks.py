"""Byzantine attack models (lightning_qmlhfl/robust/attacks.py) against plain NumPy references written one segment
and one row at a time, on random segments that include segments of one row (honest and Byzantine), segments with no
Byzantine row, Byzantine-majority segments and empty segments (parents with no upload)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lightning_qmlhfl.robust.attacks import (ALIE, ATTACK_FAMILY, ATTACKS, Attack, GaussianAttack, LabelFlip,
                                             NoAttack, SignFlip, alie_z_max, flip_labels, layer_attacks,
                                             make_attack)

# ----------------------------------------------------------------------------------------------------------------
# random segments


def make_case(trial: int, dtype=torch.float64, p: int = 6):
    """x [k, P], byz [k], segment [k], num_segments, with forced corner cases and rows of segments interleaved."""
    rng = np.random.default_rng(1000 + trial)
    sizes = [1, 1, 3, 0, 3, 7]  # one Byzantine row alone, one honest row alone, all honest, empty, majority, minority
    n_byz = [1, 0, 0, 0, 2, 2]
    for _ in range(int(rng.integers(1, 5))):
        size = int(rng.integers(1, 9))
        sizes.append(size)
        n_byz.append(int(rng.integers(0, size + 1)))
    seg_of_row, byz_of_row = [], []
    for s, (size, b) in enumerate(zip(sizes, n_byz)):
        flags = np.zeros(size, dtype=bool)
        flags[rng.choice(size, b, replace=False)] = True
        seg_of_row += [s] * size
        byz_of_row += list(flags)
    perm = rng.permutation(len(seg_of_row))
    segment = np.asarray(seg_of_row, dtype=np.int64)[perm]
    byz = np.asarray(byz_of_row, dtype=bool)[perm]
    # rows of very different scales, so that scale-free and per-segment statistics matter
    x = rng.standard_normal((len(segment), p)) * np.exp(rng.uniform(-3, 3, size=(len(segment), 1)))
    return (torch.tensor(x, dtype=dtype), torch.tensor(byz), torch.tensor(segment), len(sizes))


def ref_z_max(n: int, f: int) -> float:
    s = math.floor(n / 2 + 1) - f
    if s <= 0 or s >= n:  # the module's degenerate rule
        return 0.0
    return NormalDist().inv_cdf((n - s) / n)


def ref_sign_flip(x, byz, seg, num_segments, scale):
    out = x.copy()
    for i in range(len(x)):
        if byz[i]:
            out[i] = -scale * x[i]
    return out


def ref_alie(x, byz, seg, num_segments, z):
    out = x.copy()
    for s in range(num_segments):
        idx = [i for i in range(len(x)) if seg[i] == s]
        if not idx:
            continue
        n, f = len(idx), int(sum(byz[i] for i in idx))
        if f == 0:
            continue
        mu, sd = x[idx].mean(axis=0), x[idx].std(axis=0)  # ddof 0, over all rows of the segment
        zz = ref_z_max(n, f) if z is None else z
        for i in idx:
            if byz[i]:
                out[i] = mu - zz * sd
    return out


def ref_gaussian(x, byz, noise, std, scaled):
    """``noise``: the b x P standard normals of the b Byzantine rows, in ascending row order."""
    out = x.copy()
    p = x.shape[1]
    j = 0
    for i in range(len(x)):
        if byz[i]:
            sigma = std * np.sqrt(np.sum(x[i] ** 2)) / np.sqrt(p) if scaled else std
            out[i] = sigma * noise[j]
            j += 1
    return out


TRIALS = range(6)


def check_common(x, byz, out, before):
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before), "corrupt modified x in place"
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(out[~byz], x[~byz]), "honest rows changed"


# ----------------------------------------------------------------------------------------------------------------
# corrupt() against the references


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_sign_flip(trial, scale):
    x, byz, seg, S = make_case(trial)
    before = x.clone()
    out = SignFlip(0.3, scale=scale).corrupt(x, byz, seg, S, torch.Generator().manual_seed(0))
    check_common(x, byz, out, before)
    ref = ref_sign_flip(x.numpy(), byz.numpy(), seg.numpy(), S, scale)
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("z", [None, 0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alie(trial, z, dtype):
    x, byz, seg, S = make_case(trial, dtype)
    before = x.clone()
    out = ALIE(0.3, z=z).corrupt(x, byz, seg, S, None)
    check_common(x, byz, out, before)
    ref = ref_alie(x.double().numpy(), byz.numpy(), seg.numpy(), S, z)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(out.double().numpy(), ref, **tol)


def test_alie_corner_segments():
    # a lone Byzantine row sends itself (mean of one row, std 0, degenerate z = 0); a segment of two with one
    # Byzantine row: z_max = Phi^-1(1/2) = 0, the mean; a minority segment sends mean - z_max * std exactly
    x = torch.tensor([[1.0, -2.0], [3.0, 5.0], [7.0, 1.0], [0.0, 0.0], [2.0, 2.0], [4.0, -4.0], [1.0, 1.0],
                      [5.0, 3.0]], dtype=torch.float64)
    seg = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2])
    byz = torch.tensor([True, True, False, True, False, False, False, False])
    out = ALIE(0.2).corrupt(x, byz, seg, 4, None)
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], torch.tensor([5.0, 3.0], dtype=torch.float64))
    rows = x[3:]
    z = NormalDist().inv_cdf(3 / 5)  # n = 5, f = 1: s = 3 - 1 = 2, (n - s) / n = 3/5
    assert torch.allclose(out[3], rows.mean(0) - z * rows.std(0, unbiased=False))


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("std,scaled", [(1.0, True), (0.3, True), (2.0, False)])
def test_gaussian(trial, std, scaled):
    x, byz, seg, S = make_case(trial)
    before = x.clone()
    out = GaussianAttack(0.3, std=std, scaled=scaled).corrupt(x, byz, seg, S, torch.Generator().manual_seed(trial))
    check_common(x, byz, out, before)
    noise = torch.randn(int(byz.sum()), x.shape[1], generator=torch.Generator().manual_seed(trial),
                        dtype=x.dtype).numpy()
    ref = ref_gaussian(x.numpy(), byz.numpy(), noise, std, scaled)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=0)


def test_gaussian_statistics_and_scale_free():
    p = 40000
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, p, generator=gen, dtype=torch.float64) * torch.tensor([[1e-3], [1.0], [50.0]],
                                                                            dtype=torch.float64)
    byz, seg = torch.tensor([True, True, False]), torch.tensor([0, 0, 1])
    out = GaussianAttack(0.5, std=0.7).corrupt(x, byz, seg, 2, torch.Generator().manual_seed(1))
    for i in (0, 1):
        rms = x[i].norm() / math.sqrt(p)
        assert abs(float(out[i].std() / rms) - 0.7) < 0.02
        assert abs(float(out[i].mean() / rms)) < 0.02
        assert abs(float(out[i].norm() / x[i].norm()) - 0.7) < 0.02  # about std times the honest norm
    out2 = GaussianAttack(0.5, std=0.7).corrupt(123.0 * x, byz, seg, 2, torch.Generator().manual_seed(1))
    assert torch.allclose(out2, 123.0 * out, rtol=1e-12)  # scale-free
    absolute = GaussianAttack(0.5, std=0.7, scaled=False).corrupt(x, byz, seg, 2, torch.Generator().manual_seed(1))
    for i in (0, 1):
        assert abs(float(absolute[i].std()) - 0.7) < 0.02
    # a different generator state gives different noise
    out3 = GaussianAttack(0.5, std=0.7).corrupt(x, byz, seg, 2, torch.Generator().manual_seed(2))
    assert not torch.equal(out3[:2], out[:2])


@pytest.mark.parametrize("trial", TRIALS)
def test_no_attack_and_label_flip_leave_uploads(trial):
    x, byz, seg, S = make_case(trial)
    before = x.clone()
    for attack in (NoAttack(), LabelFlip(0.3)):
        out = attack.corrupt(x, byz, seg, S, None)
        check_common(x, byz, out, before)
        assert torch.equal(out, x)


@pytest.mark.parametrize("attack", [SignFlip(0.3), ALIE(0.3), GaussianAttack(0.3)], ids=repr)
def test_corrupt_edge_shapes(attack):
    gen = torch.Generator().manual_seed(0)
    empty = torch.zeros(0, 4)
    out = attack.corrupt(empty, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64), 3, gen)
    assert out.shape == (0, 4)
    x = torch.randn(4, 3, generator=gen)
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(attack.corrupt(x, none, torch.tensor([0, 1, 1, 2]), 3, gen), x)


# ----------------------------------------------------------------------------------------------------------------
# the Byzantine draw


def test_byzantine_counts():
    for n in range(0, 31):
        for f in (0.0, 0.1, 0.25, 0.5, 0.75, 0.99):
            b = SignFlip(f).byzantine(n, seed=3, layer=1)
            assert b.dtype == torch.bool and b.shape == (n,)
            assert int(b.sum()) == round(f * n)
    assert int(SignFlip(0.3).byzantine(10, 0, 2).sum()) == 3
    assert not NoAttack().byzantine(50, 0, 1).any()


def test_byzantine_deterministic_and_keyed():
    n = 200
    a = ALIE(0.3)
    base = a.byzantine(n, seed=7, layer=1)
    assert torch.equal(base, a.byzantine(n, seed=7, layer=1))
    assert torch.equal(base, SignFlip(0.3, scale=2.0).byzantine(n, seed=7, layer=1))  # same set for every attack
    assert torch.equal(base, ALIE(0.3).byzantine(n, seed=7, layer=1))
    others = [a.byzantine(n, seed=7, layer=2), a.byzantine(n, seed=7, layer=3), a.byzantine(n, seed=8, layer=1),
              a.byzantine(n, seed=0, layer=1)]
    sets = [base] + others
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not torch.equal(sets[i], sets[j])
    small = ALIE(0.1).byzantine(n, seed=7, layer=1)
    assert bool((small <= base).all()), "a smaller fraction's set is inside a larger one's"


def test_byzantine_uniform():
    counts = torch.zeros(10)
    trials = 3000
    for seed in range(trials):
        counts += SignFlip(0.3).byzantine(10, seed, 1).float()
    assert bool(((counts / trials - 0.3).abs() < 0.05).all()), counts / trials


# ----------------------------------------------------------------------------------------------------------------
# ALIE's z_max


Z_TABLE = [(50, 12), (50, 24), (10, 2), (5, 1), (7, 3), (100, 20), (2, 1), (1, 1), (3, 2), (4, 3), (20, 0),
           (1, 0), (2, 0)]


@pytest.mark.parametrize("n,f", Z_TABLE)
def test_z_max_against_normal_quantile(n, f):
    assert alie_z_max(n, f) == pytest.approx(ref_z_max(n, f), rel=1e-9, abs=1e-12)


def test_z_max_known_values():
    assert alie_z_max(50, 12) == pytest.approx(0.5828415072712162, rel=1e-9)  # s = 14, Phi^-1(0.72)
    assert alie_z_max(2, 1) == 0.0  # Phi^-1(1/2)
    assert alie_z_max(1, 1) == 0.0 and alie_z_max(3, 2) == 0.0  # Byzantine majority: degenerate, 0
    assert alie_z_max(1, 0) == 0.0 and alie_z_max(2, 0) == 0.0  # s >= n: degenerate, 0
    assert alie_z_max(20, 0) == pytest.approx(NormalDist().inv_cdf(9 / 20))  # no Byzantine row: formula, < 0
    assert all(alie_z_max(n, f) >= 0 for n in range(1, 40) for f in range(1, n + 1))  # with f >= 1: (n - s)/n >= 1/2
    with pytest.raises(ValueError, match="got 0"):
        alie_z_max(0, 0)
    with pytest.raises(ValueError, match="got 4"):
        alie_z_max(3, 4)


@pytest.mark.parametrize("n,f", [(50, 12), (10, 2), (5, 1), (7, 3), (100, 20)])
def test_z_max_against_scipy(n, f):
    stats = pytest.importorskip("scipy.stats")
    s = math.floor(n / 2 + 1) - f
    assert alie_z_max(n, f) == pytest.approx(float(stats.norm.ppf((n - s) / n)), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# labels


def test_flip_labels():
    rng = np.random.default_rng(0)
    for c in (2, 3, 10):
        y_np = rng.integers(0, c, size=50)
        y = torch.tensor(y_np)
        before = y.clone()
        out = flip_labels(y, c)
        np.testing.assert_array_equal(out.numpy(), np.array([c - 1 - v for v in y_np]))
        assert torch.equal(y, before) and out.dtype == y.dtype
        assert torch.equal(flip_labels(out, c), y)
    assert torch.equal(LabelFlip(0.2, num_classes=3).flip(torch.tensor([0, 1, 2])), torch.tensor([2, 1, 0]))
    assert flip_labels(torch.zeros(0, dtype=torch.int64), 10).shape == (0,)
    with pytest.raises(ValueError, match="got 10"):
        flip_labels(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="got -1"):
        flip_labels(torch.tensor([-1, 3]), 10)
    with pytest.raises(ValueError, match="integer"):
        flip_labels(torch.tensor([0.0, 1.0]), 10)
    with pytest.raises(ValueError, match="got 1"):
        flip_labels(torch.tensor([0]), 1)


# ----------------------------------------------------------------------------------------------------------------
# options and config


ALL = [NoAttack(), SignFlip(0.2), SignFlip(0.1, scale=4.0), GaussianAttack(0.3), GaussianAttack(0.3, std=0.5,
       scaled=False), ALIE(0.25), ALIE(0.25, z=1.0), LabelFlip(0.4), LabelFlip(0.4, num_classes=100)]


@pytest.mark.parametrize("attack", ALL, ids=repr)
def test_config_round_trip(attack):
    cfg = attack.to_config()
    assert cfg["name"] == attack.config_name and ATTACKS[cfg["name"]] is type(attack)
    rebuilt = make_attack(cfg)
    assert rebuilt == attack and hash(rebuilt) == hash(attack) and repr(rebuilt) == repr(attack)
    assert make_attack(attack) is attack
    assert repr(attack).startswith(type(attack).__name__ + "(")
    assert isinstance(attack, Attack)


def test_config_values():
    assert make_attack(None) == NoAttack() and make_attack("none") == NoAttack()
    assert make_attack({"name": "SIGN_FLIP", "fraction": 0.2, "scale": None}) == SignFlip(0.2)
    assert make_attack({"name": "alie", "fraction": 0.2, "z": None}).z is None
    assert SignFlip(0.2) != SignFlip(0.2, scale=2.0) and SignFlip(0.2) != ALIE(0.2)
    assert len({SignFlip(0.2), SignFlip(0.2), ALIE(0.2)}) == 2
    assert NoAttack().is_none and SignFlip(0.0).is_none and not SignFlip(0.1).is_none
    assert LabelFlip(0.1).poisons_data and not SignFlip(0.1).poisons_data
    assert ATTACK_FAMILY.default == "none" and ATTACK_FAMILY.base is Attack
    with pytest.raises(ValueError, match="'krum'"):
        make_attack("krum")
    with pytest.raises(ValueError, match="std"):
        make_attack({"name": "sign_flip", "fraction": 0.1, "std": 1.0})
    with pytest.raises(ValueError, match="got None"):
        make_attack("gaussian")  # the fraction is required
    with pytest.raises(ValueError):
        make_attack(3.5)


def test_layer_attacks():
    out = layer_attacks(["none", "sign_flip", "alie"], 3, fraction=[None, 0.2, 0.3], scale=2.0, z=None)
    assert out == [NoAttack(), SignFlip(0.2, scale=2.0), ALIE(0.3)]
    assert layer_attacks(None, 2) == [NoAttack(), NoAttack()]
    assert layer_attacks("gaussian", 2, fraction=0.1, scaled=False) == [GaussianAttack(0.1, scaled=False)] * 2
    assert layer_attacks(["label_flip", None], 2, fraction=0.2, num_classes=[3, None]) == [
        LabelFlip(0.2, num_classes=3), NoAttack()]
    with pytest.raises(ValueError, match="N = 3"):
        layer_attacks(["none", "alie"], 3, fraction=0.1)
    with pytest.raises(ValueError, match="'bogus'"):
        layer_attacks(["none", "bogus"], 2, fraction=0.1)
    with pytest.raises(ValueError, match="N = 2"):
        layer_attacks("alie", 2, fraction=[0.1, 0.2, 0.3])


BAD = [(SignFlip, {"fraction": 1.0}), (SignFlip, {"fraction": -0.1}), (SignFlip, {"fraction": float("nan")}),
       (SignFlip, {"fraction": True}), (SignFlip, {"fraction": "0.2"}), (SignFlip, {"fraction": None}),
       (SignFlip, {"fraction": 0.1, "scale": 0.0}), (SignFlip, {"fraction": 0.1, "scale": -1.0}),
       (SignFlip, {"fraction": 0.1, "scale": float("inf")}), (GaussianAttack, {"fraction": 0.1, "std": -1.0}),
       (GaussianAttack, {"fraction": 0.1, "scaled": "yes"}), (GaussianAttack, {"fraction": 0.1, "scaled": 1}),
       (ALIE, {"fraction": 0.1, "z": -0.5}), (ALIE, {"fraction": 0.1, "z": float("nan")}),
       (ALIE, {"fraction": 0.1, "z": "max"}), (ALIE, {"fraction": 1.5}), (LabelFlip, {"fraction": 0.1,
                                                                                      "num_classes": 1}),
       (LabelFlip, {"fraction": 0.1, "num_classes": 2.5}), (LabelFlip, {"fraction": 0.1, "num_classes": True})]


@pytest.mark.parametrize("cls,options", BAD, ids=lambda v: repr(v))
def test_bad_options(cls, options):
    bad = list(options.values())[-1]
    with pytest.raises(ValueError) as info:
        cls(**options)
    message = str(info.value)
    assert repr(bad) in message and "\n" not in message
    assert list(options)[-1] in message


def test_bad_inputs():
    a = SignFlip(0.5)
    x, byz, seg = torch.zeros(4, 3), torch.tensor([True, False, False, True]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"x must be"):
        a.corrupt(torch.zeros(4), byz, seg, 2)
    with pytest.raises(ValueError, match=r"x must be"):
        a.corrupt(torch.zeros(4, 3, dtype=torch.int64), byz, seg, 2)
    with pytest.raises(ValueError, match=r"byz must be"):
        a.corrupt(x, byz.long(), seg, 2)
    with pytest.raises(ValueError, match=r"byz must be"):
        a.corrupt(x, byz[:3], seg, 2)
    with pytest.raises(ValueError, match=r"segment must be"):
        a.corrupt(x, byz, seg.int(), 2)
    with pytest.raises(ValueError, match=r"got values in \[0, 1\]"):
        a.corrupt(x, byz, seg, 1)
    with pytest.raises(ValueError, match=r"num_segments"):
        a.corrupt(x, byz, seg, -1)
    with pytest.raises(ValueError, match="Generator"):
        GaussianAttack(0.5).corrupt(x, byz, seg, 2, None)
    with pytest.raises(ValueError, match="got -1"):
        a.byzantine(-1, 0, 1)
    with pytest.raises(ValueError, match="got 0"):
        a.byzantine(5, 0, 0)
    with pytest.raises(ValueError, match="got 1.5"):
        a.byzantine(5, 1.5, 1)
