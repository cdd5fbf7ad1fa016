"""The recipes evaluate whatever the module is: an autoencoder is tested with its own test_step (trainer.test), a
classifier with the recipes' metrics, a module without either is not tested (and does not fail); the monitored
metric defaults to one the module logs, or stops the run before training with what it does log."""

from __future__ import annotations

import json

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)

from recipes.config import compose
from recipes.options import ConfigError

USER = "helpers.user_modules"
MNIST = ["dataset.train_subset=1200", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
         "hierarchy.taus=[2,1,1]", "trainer.enable_progress_bar=false", "logger=none", "rounds=2"]
BLOBS = ["trainer.enable_progress_bar=false", "logger=none", "rounds=2", f"datamodule._target_={USER}.BlobsDataModule",
         "hierarchy.branching=[2,2,2]", "hierarchy.taus=[2,1,1]"]


def _run(overrides, tmp_path):
    from recipes.train import run

    return run(compose("mnist", overrides), tmp_path)


@pytest.mark.usefixtures("data_env")
def test_an_autoencoder_trains_and_is_tested_with_its_own_test_step(tmp_path):
    with pytest.warns(UserWarning, match="logs no val_acc: monitor=val_loss"):
        s = _run([*MNIST, f"model._target_={USER}.AutoEncoder"], tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    assert s["model"] == f"{USER}.AutoEncoder" and s["rounds"] == 2
    assert s["test_evaluation"] == "module" and s["final_test_acc"] is None
    assert set(s["final_test_metrics"]) >= {"test_loss"} and s["final_test_metrics"]["test_loss"] > 0
    assert s["monitor"] == "val_loss" and s["monitor_mode"] == "min" and s["best_round"] in (1, 2)
    assert s["best_test_metrics"]["test_loss"] > 0  # the best-on-validation model, tested the same way
    assert all("val_loss" in r and "test_acc" not in r for r in h)
    assert (tmp_path / "best.ckpt").is_file() and (tmp_path / "summary.json").is_file()


@pytest.mark.usefixtures("data_env")
def test_an_autoencoder_without_test_step_is_not_tested_and_does_not_fail(tmp_path):
    with pytest.warns(UserWarning, match="no test evaluation: AutoEncoderWithoutTest has no test_step and is not a "
                                         "classifier .*module\\(x\\) fails"):
        s = _run([*MNIST, f"model._target_={USER}.AutoEncoderWithoutTest"], tmp_path)
    assert s["test_evaluation"] is None and s["final_test_acc"] is None and s["rounds"] == 2


def test_per_device_evaluation_of_a_module_that_is_not_a_classifier_stops_before_training(tmp_path, data_env):
    with pytest.raises(ConfigError, match="eval.local_fraction=0.2 evaluates every device with the recipes' "
                                          "classifier metrics, but AutoEncoder is not a classifier"):
        _run([*MNIST, f"model._target_={USER}.AutoEncoder", "eval.local_fraction=0.2"], tmp_path)
    assert not (tmp_path / "last.ckpt").exists()


def test_eval_test_every_null_turns_every_test_evaluation_off(tmp_path, data_env):
    s = _run([*MNIST, "model=mlp", "eval.test_every=null"], tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    assert s["final_test_acc"] is None and s["best_test_acc"] is None and s["test_evaluation"] is None
    assert not any("test_acc" in r for r in h) and s["best_round"] is not None


def test_a_module_that_logs_no_accuracy_is_monitored_on_its_loss_and_tested_as_a_classifier(tmp_path):
    with pytest.warns(UserWarning, match="logs no val_acc"):
        s = _run([*BLOBS, f"model._target_={USER}.LossOnlyNet"], tmp_path)
    assert s["monitor"] == "val_loss" and s["monitor_mode"] == "min" and s["best_round"] is not None
    assert s["test_evaluation"] == "classifier" and 0 <= s["final_test_acc"] <= 1  # logits and class ids


def test_a_monitor_the_module_does_not_log_stops_the_run_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"^monitor='val_f1' is not logged by the model's validation_step "
                                          r"\(validation metrics: \['val_loss'\]\)"):
        _run([*BLOBS, f"model._target_={USER}.LossOnlyNet", "monitor=val_f1"], tmp_path)
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "history.json").exists()


def test_a_module_that_logs_nothing_in_validation_has_no_selection(tmp_path):
    s = _run([*BLOBS, f"model._target_={USER}.SilentNet"], tmp_path)
    assert s["monitor"] is None and s["best_round"] is None and s["final_test_acc"] is not None
    with pytest.raises(ConfigError, match="callbacks.early_stopping need a validation metric"):
        _run([*BLOBS, f"model._target_={USER}.SilentNet", "callbacks=[default,early_stopping]"], tmp_path / "es")


def test_the_monitor_probe_leaves_the_module_and_the_random_state_as_they_were():
    """Finding out what the module logs runs one validation batch on a copy of the module with the random state
    restored, so the run trains exactly as it would without it (the golden runs check the numbers end to end)."""
    import torch

    from helpers.user_modules import BlobsDataModule, LossOnlyNet
    from recipes.monitor import validation_metrics

    torch.manual_seed(0)
    module, dm = LossOnlyNet(), BlobsDataModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    assert validation_metrics(module, dm) == ["val_loss"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()) and module._trainer is None
