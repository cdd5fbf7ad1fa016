"""The recipes with a module written against the standalone ``pytorch_lightning`` package (``model._target_``): the
run uses that package's Trainer, callbacks, plugins, logger and strategy (recipes/flavor.py) and gives the same
numbers as the same module on ``lightning``; its own test_step, its callbacks and resume work as for ``lightning``."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)

from recipes.config import compose
from recipes.options import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None,
                                reason="pytorch_lightning is not installed")

PL = "helpers.pl_modules"
MNIST = ["dataset.train_subset=1200", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
         "hierarchy.taus=[2,1,1]", "trainer.enable_progress_bar=false", "rounds=2", "~model.momentum",
         "~model.weight_decay", "~model.optimizer", "~model.name"]


def _run(overrides, run_dir):
    from recipes.train import run

    return run(compose("mnist", overrides), run_dir)


_SAME = ("final_test_acc", "final_test_loss", "best_round", "best_monitor_value", "bits_per_layer", "num_params",
         "local_eval")


@pytest.mark.usefixtures("data_env")
def test_a_pytorch_lightning_classifier_trains_like_the_same_lightning_module(tmp_path):
    ref = _run([*MNIST, "logger=csv", f"model._target_={PL}.LClassifier"], tmp_path / "lightning")
    got = _run([*MNIST, "logger=csv", f"model._target_={PL}.PLClassifier"], tmp_path / "pl")
    assert {k: got[k] for k in _SAME} == {k: ref[k] for k in _SAME}
    assert got["test_evaluation"] == "classifier" and got["final_test_acc"] > 0.3
    hist = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("lightning", "pl")]
    drop = ("wall_time_s", "time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist[1]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hist[0]]
    for d in ("pl",):
        assert (tmp_path / d / "last.ckpt").is_file() and (tmp_path / d / "best.ckpt").is_file()
        assert list((tmp_path / d).rglob("metrics.csv"))  # pytorch_lightning's CSVLogger wrote


@pytest.mark.usefixtures("data_env")
def test_a_pytorch_lightning_autoencoder_is_tested_with_its_own_test_step_and_its_callbacks_run(tmp_path):
    out = tmp_path / "count.json"
    with pytest.warns(UserWarning, match="logs no val_acc: monitor=val_loss"):
        s = _run([*MNIST, "logger=none", f"model._target_={PL}.PLAutoEncoder",
                  f"+trainer.callbacks=[{{_target_:{PL}.CountRounds,path:'{out}'}}]"], tmp_path / "run")
    assert s["test_evaluation"] == "module" and s["final_test_acc"] is None
    assert s["final_test_metrics"]["test_loss"] > 0 and s["monitor"] == "val_loss"
    assert json.loads(out.read_text()) == {"rounds": 2, "trainer": "pytorch_lightning.trainer.trainer"}


@pytest.mark.usefixtures("data_env")
def test_a_resumed_pytorch_lightning_run_continues_bit_for_bit(tmp_path):
    straight = _run([*MNIST, "logger=none", f"model._target_={PL}.PLClassifier", "rounds=3"], tmp_path / "a")
    _run([*MNIST, "logger=none", f"model._target_={PL}.PLClassifier", "rounds=1"], tmp_path / "b")
    resumed = _run([*MNIST, "logger=none", f"model._target_={PL}.PLClassifier", "rounds=3",
                    f"ckpt_path={tmp_path / 'b' / 'last.ckpt'}"], tmp_path / "c")
    assert resumed["final_test_acc"] == straight["final_test_acc"]
    assert resumed["final_test_loss"] == straight["final_test_loss"]
    assert resumed["bits_per_layer"] == straight["bits_per_layer"]


@pytest.mark.usefixtures("data_env")
def test_a_function_that_builds_a_pytorch_lightning_module_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"model._target_='helpers.pl_modules.pl_classifier_factory' is a function "
                                          r"that built a pytorch_lightning module: name the module's class"):
        _run([*MNIST, "logger=none", f"model._target_={PL}.pl_classifier_factory", "~model.lr"], tmp_path)


def test_twins_keep_their_own_hooks_and_report_the_others_as_not_overridden():
    """A recipes class on lightning, moved to pytorch_lightning: an instance of the other package's base, its own
    methods kept, the inherited ones the other package's (so is_overridden is right), the same state key."""
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    from recipes.datamodules import ImageDataModule
    from recipes.flavor import counterpart, is_overridden, package_of_target, use_package
    from recipes.recorder import RunRecorder

    assert counterpart(lp.Trainer, "pytorch_lightning") is pl.Trainer
    assert counterpart(lp.callbacks.ModelCheckpoint, "pytorch_lightning") is pl.callbacks.ModelCheckpoint
    assert counterpart(RunRecorder, "lightning.pytorch") is RunRecorder
    from lightning_qmlhfl import QMLHFLStrategy
    from lightning_qmlhfl.pytorch_lightning import QMLHFLStrategy as PLStrategy

    assert counterpart(QMLHFLStrategy, "pytorch_lightning") is PLStrategy
    DM = counterpart(ImageDataModule, "pytorch_lightning")
    assert issubclass(DM, pl.LightningDataModule) and issubclass(DM, ImageDataModule)
    assert DM.train_dataloader is ImageDataModule.train_dataloader
    assert DM.predict_dataloader is pl.LightningDataModule.predict_dataloader
    dm = DM("mnist", data_dir="/nonexistent")
    with use_package("pytorch_lightning"):
        assert is_overridden("test_dataloader", dm) and not is_overridden("predict_dataloader", dm)
    Rec = counterpart(RunRecorder, "pytorch_lightning")
    assert issubclass(Rec, pl.Callback) and Rec().state_key == RunRecorder().state_key
    assert package_of_target("helpers.pl_modules.PLClassifier") == "pytorch_lightning"
    assert package_of_target("recipes.models.LeNet") == "lightning.pytorch"
    assert package_of_target("helpers.pl_modules.pl_classifier_factory") == "lightning.pytorch"
