"""Privacy options (lightning_qmlhfl.privacy.mechanisms): config round trips, validation, and the arithmetic on
stacked upload rows against numpy written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_qmlhfl.privacy import (GaussianDP, NoPrivacy, adaptive_clip_update, add_gaussian_noise_, clip_rows_,
                                      default_count_noise, layer_privacy, make_privacy, noise_multiplier_for_sum,
                                      noisy_fraction_below)

# ------------------------------------------------------------------------------------------------- options / config


@pytest.mark.parametrize("option", [
    NoPrivacy(),
    GaussianDP(),
    GaussianDP(0.7, 2.5, "local"),
    GaussianDP(1.1, 0.3, "central", target_quantile=0.5, clip_lr=0.1),
    GaussianDP(1.1, 0.3, "central", target_quantile=0.25, count_noise=3.0),
])
def test_config_round_trip(option):
    cfg = option.to_config()
    rebuilt = make_privacy(cfg)
    assert rebuilt == option and hash(rebuilt) == hash(option) and repr(rebuilt) == repr(option)
    assert make_privacy(dict(cfg)).to_config() == cfg
    assert make_privacy(option) is option


def test_defaults_and_names():
    assert make_privacy(None) == NoPrivacy() and make_privacy(None).is_off
    g = make_privacy("gaussian")
    assert g == GaussianDP(noise_multiplier=1.0, clip_norm=1.0, where="central") and not g.is_off
    assert g.to_config() == {"name": "gaussian", "noise_multiplier": 1.0, "clip_norm": 1.0, "where": "central",
                             "target_quantile": None, "clip_lr": 0.2, "count_noise": None}
    assert make_privacy({"name": "gaussian", "clip_norm": 3, "target_quantile": None}).clip_norm == 3.0
    assert GaussianDP(1.0) != GaussianDP(1.0, where="local")
    assert GaussianDP() != NoPrivacy()


def test_layer_privacy():
    layers = layer_privacy(["none", "gaussian", "gaussian"], 3, noise_multiplier=[None, 0.5, 2.0], where="local",
                           clip_norm=0.1)
    assert layers == [NoPrivacy(), GaussianDP(0.5, 0.1, "local"), GaussianDP(2.0, 0.1, "local")]
    assert layer_privacy(None, 2) == [NoPrivacy(), NoPrivacy()]
    assert layer_privacy("gaussian", 2, target_quantile=[None, 0.5], count_noise=[None, 2.0]) == [
        GaussianDP(), GaussianDP(target_quantile=0.5, count_noise=2.0)]
    with pytest.raises(ValueError, match="noise_multipler"):
        layer_privacy("gaussian", 2, noise_multipler=1.0)
    with pytest.raises(ValueError, match="'laplace'"):
        layer_privacy(["gaussian", "laplace"], 2)


@pytest.mark.parametrize("kwargs, shown", [
    ({"noise_multiplier": -0.5}, "-0.5"),
    ({"noise_multiplier": float("nan")}, "nan"),
    ({"noise_multiplier": True}, "True"),
    ({"clip_norm": 0.0}, "0.0"),
    ({"clip_norm": -2}, "-2"),
    ({"where": "edge"}, "'edge'"),
    ({"target_quantile": 1.0}, "1.0"),
    ({"target_quantile": 0}, "0"),
    ({"target_quantile": 0.5, "clip_lr": 0.0}, "0.0"),
    ({"target_quantile": 0.5, "count_noise": -1.0}, "-1.0"),
    ({"target_quantile": 0.5, "where": "local"}, "'local'"),
    ({"count_noise": 2.0}, "2.0"),                                        # only with adaptive clipping
    ({"noise_multiplier": 1.0, "target_quantile": 0.5, "count_noise": 0.4}, "0.4"),  # split impossible
])
def test_bad_options_raise_with_the_value(kwargs, shown):
    with pytest.raises(ValueError) as err:
        GaussianDP(**kwargs)
    msg = str(err.value)
    assert shown in msg and "\n" not in msg


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="'laplace'.*allowed"):
        make_privacy("laplace")
    with pytest.raises(ValueError, match="sigma"):
        make_privacy({"name": "gaussian", "sigma": 1.0})
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_privacy({"name": "none", "noise_multiplier": 1.0})


def test_noise_stds():
    g = GaussianDP(1.5, 0.2, "central")
    assert g.aggregate_noise_std(max_weight=0.25) == pytest.approx(1.5 * 0.2 * 0.25)
    assert g.upload_noise_std() == pytest.approx(0.3) and g.sum_noise_multiplier() == 1.5
    a = GaussianDP(1.0, 0.5, "central", target_quantile=0.5)
    assert default_count_noise(100) == 5.0 and a.count_noise_for(100) == 5.0
    z_sum = (1.0 - (2 * 5.0) ** -2) ** -0.5
    assert a.sum_noise_multiplier(100) == pytest.approx(z_sum)
    assert a.aggregate_noise_std(0.1, num_uploads=100, clip=2.0) == pytest.approx(z_sum * 2.0 * 0.1)
    with pytest.raises(ValueError, match="number of uploads"):
        a.sum_noise_multiplier()
    with pytest.raises(ValueError, match="count_noise must be > noise_multiplier / 2"):
        a.sum_noise_multiplier(10)  # k / 20 = 0.5 = z / 2: no room for the count's share


# ----------------------------------------------------------------------------------------------------- arithmetic


def _np_clip(x: np.ndarray, c: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    scale = np.where(norms > c, c / np.where(norms > 0, norms, 1.0), 1.0)
    return x * scale[:, None], norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_rows_against_numpy(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 257, generator=g, dtype=torch.float64) * torch.tensor(
        [0.001, 0.01, 0.03, 0.05, 0.2, 1.0, 3.0, 0.0, 0.06], dtype=torch.float64).unsqueeze(1)
    x = x.to(dtype)
    C = 0.5
    before = x.clone()
    ref, ref_norms = _np_clip(before.double().numpy(), C)
    norms = clip_rows_(x, C)
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(norms.double().numpy(), ref_norms, rtol=rtol)
    below = torch.from_numpy(ref_norms <= C)
    assert below.sum() >= 3 and (~below).sum() >= 3
    assert torch.equal(x[below], before[below])  # untouched, bit for bit
    new_norms = torch.linalg.vector_norm(x.double(), dim=1)
    assert bool((new_norms <= C * (1 + 4 * torch.finfo(dtype).eps)).all())
    np.testing.assert_allclose(new_norms[~below].numpy(), C, rtol=rtol)
    cos = (x.double()[~below] * before.double()[~below]).sum(1) / (new_norms[~below] * norms.double()[~below])
    np.testing.assert_allclose(cos.numpy(), 1.0, rtol=1e-6)  # direction kept
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=rtol, atol=0)


def test_clip_rows_per_row_clip_and_errors():
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]])
    norms = clip_rows_(x, torch.tensor([1.0, 10.0, 1.0]))
    assert torch.equal(norms, torch.tensor([5.0, 5.0, 0.0]))
    assert torch.allclose(x, torch.tensor([[0.6, 0.8], [3.0, 4.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[k, P\]"):
        clip_rows_(torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="-1"):
        clip_rows_(torch.ones(2, 2), -1.0)
    with pytest.raises(ValueError, match="clip must be > 0"):
        clip_rows_(torch.ones(2, 2), torch.tensor([1.0, 0.0]))


def test_noise_multiplier_for_sum():
    for z, s in [(1.0, 5.0), (0.6, 0.4), (2.0, 50.0)]:
        z_sum = noise_multiplier_for_sum(z, s)
        assert z_sum == pytest.approx((z ** -2 - (2 * s) ** -2) ** -0.5, rel=1e-15) and z_sum > z
        # the two releases (sum at z_sum, centred count at 2 s) compose to one Gaussian at z
        assert (z_sum ** -2 + (2 * s) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    assert noise_multiplier_for_sum(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="0.5"):
        noise_multiplier_for_sum(1.0, 0.5)


def test_adaptive_clip_update_against_numpy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        c, b, q, lr = rng.uniform(0.01, 5), rng.uniform(-0.2, 1.2), rng.uniform(0.05, 0.95), rng.uniform(0.01, 1)
        assert adaptive_clip_update(c, b, q, lr) == pytest.approx(c * np.exp(-lr * (b - q)), rel=1e-14)
    t = adaptive_clip_update(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64), 0.5, 0.2)
    assert float(t) == pytest.approx(2.0 * math.exp(-0.2 * 0.4))
    assert adaptive_clip_update(1.0, 0.9, 0.5, 0.2) < 1.0 < adaptive_clip_update(1.0, 0.1, 0.5, 0.2)
    with pytest.raises(ValueError, match="1.5"):
        adaptive_clip_update(1.0, 0.5, 1.5, 0.2)


def test_noisy_fraction_below_and_noise():
    norms = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.1, 3.0, 0.2, 7.0])
    assert noisy_fraction_below(norms, 1.0, 0.0) == 5 / 8
    g = torch.Generator().manual_seed(3)
    draws = np.array([noisy_fraction_below(norms, 1.0, 2.0, g) for _ in range(4000)])
    assert abs(draws.mean() - 5 / 8) < 4 * (2.0 / 8) / math.sqrt(4000)
    assert draws.std() == pytest.approx(2.0 / 8, rel=0.06)
    x = torch.zeros(200, 500)
    add_gaussian_noise_(x, 0.3, torch.Generator().manual_seed(4))
    assert float(x.std()) == pytest.approx(0.3, rel=0.01) and abs(float(x.mean())) < 0.003
    y = torch.ones(3, 3)
    assert torch.equal(add_gaussian_noise_(y, 0.0), torch.ones(3, 3))
