"""The recipes' privacy, robust and attack groups (recipes/trust.py): each preset builds the per-layer options it
documents, the noise multiplier is calibrated from a target epsilon, mistakes are one line, and a short MNIST run
logs epsilon, the clip fraction, the attacked uploads and writes the guarantee into summary.json."""

from __future__ import annotations

import json

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.federation.participation import layer_participation
from lightning_qmlhfl.privacy import GaussianDP, NoPrivacy, PrivacyAccountant, noise_points
from recipes.config import compose
from recipes.trust import build_attacks, build_privacy, build_robust

H = Hierarchy.balanced([4, 4, 4])  # 64 devices, as the main job
FIXED = "target_quantile=None, clip_lr=0.2, count_noise=None"


def _privacy(overrides, rounds=10):
    cfg = compose("mnist", overrides)
    return build_privacy(cfg, 3, [2, 2, 2], layer_participation("full", 3), H, rounds)


@pytest.mark.parametrize("overrides, expected", [
    ([], ["NoPrivacy()"] * 3),
    (["privacy=devices", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5"],
     [f"GaussianDP(noise_multiplier=0.8, clip_norm=0.5, where='local', {FIXED})", "NoPrivacy()", "NoPrivacy()"]),
    (["privacy=edge"], [f"GaussianDP(noise_multiplier=1.0, clip_norm=1.0, where='central', {FIXED})",
                        "NoPrivacy()", "NoPrivacy()"]),
    (["privacy=cloud", "privacy.target_quantile=0.5", "privacy.count_noise=2.0"],
     ["NoPrivacy()", "NoPrivacy()", "GaussianDP(noise_multiplier=1.0, clip_norm=1.0, where='central', "
                                    "target_quantile=0.5, clip_lr=0.2, count_noise=2.0)"]),
])
def test_the_privacy_group(overrides, expected):
    assert [repr(p) for p in _privacy(overrides)] == expected


def test_target_epsilon_calibrates_the_multiplier_for_the_runs_rounds():
    privs = _privacy(["privacy=edge", "privacy.target_epsilon=4.0"], rounds=20)
    z = privs[0].noise_multiplier
    eps = PrivacyAccountant(noise_points(H, [2, 2, 2], privs)).epsilon(20, 1e-5)
    assert eps == pytest.approx(4.0, rel=1e-3) and z > 0
    assert _privacy(["privacy=edge", "privacy.target_epsilon=4.0"], rounds=40)[0].noise_multiplier > z


@pytest.mark.parametrize("overrides, expected", [
    ([], ["Mean()"] * 3),
    (["robust=median"], ["CoordinateMedian()", "Mean()", "Mean()"]),
    (["robust=median", "robust.at=none"], ["Mean()"] * 3),
    (["robust=trimmed_mean", "robust.at=both"], ["TrimmedMean(beta=0.2)", "Mean()", "TrimmedMean(beta=0.2)"]),
    (["robust=krum", "robust.at=cloud", "robust.f=0"], ["Mean()", "Mean()", "Krum(f=0, m=1)"]),
])
def test_the_robust_group(overrides, expected):
    assert [repr(r) for r in build_robust(compose("mnist", overrides), 3)] == expected


@pytest.mark.parametrize("overrides, expected", [
    ([], ["NoAttack()"] * 3),
    (["attack=sign_flip", "attack.fraction=0.1"], ["SignFlip(fraction=0.1, scale=4.0)", "NoAttack()", "NoAttack()"]),
    (["attack=edge"], ["NoAttack()", "SignFlip(fraction=0.25, scale=4.0)", "NoAttack()"]),
    (["attack=label_flip"], ["LabelFlip(fraction=0.2, num_classes=10)", "NoAttack()", "NoAttack()"]),
])
def test_the_attack_group(overrides, expected):
    assert [repr(a) for a in build_attacks(compose("mnist", overrides), 3)] == expected


@pytest.mark.parametrize("overrides, match", [
    (["privacy=edge", "privacy.trust=edges"], "privacy.trust must be one of .* got 'edges'"),
    (["privacy=edge", "privacy.clip_norm=0"], "privacy.* clip_norm .*0"),
    (["privacy=edge", "privacy.target_epsilon=2", "privacy.noise_multiplier=1"], "give one"),
    (["robust=trimmed_mean", "robust.beta=0.5"], "robust.*beta.*0.5"),
    (["attack=sign_flip", "attack.fraction=1.5"], "attack.*fraction.*1.5"),
])
def test_trust_mistakes_are_one_line(overrides, match):
    cfg = compose("mnist", overrides)
    with pytest.raises(ValueError, match=match) as e:
        build_privacy(cfg, 3, [2, 2, 2], layer_participation("full", 3), H, 5)
        build_robust(cfg, 3)
        build_attacks(cfg, 3)
    assert "\n" not in str(e.value)


TINY = ["model=mlp", "dataset.train_subset=1200", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
        "hierarchy.taus=[2,1,2]", "rounds=2", "trainer.enable_progress_bar=false", "logger=csv", "seed=3"]


@pytest.mark.usefixtures("data_env")
def test_a_private_robust_attacked_run_logs_and_summarises(tmp_path, monkeypatch):
    from recipes.train import run

    monkeypatch.setenv("QMLHFL_THREADS", "2")
    summary = run(compose("mnist", [*TINY, "privacy=edge", "privacy.noise_multiplier=0.5", "robust=median",
                                    "robust.at=cloud", "attack=label_flip", "attack.fraction=0.25"]), tmp_path / "run")
    assert summary["privacy"][0].startswith("GaussianDP(noise_multiplier=0.5")
    assert summary["robust"] == ["Mean()", "Mean()", "CoordinateMedian()"]
    assert summary["attacks"][0] == "LabelFlip(fraction=0.25, num_classes=10)"
    privs = [GaussianDP(noise_multiplier=0.5, clip_norm=1.0, where="central"), NoPrivacy(), NoPrivacy()]
    eps = PrivacyAccountant(noise_points(Hierarchy.balanced([2, 2, 2]), [2, 1, 2], privs)).epsilon(2, 1e-5)
    assert summary["epsilon"] == pytest.approx(eps) and summary["dp_delta"] == 1e-5
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    rounds = [r for r in history if "epsilon" in r]
    assert len(rounds) == 2 and rounds[0]["epsilon"] < rounds[1]["epsilon"] == pytest.approx(eps)
    assert all(0 <= r["clip_fraction_layer1"] <= 1 for r in rounds)
