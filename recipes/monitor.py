"""The monitored validation metric (``monitor``: model selection, ``best.ckpt``, early stopping, LR plateau),
checked before training against what the module logs.

:func:`validation_metrics` runs the module's ``validation_step`` on one batch, on a copy of the module with a
throwaway Trainer and the random state restored afterwards, so the run itself is untouched; :func:`choose_monitor`
then keeps ``monitor`` if the module logs it, falls back from the default ``val_acc`` to a metric it does log
(``val_loss``, or its only validation metric), and otherwise stops with an error listing what it logs.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

from recipes.config import key_name
from recipes.flavor import counterpart, is_overridden
from recipes.options import ConfigError
from recipes.recorder import monitor_mode

__all__ = ["DEFAULT_MONITOR", "choose_monitor", "validation_metrics"]

DEFAULT_MONITOR = "val_acc"


def validation_metrics(module: Any, datamodule: Any) -> list[str] | None:
    """The names the module logs in one validation batch ([] when it validates nothing; None when that could not
    be found out: the probe failed, its error is left to the run)."""
    import lightning as L
    from lightning.pytorch.utilities.seed import isolate_rng

    if datamodule is None or not is_overridden("val_dataloader", datamodule) or not is_overridden(
            "validation_step", module):
        return []
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with isolate_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = counterpart(L.Trainer)(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                              num_sanity_val_steps=0)
            probe.validate(copy.deepcopy(module), datamodule=datamodule, verbose=False)
            return sorted(probe.callback_metrics)
    except Exception:  # noqa: BLE001 - the real validation will raise it where it belongs
        return None
    finally:
        quiet.setLevel(level)


def choose_monitor(monitor: Any, mode: Any, logged: list[str] | None, has_validation: bool) -> tuple[str | None, str]:
    """(monitor, "max" | "min") for the run; ``logged``: :func:`validation_metrics`."""
    name = key_name("monitor")
    if monitor is not None and not isinstance(monitor, str):
        raise ConfigError(f"{name} must be the name of a logged validation metric or null, got {monitor!r}")
    if monitor is None or not has_validation:
        monitor_mode("x", mode)  # the value is checked either way
        return None, "max"
    if logged is not None and monitor not in logged:
        vals = [k for k in logged if k.startswith("val")] or logged
        if monitor == DEFAULT_MONITOR and ("val_loss" in logged or len(vals) == 1):
            chosen = "val_loss" if "val_loss" in logged else vals[0]
            warnings.warn(f"the model logs no {DEFAULT_MONITOR}: {name}={chosen} selects the best model (set {name} "
                          f"to another of {logged}, or {name}=null)", UserWarning, stacklevel=2)
            monitor = chosen
        else:
            raise ConfigError(
                f"{name}={monitor!r} is not logged by the model's validation_step (validation metrics: "
                f"{sorted(vals) or 'none'}); set {name} to one of them, or {name}=null")
    return monitor, monitor_mode(monitor, mode)
