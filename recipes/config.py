"""Composing a recipe's config, and the keys that were renamed when the recipes took the shape of Lightning's
Trainer, strategy, callbacks and loggers as ``_target_`` nodes.

A renamed key keeps working, with a ``FutureWarning`` naming its new place: on the command line and in
:func:`compose` (:func:`rewrite_overrides` lets Hydra add the old key, :func:`migrate_config` then moves it), and in
a user's own preset files (:func:`migrate_config` after composition). Errors about a moved value name the key as
the user wrote it (:func:`key_name`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from recipes.options import ConfigError, check_choice, check_number, int_option

__all__ = ["CONF_DIR", "RENAMED", "compose", "key_name", "migrate_config", "rewrite_overrides"]

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The recipes' Hydra config directory (package data of ``recipes``)."""

RENAMED: dict[str, str] = {
    "trainer.rounds": "rounds",
    "trainer.deadline": "deadline",
    "trainer.monitor": "monitor",
    "trainer.monitor_mode": "monitor_mode",
    "trainer.executor": "strategy.executor",
    "trainer.weighting": "strategy.weighting",
    "trainer.backend": "strategy.backend",
    "trainer.smoothness": "strategy.smoothness",
    "trainer.device_rng": "strategy.device_rng",
    "trainer.ddp_checkpoint": "strategy.checkpoint",
    "trainer.val_every_n_rounds": "trainer.check_val_every_n_epoch",
    "trainer.progress_bar": "trainer.enable_progress_bar",
    "trainer.checkpoint": "trainer.enable_checkpointing",
    "trainer.early_stopping.patience": "callbacks.early_stopping.patience",
    "trainer.early_stopping.min_delta": "callbacks.early_stopping.min_delta",
    "trainer.lr_plateau.patience": "callbacks.lr_plateau.patience",
    "trainer.lr_plateau.factor": "callbacks.lr_plateau.factor",
    "trainer.lr_plateau.min_lr": "callbacks.lr_plateau.min_lr",
}
"""Old key -> new key. Besides these: ``trainer.strategy=NAME`` selects ``strategy=NAME`` (a config group), and
``trainer.save_best=false`` removes ``callbacks.best_checkpoint``."""

_SPECIAL = ("trainer.strategy", "trainer.save_best")
_OPTIONAL_CALLBACKS = {"trainer.early_stopping": "early_stopping", "trainer.lr_plateau": "lr_plateau"}
_OLD_KEYS = (*RENAMED, *_SPECIAL, *_OPTIONAL_CALLBACKS)

_spelling: dict[str, str] = {}
_migrated: int | None = None  # id() of the config the spelling belongs to


def key_name(key: str) -> str:
    """``key`` as the user wrote it in the current run: its old name when :func:`migrate_config` moved it there."""
    return _spelling.get(key, key)


def _is_old(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in _OLD_KEYS)


def rewrite_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides with every renamed key ``K=V`` written ``++K=V``, so that Hydra adds it to the config
    (where :func:`migrate_config` finds and moves it) instead of refusing a key the config no longer has.
    ``~K`` of a renamed key is dropped. Other overrides (and options such as ``-m``) are kept as they are."""
    out = []
    for o in overrides:
        if o.startswith("-") or "=" not in o and not o.startswith("~"):
            out.append(o)
            continue
        key = o.lstrip("+~").split("=", 1)[0]
        if not _is_old(key):
            out.append(o)
        elif o.startswith("~"):
            warnings.warn(f"{o}: {key} is no longer a key of the recipes; ignored", FutureWarning, stacklevel=2)
        else:
            out.append("++" + o.lstrip("+"))
    return out


def _preset(group: str, option: str) -> DictConfig:
    path = CONF_DIR / group / f"{option}.yaml"
    node = OmegaConf.load(path)
    assert isinstance(node, DictConfig)
    return node


def _warn(old: str, value: Any, new: str) -> None:
    warnings.warn(f"{old}={value!r}: this key has moved, use {new} (the old name works for now)", FutureWarning,
                  stacklevel=3)


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _switch_strategy(cfg: DictConfig, value: Any) -> None:
    """``trainer.strategy=NAME``: the ``strategy`` node becomes the preset NAME; options the user had changed from
    the current preset's defaults are kept."""
    name = check_choice(value, "trainer.strategy", ("qmlhfl", "qmlhfl_ddp"))
    new = _preset("strategy", name)
    current = cfg.get("strategy")
    if current is not None and current.get("_target_") != new.get("_target_"):
        presets = [OmegaConf.to_container(_preset("strategy", o), resolve=False) for o in ("qmlhfl", "qmlhfl_ddp")]
        defaults = next((p for p in presets if p.get("_target_") == current.get("_target_")), None)
        raw = OmegaConf.to_container(current, resolve=False)  # interpolations (seed: ${seed}) kept as they are
        for k, v in raw.items():
            if k in new and k != "_target_" and (defaults is None or v != defaults.get(k)):
                new[k] = v
        cfg.strategy = new
    elif current is None:
        cfg.strategy = new
    _spelling["strategy"] = "trainer.strategy"


