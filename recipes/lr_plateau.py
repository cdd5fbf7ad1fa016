"""``ReduceLROnPlateau`` on a validation metric, as a callback (``callbacks=[default,lr_plateau]``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from recipes.config import key_name
from recipes.options import ConfigError, check_choice, check_number, int_option

__all__ = ["LRPlateau"]


class LRPlateau(Callback):
    """``ReduceLROnPlateau`` for the module's one optimizer: the LR is multiplied by ``factor`` after ``patience``
    validations without improvement of ``monitor``.

    The scheduler is made at the start of fit on the optimizer Lightning set up (``trainer.optimizers``), stepped by
    this callback at the end of every round that validated, before that round's checkpoint is written, and its state
    travels in the checkpoint (this callback's state): a run resumed from any round boundary steps it exactly as the
    uninterrupted run did. (Given to Lightning as an epoch scheduler it would be stepped after the round's
    checkpoint, and that step would be lost on resume.)
    """

    def __init__(self, monitor: str | None, mode: str = "max", factor: float = 0.5, patience: int = 2,
                 min_lr: float = 0.0) -> None:
        self.factor = check_number(factor, key_name("callbacks.lr_plateau.factor"), minimum=0, exclusive=True)
        if not self.factor < 1:
            raise ConfigError(f"{key_name('callbacks.lr_plateau.factor')} must be in (0, 1), got {factor!r}")
        self.patience = int_option(patience, key_name("callbacks.lr_plateau.patience"), 0, allow_none=False)
        self.min_lr = check_number(min_lr, key_name("callbacks.lr_plateau.min_lr"), minimum=0)
        self.monitor = monitor
        self.mode = check_choice(mode, key_name("monitor_mode"), ("max", "min"))
        self.scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._pending: dict[str, Any] | None = None
        self._value: float | None = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if len(trainer.optimizers) != 1 or trainer.lr_scheduler_configs:
            raise ConfigError(
                f"callbacks.lr_plateau adds a ReduceLROnPlateau to the model's one optimizer, but "
                f"{type(module).__name__}.configure_optimizers gave {len(trainer.optimizers)} optimizer(s) and "
                f"{len(trainer.lr_scheduler_configs)} scheduler(s); schedule in configure_optimizers instead and "
                f"drop lr_plateau from callbacks")
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            trainer.optimizers[0], mode=self.mode, factor=self.factor, patience=self.patience, min_lr=self.min_lr)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor in trainer.callback_metrics:
            self._value = float(trainer.callback_metrics[self.monitor])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._value is not None and self.scheduler is not None:
            self.scheduler.step(self._value)
        self._value = None

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else self._pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = state_dict.get("scheduler")
        if sd is None:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd)
        else:
            self._pending = sd
