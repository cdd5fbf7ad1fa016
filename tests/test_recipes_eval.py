"""Validation split, model selection, early stopping, LR plateau and per-device evaluation of the recipes
(recipes/splits.py, datamodules.py, evaluation.py, callbacks.py)."""

from __future__ import annotations

import json
import math

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)
import torch

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.data import IID, Dirichlet, EmptyPartitionError
from recipes.config import compose
from recipes.local_eval import HoldoutPartitioner, device_summary
from recipes.options import check_fraction
from recipes.splits import stratified_split

TINY = ["dataset.train_subset=1500", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]", "hierarchy.taus=[2,1,1]",
        "trainer.progress_bar=false", "logger=none", "model=mlp"]


def _compose(overrides: list[str], config: str = "mnist"):
    return compose(config, overrides)


def test_stratified_split_is_exact_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, 0.1, torch.Generator().manual_seed(0))
    assert held.numel() == 10 and kept.numel() == 90
    assert torch.bincount(labels[held], minlength=3).tolist() == [5, 3, 2]  # the class proportions
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(100))
    again = stratified_split(labels, 0.1, torch.Generator().manual_seed(0))
    other = stratified_split(labels, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(again[1], held) and not torch.equal(other[1], held)
    # largest remainders: 7 of [5, 3, 2] -> quotas 3.5, 2.1, 1.4 -> 3 + 2 + 1 = 6, the largest remainder gets the 7th
    _, h7 = stratified_split(torch.tensor([0] * 5 + [1] * 3 + [2] * 2), 0.7, torch.Generator().manual_seed(0))
    assert h7.numel() == 7
    assert stratified_split(labels, 0.0, torch.Generator())[1].numel() == 0
    kept, held = stratified_split(None, 0.01, torch.Generator(), num_samples=5, min_held=1)  # at least one
    assert held.numel() == 1 and kept.numel() == 4
    for bad in (1.0, -0.1, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="dataset.val_fraction must be"):
            check_fraction(bad, "dataset.val_fraction")


@pytest.mark.usefixtures("data_env")
def test_datamodule_holds_out_a_stratified_validation_split():
    from recipes.datamodules import ImageDataModule

    dm = ImageDataModule("mnist", val_fraction=0.1)
    dm.setup()
    assert dm.sizes() == {"train": 54000, "val": 6000, "test": 10000}  # 6,000 of the 60,000 images held out
    labels = torch.cat([dm.train.tensors[1], dm.val.tensors[1]])
    full = torch.bincount(labels, minlength=10).double() / 60000
    val = torch.bincount(dm.val.tensors[1], minlength=10).double() / 6000
    assert (full - val).abs().max() < 2e-4  # stratified
    assert not set(dm.train_index.tolist()) & set(dm.val_index.tolist()) and not dm.validation_is_test
    none = ImageDataModule("mnist", val_fraction=0.0, train_subset=100)
    assert none.sizes()["val"] == 0 and none.validation_is_test
    assert len(none.val_dataloader().dataset) == 10000  # no split: validation on the test set, as before
    with pytest.raises(ValueError, match="dataset.batch_size must be an integer >= 1, got 0"):
        ImageDataModule("mnist", batch_size=0)


def test_holdout_partitioner_keeps_every_devices_held_out_part_apart():
    labels = torch.arange(10).repeat_interleave(40)  # 400 samples
    h = Hierarchy.balanced([2, 4])
    inner = Dirichlet(alpha=0.5, min_samples=10)
    part = HoldoutPartitioner(inner, 0.25)
    train = part(labels, h, seed=3)
    full = inner(labels, h, seed=3)
    for i in range(8):
        t, held = train[i], part.holdout[i]
        assert not set(t.tolist()) & set(held.tolist())
        assert torch.equal(torch.sort(torch.cat([t, held])).values, full[i])  # from the device's own share
        assert held.numel() == max(1, round(0.25 * full[i].numel()))
        for c in labels[full[i]].unique():  # stratified within the device (up to one sample per class)
            share = (labels[held] == c).sum() / held.numel() - (labels[full[i]] == c).sum() / full[i].numel()
            assert abs(float(share)) <= 1 / held.numel() + 1e-9
    again = HoldoutPartitioner(inner, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(again(labels, h, seed=3), train))  # deterministic (resume)
    iid = HoldoutPartitioner(IID(), 0.5)
    assert not iid.needs_labels and len(iid(None, h, seed=0, num_samples=17)) == 8
    with pytest.raises(EmptyPartitionError, match="device .* too few to hold one out"):
        HoldoutPartitioner(IID(), 0.5)(None, h, seed=0, num_samples=9)
    with pytest.raises(ValueError, match=r"eval.local_fraction must be in \(0, 1\)"):
        HoldoutPartitioner(IID(), 0.0)


def test_device_summary():
    s = device_summary([0.1 * i for i in range(1, 21)])  # 20 devices: worst 10 % = the 2 lowest
    assert s["worst10"] == pytest.approx(0.15) and s["best"] == pytest.approx(2.0) and s["min"] == pytest.approx(0.1)
    assert s["mean"] == pytest.approx(1.05) and s["std"] == pytest.approx(math.sqrt(sum((0.1 * i - 1.05) ** 2
                                                                                      for i in range(1, 21)) / 20))
    assert s["p10"] == pytest.approx(0.29)


@pytest.mark.usefixtures("data_env")
def test_selection_on_validation_early_stopping_and_per_device_evaluation(tmp_path):
    """One run: validation split, best-on-validation model tested at the end, early stopping, LR plateau, the
    per-device evaluation (cloud and personalised) every 2 rounds and at the last round, the plots."""
    from recipes.train import run

    cfg = _compose([*TINY, "trainer.rounds=6", "trainer.early_stopping.patience=1", "trainer.lr_plateau.patience=0",
                    "eval.local_fraction=0.2", "eval.every=2", "eval.personalized=true", "eval.test_every=2",
                    "model.lr=0.5"])
    s = run(cfg, tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    assert s["split_sizes"] == {"train": 1350, "val": 150, "test": 300} and s["selection_set"] == "validation"
    assert [r["round"] for r in h] == list(range(1, s["rounds"] + 1)) and all("val_acc" in r for r in h)
    best = max(h, key=lambda r: (r["val_acc"], -r["round"]))  # the first round with the best validation accuracy
    assert s["best_round"] == best["round"] and s["best_monitor_value"] == best["val_acc"]
    # the best checkpoint's cloud model, evaluated on the test set, is best_test_acc
    from recipes.components import build_model as build_model_from_cfg
    from recipes.datamodules import ImageDataModule
    from recipes.evaluation import evaluate_loader

    ck = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert ck["epoch"] + 1 == s["best_round"]
    model = build_model_from_cfg(cfg)
    model.load_state_dict(ck["state_dict"])
    dm = ImageDataModule("mnist", val_fraction=0.1, train_subset=1500, test_subset=300)
    assert evaluate_loader(model, dm.test_dataloader())["acc"] == s["best_test_acc"]
    assert s["final_test_acc"] == h[-1]["test_acc"]
    if s["rounds"] < 6:
        assert s["stopped_early"]
    # test curve every 2 rounds and at the end; per-device evaluation every 2 rounds and at the end
    last = s["rounds"]
    assert [r["round"] for r in h if "test_acc" in r] == sorted({*range(2, last + 1, 2), last})
    evaluated = [r for r in h if "local_cloud_acc" in r]
    assert [r["round"] for r in evaluated] == sorted({*range(2, last + 1, 2), last})
    for r in evaluated:
        assert len(r["local_cloud_acc"]) == len(r["local_personal_acc"]) == 8
        assert r["local_cloud_acc_mean"] == pytest.approx(sum(r["local_cloud_acc"]) / 8)
        assert r["local_cloud_acc_worst10"] == min(r["local_cloud_acc"])  # 10 % of 8 devices: the worst one
    assert s["local_eval"]["round"] == last and set(s["local_eval"]) == {"round", "cloud", "personalized"}
    for png in ("accuracy.png", "local_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("data_env")
def test_evaluation_never_changes_the_simulation(tmp_path):
    """Per-device evaluation (with personalisation) and the test curve use no random numbers of the simulation:
    the same run without them trains bit for bit the same (the held-out parts are carved out either way)."""
    from recipes.train import run

    base = [*TINY, "trainer.rounds=2", "eval.local_fraction=0.2", "trainer.checkpoint=false"]
    a = run(_compose([*base, "eval.personalized=true"]), tmp_path / "a")
    b = run(_compose([*base, "eval.every=100", "eval.test_every=0"]), tmp_path / "b")
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("a", "b"))
    keys = ("train_loss", "val_acc", "val_loss", "bits_total", "sim_time")
    assert [[r[k] for k in keys] for r in ha] == [[r[k] for k in keys] for r in hb]
    assert a["final_test_acc"] == b["final_test_acc"] and "local_cloud_acc" not in hb[0]
    assert hb[-1]["local_cloud_acc"] == ha[-1]["local_cloud_acc"]  # the last round is always evaluated


@pytest.mark.parametrize("overrides, error, match", [
    (["dataset.val_fraction=1.0"], ValueError, r"dataset.val_fraction must be in \[0, 1\)"),
    (["eval.local_fraction=-0.5"], ValueError, r"eval.local_fraction must be in \[0, 1\)"),
    (["trainer.monitor_mode=biggest"], ValueError, "trainer.monitor_mode must be auto, max or min, got 'biggest'"),
    (["trainer.early_stopping.patience=-1"], ValueError, "trainer.early_stopping.patience must be null or an integer"),
    (["trainer.lr_plateau.patience=1", "trainer.lr_plateau.factor=2"], ValueError,
     r"trainer.lr_plateau.factor must be in \(0, 1\)"),
    (["trainer.monitor=null", "trainer.early_stopping.patience=2"], ValueError, "need a validation metric"),
    (["eval.every=0"], ValueError, "eval.every must be an integer >= 1"),
    (["eval.test_every=2.5"], ValueError, "eval.test_every must be an integer >= 0, got 2.5"),  # not truncated
    # 0 is refused, not replaced by the default (tau_1) as a falsy value would be
    (["eval.local_fraction=0.2", "eval.personal_steps=0"], ValueError,
     "eval.personal_steps must be null or an integer >= 1, got 0"),
])
@pytest.mark.usefixtures("data_env")
def test_bad_evaluation_options_are_named(tmp_path, overrides, error, match):
    from recipes.train import run

    with pytest.raises(error, match=match):
        run(_compose([*TINY, "trainer.rounds=1", *overrides]), tmp_path)


@pytest.mark.usefixtures("data_env")
def test_a_monitor_the_model_does_not_log_is_named(tmp_path):
    from recipes.train import run

    with pytest.raises(ValueError, match=r"trainer.monitor='val_f1' is not logged .*\['val_acc', 'val_loss'\]"):
        run(_compose([*TINY, "trainer.rounds=1", "trainer.monitor=val_f1"]), tmp_path)


def test_main_job_defaults_hold_out_a_validation_split_and_experiments_do_not():
    cfg = _compose([])
    assert cfg.dataset.val_fraction == 0.1 and cfg.monitor == "val_acc" and cfg.dataset.download is True
    assert cfg.eval.local_fraction == 0.0 and cfg.eval.test_every == 1
    for preset in ("depth", "compressors", "server_optim", "participation", "stragglers", "mobility", "planning"):
        assert _compose([f"+experiment={preset}"]).dataset.val_fraction == 0.0  # as measured in docs/
    assert _compose(["+experiment=quant_sensitivity"], "cifar").dataset.val_fraction == 0.0
