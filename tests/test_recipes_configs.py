"""Every preset and experiment composes, and every ``_target_`` node it holds instantiates with Hydra as it is: no
key a target does not take (lightning-hydra-template's ``tests/test_configs.py``). Renamed keys still work."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recipes.components import LABELLED
from recipes.config import CONF_DIR, RENAMED, compose

CONFIGS = ("mnist", "cifar")
TARGET_GROUPS = ("dataset", "model", "partition", "strategy", "trainer", "logger")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _experiments() -> list[tuple[str, str]]:
    out = []
    for name in _options("experiment"):
        out.append(("cifar" if name == "quant_sensitivity" else "mnist", name))
    return out


def _plain_instantiate(node, group: str, tmp_path: Path, **objects):
    """Hydra's instantiate of the node exactly as composed (only a labelled group's ``name`` left out)."""
    spec = OmegaConf.to_container(node, resolve=True)
    if group in LABELLED:
        spec.pop("name", None)
    if objects:
        return instantiate({**spec, "_partial_": True}, _convert_="all")(**objects)
    return instantiate(spec, _convert_="all")


def _trust(cfg, h) -> dict:
    from recipes.simulation import build_participation
    from recipes.trust import build_attacks, build_privacy, build_robust

    n = h.num_layers
    return dict(privacy=build_privacy(cfg, n, list(cfg.hierarchy.taus), build_participation(cfg, n), h, 1),
                robust=build_robust(cfg, n), attacks=build_attacks(cfg, n))


def _instantiate_all(cfg, tmp_path: Path) -> dict:
    """Every _target_ node of a composed config, instantiated; the strategy is given its objects as the recipe gives
    them, the Trainer its strategy."""
    from recipes.simulation import (build_availability, build_compressors, build_hierarchy, build_latency,
                                    build_local_solvers, build_mobility, build_participation,
                                    build_server_optimizers)

    cfg = cfg.copy()
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path), force_add=True)
    OmegaConf.update(cfg, "monitor_mode", "max")  # "auto" is resolved by the recipe before the callbacks are made
    built = {}
    for group in ("dataset", "model", "partition"):
        built[group] = _plain_instantiate(cfg[group], group, tmp_path)
    if cfg.logger.get("_target_"):
        built["logger"] = _plain_instantiate(cfg.logger, "logger", tmp_path)
    for name, node in cfg.callbacks.items():
        if node is not None:
            built[f"callbacks.{name}"] = _plain_instantiate(node, "callbacks", tmp_path)
    h = build_hierarchy(cfg)
    n = h.num_layers
    objects = dict(hierarchy=h, taus=list(cfg.hierarchy.taus), compressors=build_compressors(cfg, n),
                   server_optimizers=build_server_optimizers(cfg, n), participation=build_participation(cfg, n),
                   local_solvers=build_local_solvers(cfg, n), **_trust(cfg, h),
                   availability=build_availability(cfg), partition=built["partition"],
                   latency=build_latency(cfg, n, h), global_rounds=1)
    if "qmlhfl_ddp" not in str(cfg.strategy._target_).lower():
        objects["mobility"] = build_mobility(cfg, h)
    built["strategy"] = _plain_instantiate(cfg.strategy, "strategy", tmp_path, **objects)
    built["trainer"] = _plain_instantiate(cfg.trainer, "trainer", tmp_path, strategy=built["strategy"], logger=False,
                                          max_epochs=1)
    return built


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("group,option", [(g, o) for g in (*TARGET_GROUPS, "callbacks", "eval", "hierarchy",
                                                               "quantizer", "compressor", "local_solver",
                                                               "privacy", "robust", "attack")
                                          for o in _options(g)])
def test_every_preset_composes_and_instantiates(config, group, option, tmp_path):
    if group == "callbacks" and option != "default":
        overrides = [f"callbacks=[default,{option}]"] if option in ("early_stopping", "lr_plateau") else []
    else:
        overrides = [f"{group}={option}"]
    if group == "compressor" and option != "per_layer":
        overrides.append("hierarchy=three_layer")  # the N = 3 comparison presets
    if group == "strategy" and option == "qmlhfl_ddp":
        overrides.append("mobility=static")
    cfg = compose(config, overrides)
    built = _instantiate_all(cfg, tmp_path)
    assert type(built["trainer"]).__name__ == "Trainer"
    assert built["trainer"].strategy is built["strategy"]


@pytest.mark.parametrize("config,experiment", _experiments())
def test_every_experiment_and_its_sweep_points_compose_and_instantiate(config, experiment, tmp_path):
    cfg = compose(config, [f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    axes = [[f"{k}={v}" for v in _split_top_level(str(vals))] for k, vals in (params or {}).items()
            if k != "seed"]
    for point in itertools.product(*axes):
        c = compose(config, [f"+experiment={experiment}", *point])
        assert c.name == experiment
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the learning-rate condition the planning preset checks
            _instantiate_all(c, tmp_path)


def _split_top_level(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def test_the_trainer_node_holds_only_trainer_arguments():
    import inspect

    import lightning as L

    taken = set(inspect.signature(L.Trainer).parameters)
    for config in CONFIGS:
        cfg = compose(config, [])
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
        assert set(cfg.trainer) - {"_target_"} <= taken, set(cfg.trainer) - taken


@pytest.mark.parametrize("old,new,value", [
    ("trainer.rounds", "rounds", 7), ("trainer.deadline", "deadline", 9.5), ("trainer.monitor", "monitor", "val_loss"),
    ("trainer.monitor_mode", "monitor_mode", "min"), ("trainer.executor", "strategy.executor", "loop"),
    ("trainer.device_rng", "strategy.device_rng", "stream"), ("trainer.progress_bar", "trainer.enable_progress_bar",
                                                                False),
    ("trainer.checkpoint", "trainer.enable_checkpointing", False),
    ("trainer.val_every_n_rounds", "trainer.check_val_every_n_epoch", 3),
])
def test_a_renamed_key_still_works_with_a_warning(old, new, value):
    assert RENAMED[old] == new
    with pytest.warns(FutureWarning, match=f"{old}=.*use {new}"):
        cfg = compose("mnist", [f"{old}={value}"])
    assert OmegaConf.select(cfg, new) == value
    assert old.split(".", 1)[1] not in cfg.trainer
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(compose("mnist", [f"{new}={value}"]),
                                                                               resolve=True)


def test_renamed_strategy_and_callback_keys_select_the_new_nodes():
    with pytest.warns(FutureWarning):
        old = compose("mnist", ["trainer.strategy=qmlhfl_ddp", "trainer.devices=2", "trainer.ddp_checkpoint=sharded",
                                "trainer.early_stopping.patience=3", "trainer.lr_plateau.patience=1",
                                "trainer.lr_plateau.factor=0.25", "trainer.save_best=false"])
    new = compose("mnist", ["strategy=qmlhfl_ddp", "trainer.devices=2", "strategy.checkpoint=sharded",
                            "callbacks=[default,early_stopping,lr_plateau]", "callbacks.early_stopping.patience=3",
                            "callbacks.lr_plateau.patience=1", "callbacks.lr_plateau.factor=0.25",
                            "callbacks.best_checkpoint=null"])
    assert OmegaConf.to_container(old, resolve=True) == OmegaConf.to_container(new, resolve=True)
    assert list(old.callbacks) == list(new.callbacks)  # the same order: early stopping and plateau after the outputs
    with pytest.warns(FutureWarning):
        off = compose("mnist", ["trainer.early_stopping.patience=null"])
    assert "early_stopping" not in off.callbacks  # null patience: off, as before


def test_a_users_own_preset_with_old_keys_is_migrated(tmp_path):
    from recipes.config import migrate_config

    cfg = compose("mnist", [])
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.rounds = 4  # what a preset file written for the old keys adds
    cfg.trainer.progress_bar = False
    with pytest.warns(FutureWarning, match="trainer.rounds=4"):
        migrate_config(cfg)
    assert cfg.rounds == 4 and cfg.trainer.enable_progress_bar is False and "rounds" not in cfg.trainer


@pytest.mark.parametrize("overrides, expected", [
    ([], ["LocalSGD(drift=False)"] * 3),
    (["local_solver.drift=true"], ["LocalSGD(drift=True)"] * 3),
    (["local_solver=fedprox", "local_solver.mu=0.1"], ["FedProx(mu=0.1)", "LocalSGD(drift=False)",
                                                       "LocalSGD(drift=False)"]),
    (["local_solver=fedprox", "local_solver.at=all", "local_solver.mu=[0.1,0.01,0.0]"],
     ["FedProx(mu=0.1)", "FedProx(mu=0.01)", "FedProx(mu=0.0)"]),
    (["local_solver=scaffold", "local_solver.at=all", "local_solver.variates=full"], ["Scaffold(variates='full')"] * 3),
    (["local_solver=admm", "local_solver.layers=[admm,fedavg,admm]", "local_solver.rho=0.5"],
     ["ADMM(rho=0.5)", "LocalSGD(drift=False)", "ADMM(rho=0.5)"]),
])
def test_the_local_solver_group(overrides, expected):
    from recipes.simulation import build_local_solvers

    assert [repr(x) for x in build_local_solvers(compose("mnist", overrides), 3)] == expected


@pytest.mark.parametrize("overrides, match", [
    (["local_solver=fedprox", "local_solver.at=edges"], "local_solver.at='edges': must be 'all' or 'devices'"),
    (["local_solver=fedprox", "local_solver.mu=-1"], "local_solver.mu=-1: FedProx mu must be a finite number >= 0"),
    (["local_solver=admm", "local_solver.layers=[admm,feddyn,admm]"], "local_solver.layers\\[1\\] = 'feddyn' is not a local solver"),
])
def test_local_solver_mistakes_are_one_line(overrides, match):
    from recipes.simulation import build_local_solvers

    with pytest.raises(ValueError, match=match):
        build_local_solvers(compose("mnist", overrides), 3)