def _enable_callback(cfg: DictConfig, old: str, name: str, node: Any) -> None:
    """``trainer.early_stopping.*`` / ``trainer.lr_plateau.*``: with a patience, the callback ``callbacks.NAME``
    (from ``callbacks/NAME.yaml``) with these values; null patience: off, as before."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{old} must be a node (patience, ...), got {values!r}")
    unknown = sorted(set(values) - {k.rsplit(".", 1)[1] for k in RENAMED if k.startswith(old + ".")})
    if unknown:
        raise ConfigError(f"{old} has no key {unknown[0]!r}; use callbacks.{name}.{unknown[0]} with "
                          f"callbacks=[default,{name}]")
    patience = int_option(values.get("patience"), f"{old}.patience", 0)
    if "factor" in values:
        check_number(values["factor"], f"{old}.factor", minimum=0, exclusive=True)
        if not values["factor"] < 1:
            raise ConfigError(f"{old}.factor must be in (0, 1), got {values['factor']!r}")
    for k in ("min_delta", "min_lr"):
        if k in values:
            check_number(values[k], f"{old}.{k}", minimum=0)
    for k, v in values.items():
        _warn(f"{old}.{k}", v, f"callbacks.{name}.{k} with callbacks=[default,{name}]")
    if patience is None:
        return
    cbs = cfg.get("callbacks")
    if cbs is None:
        cfg.callbacks = {}
        cbs = cfg.callbacks
    if cbs.get(name) is None:
        cbs[name] = _preset("callbacks", name)[name]
    for k, v in values.items():
        cbs[name][k] = v
        _spelling[f"callbacks.{name}.{k}"] = f"{old}.{k}"


def migrate_config(cfg: DictConfig) -> DictConfig:
    """Move every renamed key found in ``cfg`` (in place) to its new place, with a ``FutureWarning`` each; returns
    ``cfg``. A config without renamed keys is returned unchanged."""
    global _migrated
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig) or not any(_is_old(f"trainer.{k}") for k in trainer):
        if id(cfg) != _migrated:  # a config of its own: its keys are spelled as they are
            _spelling.clear()
        return cfg
    _spelling.clear()
    _migrated = id(cfg)
    with open_dict(cfg):
        if "strategy" in trainer and not isinstance(trainer.get("strategy"), DictConfig):
            value = trainer.strategy
            _warn("trainer.strategy", value, f"strategy={value}")
            _switch_strategy(cfg, value)
            del trainer["strategy"]
        for old, name in _OPTIONAL_CALLBACKS.items():
            short = old.split(".", 1)[1]
            if short in trainer:
                _enable_callback(cfg, old, name, trainer[short])
                del trainer[short]
        if "save_best" in trainer:
            keep = trainer.save_best
            _warn("trainer.save_best", keep, "callbacks.best_checkpoint=null to turn best.ckpt off")
            if keep is False and cfg.get("callbacks") is not None and "best_checkpoint" in cfg.callbacks:
                cfg.callbacks.best_checkpoint = None
            del trainer["save_best"]
        for old, new in RENAMED.items():
            short = old.split(".", 1)[1]
            if "." in short or short not in trainer:
                continue
            value = OmegaConf.to_container(trainer, resolve=False)[short]  # an interpolation stays one
            _warn(old, trainer.get(short), new)
            OmegaConf.update(cfg, new, value, force_add=True)
            _spelling[new] = old
            del trainer[short]
    return cfg


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Hydra's ``compose`` of ``recipes/conf/<config_name>.yaml`` with ``overrides`` (renamed keys accepted, with a
    warning), then :func:`migrate_config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=rewrite_overrides(overrides),
                            return_hydra_config=return_hydra_config)
    return migrate_config(cfg)
