"""The per-round record of a run (``history.json``), as a Lightning callback: :class:`RunRecorder` keeps one
record per global round (the strategy's record, the validation metrics, and what every :class:`RoundEvaluation`
callback adds: the test curve, the per-device evaluation) and the cloud model that is best on the monitored
validation metric.

:class:`RunRecorder` is resumable: its records, the best model and the wall time so far travel in every checkpoint
(Lightning's callback state), so a resumed run continues its history instead of restarting it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from recipes.config import key_name
from recipes.options import ConfigError, check_choice

__all__ = ["RoundEvaluation", "RunRecorder", "monitor_mode"]


def monitor_mode(monitor: str, mode: str | None = "auto") -> str:
    """``"max"`` or ``"min"`` for the monitored metric: ``mode`` if given, else ``max`` for names containing
    ``acc``, ``f1``, ``auc``, ``precision`` or ``recall`` and ``min`` otherwise (losses, errors)."""
    if mode not in ("auto", "max", "min", None):
        raise ConfigError(f"{key_name('monitor_mode')} must be auto, max or min, got {mode!r}")
    if mode in ("max", "min"):
        return mode
    name = monitor.lower()
    return "max" if any(s in name for s in ("acc", "f1", "auc", "precision", "recall")) else "min"


class RoundEvaluation(Callback):
    """A callback that adds entries to every round's record: :class:`RunRecorder` calls :meth:`evaluate_round` of
    every such callback of the Trainer, in the Trainer's callback order, at the end of every global round (on rank 0
    of a multi-process run), and logs the numbers it returns."""

    def evaluate_round(self, trainer: L.Trainer, module: L.LightningModule, round_idx: int, last: bool
                       ) -> dict[str, Any]:
        """Entries for round ``round_idx``'s record (``last``: the last planned round)."""
        return {}


class RunRecorder(Callback):
    """One record per global round: the strategy's record (``strategy.history``), the validation metrics (every
    logged metric whose name starts with ``val``) and the entries of the :class:`RoundEvaluation` callbacks. Keeps a
    copy of the cloud model that is best on ``monitor`` (the best-on-validation model) and logs the evaluations
    (``test_acc``, ``test_loss``, ``local/...``).

    Args:
        monitor: the validation metric that selects the best model (None: no selection).
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, monitor: str | None = None, mode: str = "max") -> None:
        self.monitor = None if monitor is None else str(monitor)
        self.mode = check_choice(mode, key_name("monitor_mode"), ("max", "min"))
        self.rounds = 0
        self.session_start = time.time()
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.wall_before = 0.0
        self.sessions: list[dict[str, Any]] = []
        self._val: dict[str, float] | None = None

    @staticmethod
    def of(trainer: L.Trainer) -> "RunRecorder":
        """The Trainer's recorder."""
        for cb in trainer.callbacks:
            if isinstance(cb, RunRecorder):
                return cb
        raise LookupError("the Trainer has no RunRecorder callback (callbacks.recorder)")

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.rounds = int(trainer.max_epochs or 0)
        if trainer.ckpt_path is not None:
            self.sessions.append({"resumed_from": str(trainer.ckpt_path), "at_round": len(self.records)})

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        vals = {k: float(v) for k, v in metrics.items()
                if k.startswith("val") and isinstance(v, torch.Tensor) and v.numel() == 1}
        if self.monitor is not None and self.monitor not in metrics:
            name = key_name("monitor")
            raise ConfigError(
                f"{name}={self.monitor!r} is not logged by the model's validation_step (validation metrics: "
                f"{sorted(vals) or 'none'}); set {name} to one of them, or {name}=null")
        self._val = vals

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        history = getattr(trainer.strategy, "history", None)
        rec = dict(history[-1]) if history else {"round": trainer.current_epoch + 1}
        r = int(rec["round"])
        if self._val is not None:
            rec.update(self._val)
            self._val = None
        if not trainer.is_global_zero:  # one multi-process run: rank 0 evaluates (every rank holds the cloud model)
            self.records.append(rec)
            return
        for cb in trainer.callbacks:
            if isinstance(cb, RoundEvaluation):
                rec.update(cb.evaluate_round(trainer, module, r, r >= self.rounds))
        self.records.append(rec)
        if self.monitor is not None and self.monitor in rec:
            self._consider_best(rec, module)
        for k, v in rec.items():
            if k in ("test_acc", "test_loss") or (k.startswith("local_") and not isinstance(v, list)):
                name = k if k.startswith("test") else "local/" + k[len("local_"):]
                module.log(name, float(v), on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True)

    def _consider_best(self, rec: dict[str, Any], module: L.LightningModule) -> None:
        v = float(rec[self.monitor])
        if math.isnan(v):
            return
        if self.best is not None:
            b = self.best["value"]
            if not (v > b if self.mode == "max" else v < b):
                return
        self.best = {"round": int(rec["round"]), "value": v,
                     "state_dict": {k: t.detach().to("cpu", copy=True) for k, t in module.state_dict().items()}}

    # ------------------------------------------------------------------ results
    def wall_time(self) -> float:
        """Wall seconds of all sessions (each up to its last checkpoint, this one up to now)."""
        return self.wall_before + (time.time() - self.session_start)

    def attach_final(self, key_values: dict[str, Any]) -> None:
        """Merge final evaluations (of the final model) into the last record when it lacks them."""
        if self.records:
            for k, v in key_values.items():
                self.records[-1].setdefault(k, v)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "best": self.best, "wall": self.wall_time(),
                "sessions": list(self.sessions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.best = state_dict.get("best")
        self.wall_before = float(state_dict.get("wall", 0.0))
        self.sessions = list(state_dict.get("sessions", []))
