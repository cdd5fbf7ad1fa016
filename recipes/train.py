"""One recipe run: the config's ``_target_`` nodes instantiated and handed to Lightning, as in
lightning-hydra-template's ``train.py``.

The datamodule (``dataset`` or ``datamodule``), the model, the strategy with the simulation's objects
(:mod:`recipes.simulation`), the callbacks (``callbacks``: the per-round record, the test set, the per-device
evaluation, checkpoints, the outputs; early stopping and the LR plateau when chosen; ``trainer.callbacks``: yours),
the logger and the Trainer. The FL outputs are written by the callbacks into the run directory
(:mod:`recipes.outputs`); a resumed run continues in its checkpoint's directory (:mod:`recipes.rundir`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

warnings.filterwarnings("ignore", message=".*LeafSpec.*")

import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from recipes.components import build_callbacks, build_datamodule, build_model, instantiate_node, model_label  # noqa
from recipes.config import key_name, migrate_config  # noqa: E402
from recipes.flavor import package_of_target, use_package  # noqa: E402
from recipes.loggers import finish_loggers, make_logger  # noqa: E402
from recipes.monitor import choose_monitor, validation_metrics  # noqa: E402
from recipes.options import ConfigError, int_option  # noqa: E402
from recipes.outputs import RunOutputs, format_summary  # noqa: E402
from recipes.resume import continue_logger  # noqa: E402
from recipes.rundir import RunDirectory  # noqa: E402
from recipes.simulation import build_simulation  # noqa: E402
from recipes.testing import TestEvaluation  # noqa: E402

__all__ = ["complete", "labels", "run"]


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None, overrides: Sequence[str] | None = None,
        sweep: str | None = None) -> dict[str, Any]:
    """Train one configuration; the callbacks write summary.json, history.json, the plots and checkpoints into the
    run directory (``run_dir``, default: the working directory; with ``ckpt_path`` the checkpoint's directory).
    ``overrides`` (the command line's) name the W&B run; ``sweep`` (the Hydra multirun) groups W&B runs. Returns
    the summary (empty on the other ranks of a multi-process run)."""
    cfg = migrate_config(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    package = package_of_target(cfg.model.get("_target_"))  # pytorch_lightning for its modules (recipes.flavor)
    with RunDirectory(cfg, run_dir, config) as rd, use_package(package):
        torch.manual_seed(int_option(cfg.seed, "seed", 0, allow_none=False))
        if os.environ.get("QMLHFL_THREADS"):
            torch.set_num_threads(int_option(_int_or_text(os.environ["QMLHFL_THREADS"]), "$QMLHFL_THREADS", 1,
                                             allow_none=False))
        datamodule, model = build_datamodule(cfg), build_model(cfg)
        sim = build_simulation(cfg, model, datamodule, sweep)
        cfg = complete(cfg, rd.path, model, datamodule)
        callbacks = build_callbacks(cfg)
        outputs = RunOutputs.of(callbacks)
        if outputs is not None:
            outputs.context = {"config": config, "participation": sim.participation, "mobility": sim.mobility,
                               "labels": labels(cfg)}
        logger = make_logger(cfg, rd.path, rd.checkpoint is not None, overrides, sweep)
        trainer = instantiate_node(cfg.trainer, "trainer", strategy=sim.strategy, callbacks=callbacks, logger=logger,
                                   max_epochs=sim.rounds, log_every_n_steps=max(1, math.prod(sim.strategy.taus)))
        continue_logger(logger, rd.checkpoint)
        trainer.fit(model, datamodule=datamodule, ckpt_path=None if rd.checkpoint is None else str(rd.checkpoint))
        testing = TestEvaluation.of(trainer)
        if testing is not None:
            testing.test_module(trainer, model, datamodule)
        finish_loggers(trainer)
        if not trainer.is_global_zero or outputs is None or outputs.summary is None:
            return {}  # the other ranks of a multi-process run (rank 0 evaluates and writes), or no outputs
        print(format_summary(outputs.summary))
        return outputs.summary


def complete(cfg: DictConfig, run_dir: Path, model: Any, datamodule: Any) -> DictConfig:
    """A copy of ``cfg`` with the values the nodes interpolate that only the run knows: the run directory
    (``paths.output_dir``), and the monitored metric checked against what the module logs, with its mode."""
    logged = validation_metrics(model, datamodule)
    monitor, mode = choose_monitor(cfg.get("monitor"), cfg.get("monitor_mode", "auto"), logged,
                                   has_validation=logged is None or bool(logged))
    cbs = cfg.get("callbacks") or {}
    needs = [f"callbacks.{k}" for k in ("early_stopping", "lr_plateau") if cbs.get(k) is not None]
    if needs and monitor is None:
        raise ConfigError(f"{' / '.join(needs)} need a validation metric: set monitor (e.g. val_acc) and give the "
                          f"datamodule a val_dataloader and the model a validation_step")
    if monitor and getattr(datamodule, "validation_is_test", False):
        warnings.warn(f"dataset.val_fraction=0: there is no validation split, so monitor={monitor} selects the best "
                      f"model on the TEST set (the recipes before the validation split); dataset.val_fraction=0.1 "
                      f"holds out a validation split", UserWarning, stacklevel=2)
    int_option(cfg.trainer.get("check_val_every_n_epoch", 1), key_name("trainer.check_val_every_n_epoch"), 1,
               allow_none=False)
    out = cfg.copy()
    with open_dict(out):
        OmegaConf.update(out, "paths.output_dir", str(run_dir), force_add=True)
        out.monitor, out.monitor_mode = monitor, mode
        if not out.trainer.get("enable_checkpointing", True):  # checkpoints off: no checkpoint callbacks either
            for k, v in list((out.get("callbacks") or {}).items()):
                if v is not None and str(v.get("_target_", "")).endswith("ModelCheckpoint"):
                    out.callbacks[k] = None
    return out


def _int_or_text(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def labels(cfg: DictConfig) -> dict[str, str]:
    """The dataset's and the model's names in the summary."""
    dm = cfg.get("datamodule") or {}
    return {"dataset": str(dm["_target_"]) if dm.get("_target_") else str(cfg.dataset.name),
            "model": model_label(cfg)}

