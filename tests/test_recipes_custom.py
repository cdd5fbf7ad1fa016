"""A researcher's own LightningModule / datamodule / partitioner / compressor / logger / callbacks through the recipes'
``_target_`` options, the built-in model names, and the recipes (with their configs) installed as a package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)
import torch
from omegaconf import OmegaConf

from lightning_qmlhfl import QSGD, ScaledSign, TopK
from recipes.components import PRESET_KEYS, build_partitioner, instantiate_node, model_label
from recipes.components import build_model as build_model_from_cfg
from recipes.config import compose
from recipes.simulation import build_compressors, build_hierarchy

ROOT = Path(__file__).resolve().parents[1]
USER = "helpers.user_modules"
SMALL = ["trainer.progress_bar=false", "logger=none", "trainer.rounds=2", f"datamodule._target_={USER}.BlobsDataModule"]


def _compose(overrides: list[str], config: str = "mnist"):
    return compose(config, overrides)


def test_built_in_model_names_keep_working():
    from recipes.models import MODEL_NAMES, model_target

    for name in MODEL_NAMES:
        for config in ("mnist", "cifar"):
            assert model_label(_compose([f"model={name}"], config)) == name
        m = build_model_from_cfg(_compose([f"model={name}"]))
        assert f"{type(m).__module__}.{type(m).__qualname__}" == model_target(name)
    plain = OmegaConf.create({"model": {"name": "mlp", "lr": 0.1}})  # a config without _target_: the registry
    assert build_model_from_cfg(plain).lr == 0.1


def test_user_module_target_with_arguments_and_inherited_preset_keys():
    cfg = _compose([f"model._target_={USER}.TinyNet", "+model.hidden=7", "model.lr=0.3"])
    with pytest.warns(UserWarning, match="does not take momentum, optimizer, weight_decay"):
        m = build_model_from_cfg(cfg)
    assert m.net[0].out_features == 7 and m.lr == 0.3 and model_label(cfg) == f"{USER}.TinyNet"
    with pytest.raises(ValueError, match=r"TinyNet does not take hiden \(model.hiden=7\); it takes: classes, features"):
        build_model_from_cfg(_compose([f"model._target_={USER}.TinyNet", "+model.hiden=7"]))
    with pytest.raises(ValueError, match="model._target_='nowhere.Module' cannot be imported"):
        build_model_from_cfg(_compose(["model._target_=nowhere.Module"]))
    with pytest.raises(TypeError, match="built a Linear, not a LightningModule"):
        build_model_from_cfg(_compose(["model._target_=torch.nn.Linear", "+model.in_features=2",
                                       "+model.out_features=2"]))
    assert PRESET_KEYS["model"] >= {"lr", "momentum", "weight_decay", "optimizer"}


def test_optimizer_as_a_partial_target():
    cfg = _compose(["model.optimizer={_target_:torch.optim.AdamW,_partial_:true,weight_decay:0.01}", "model.lr=0.003"])
    m = build_model_from_cfg(cfg)
    opt = m.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.003 and opt.defaults["weight_decay"] == 0.01
    assert m.hparams["optimizer"].startswith("torch.optim.adamw.AdamW(")  # a checkpoint-safe label, not the partial
    bound = build_model_from_cfg(_compose(["model.optimizer={_target_:torch.optim.Adam,_partial_:true,lr:0.2}"]))
    assert bound.configure_optimizers().defaults["lr"] == 0.2
    with pytest.raises(ValueError, match="set them on it"):
        build_model_from_cfg(_compose(["model.optimizer={_target_:torch.optim.SGD,_partial_:true}",
                                       "model.momentum=0.9"]))
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; allowed: sgd, adam, or a callable"):
        build_model_from_cfg(_compose(["model.optimizer=lbfgs"]))


def test_partitioner_compressor_logger_and_callback_targets():
    from lightning_qmlhfl.data import Dirichlet, Shards

    assert isinstance(build_partitioner(_compose([])), Dirichlet)
    shards = build_partitioner(_compose(["partition=shards", "partition.classes_per_device=3"]))
    assert isinstance(shards, Shards) and shards.classes_per_device == 3
    with pytest.warns(UserWarning, match="does not take alpha, group_by_edge, min_samples"):
        p = build_partitioner(_compose([f"partition._target_={USER}.FirstHalfIID", "+partition.share=0.25"]))
    assert repr(p) == "FirstHalfIID(share=0.25)"
    with pytest.raises(TypeError, match="not a lightning_qmlhfl.data.Partitioner"):
        build_partitioner(_compose(["partition._target_=collections.OrderedDict"]))
    cfg = _compose([f"compressor.layers=[topk,{{_target_:{USER}.coarse_qsgd,levels:3}},sign]"])
    assert build_compressors(cfg, 3) == [TopK(ratio=0.01), QSGD(3, bucket_size=None), ScaledSign(512)]
    every = _compose([f"+compressor._target_={USER}.coarse_qsgd"])
    with pytest.warns(UserWarning, match="does not take bucket_size"):
        assert build_compressors(every, 3) == [QSGD(8, bucket_size=None)] * 3  # levels: taken from the preset (the target has it)
    logger = instantiate_node(OmegaConf.create({"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "x"}),
                              "logger", defaults={"save_dir": "/tmp/somewhere"})
    assert type(logger).__name__ == "CSVLogger" and logger.save_dir == "/tmp/somewhere"


def test_user_module_composes_with_every_hierarchy_compressor_and_partition():
    labels = torch.arange(4).repeat(2000)  # 8000 samples over 64 devices
    combos = [(h, "per_layer", p) for h in ("two_layer", "three_layer", "four_layer")
              for p in ("dirichlet", "iid", "shards")]
    combos += [("three_layer", c, "dirichlet") for c in ("topk_device", "topk_upper", "sign_device", "sign_upper",
                                                         "qsgd1_device", "qsgd1_upper")]  # the N = 3 presets
    for hierarchy, compressor, partition in combos:
        cfg = _compose([f"model._target_={USER}.TinyNet", f"datamodule._target_={USER}.BlobsDataModule",
                        f"hierarchy={hierarchy}", f"compressor={compressor}", f"partition={partition}"])
        h = build_hierarchy(cfg)
        assert len(build_compressors(cfg, h.num_layers)) == h.num_layers
        assert len(build_partitioner(cfg)(labels, h, seed=0)) == h.num_devices == 64
        with pytest.warns(UserWarning):
            assert type(build_model_from_cfg(cfg)).__name__ == "TinyNet"


def test_user_module_and_datamodule_train_through_the_recipe(tmp_path):
    """Own module + datamodule, a 4-layer tree, one compressor per layer (a user's on layer 4), shards, per-device
    evaluation with personalisation, fraction participation, an extra callback."""
    from recipes.train import run

    cfg = _compose([*SMALL, f"model._target_={USER}.TinyNet", "+model.hidden=16", "hierarchy=four_layer",
                    "hierarchy.branching=[2,1,2,2]", "hierarchy.taus=[2,1,1,1]", "partition=shards",
                    f"compressor.layers=[topk,qsgd,sign,{{_target_:{USER}.coarse_qsgd,levels:3}}]",
                    "participation.layers=[fraction,full,full,full]", "participation.f=0.5",
                    "eval.local_fraction=0.2", "eval.personalized=true",
                    "trainer.callbacks=[{_target_:lightning.pytorch.callbacks.Timer}]"])
    s = run(cfg, tmp_path)
    assert s["model"] == f"{USER}.TinyNet" and s["dataset"] == f"{USER}.BlobsDataModule"
    assert s["layers"] == 4 and s["devices"] == 8 and s["compressors"][3] == "QSGD(3, bucket_size=None)"
    assert s["final_test_acc"] is not None and s["best_round"] is not None and s["selection_set"] == "validation"
    assert s["local_eval"]["personalized"]["mean"] >= 0 and "with 0.2 of every device" in s["partition"]
    assert (tmp_path / "last.ckpt").is_file()


def test_dict_batches_use_the_modules_per_sample_metrics(tmp_path):
    from recipes.train import run

    cfg = _compose([*SMALL, f"model._target_={USER}.DictBatchNet", "+datamodule.dict_batches=true",
                    "partition=iid", "hierarchy.branching=[2,2,2]", "hierarchy.taus=[1,1,1]", "eval.local_fraction=0.1",
                    "trainer.checkpoint=false"])
    s = run(cfg, tmp_path)
    assert 0 <= s["final_test_acc"] <= 1 and s["local_eval"]["cloud"]["mean"] >= 0


def test_recipes_and_configs_work_from_an_installed_copy(tmp_path):
    """`pip install --target` a non-editable copy, then `python -m recipes.mnist --cfg job` from another directory:
    the configs are package data found through the installed `recipes` package."""
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lightning_qmlhfl", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "recipes" / "conf" / "mnist.yaml").is_file() and (site / "recipes" / "conf" / "model" / "lenet.yaml").is_file()
    env = dict(os.environ, PYTHONPATH=str(site))
    for args, expect in ((["-c", "import recipes; print(recipes.__file__)"], str(site / "recipes")),
                         (["-m", "recipes.mnist", "--cfg", "job", "model=mlp", "hierarchy=four_layer"], "branching:"),
                         (["-m", "recipes.cifar", "--cfg", "job"], "name: cifar10")):
        out = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and expect in out.stdout, (args, out.stdout[-2000:], out.stderr[-2000:])
    job = OmegaConf.create(subprocess.run([sys.executable, "-m", "recipes.mnist", "--cfg", "job", "model=mlp"],
                                          cwd=elsewhere, env=env, capture_output=True, text=True).stdout)
    assert job.model._target_ == "recipes.models.MLP" and job.dataset.val_fraction == 0.1
    assert json.dumps(OmegaConf.to_container(job, resolve=True))  # fully resolvable
