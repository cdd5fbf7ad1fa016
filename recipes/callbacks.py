"""The recipes' Lightning callbacks: the per-round record of a run (validation, test curve, per-device evaluation,
the best-on-validation model) and the optional ReduceLROnPlateau schedule (:class:`LRPlateau`).

:class:`RunRecorder` is resumable: its records, the best model and the wall time so far travel in every checkpoint
(Lightning's callback state), so a resumed run continues its history instead of restarting it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from recipes.evaluation import device_summary, evaluate_loader, per_device_accuracy, personalised_accuracy
from recipes.options import int_option

__all__ = ["LRPlateau", "LocalEvaluator", "RunRecorder", "monitor_mode"]


def monitor_mode(monitor: str, mode: str | None = "auto") -> str:
    """``"max"`` or ``"min"`` for the monitored metric: ``mode`` if given, else ``max`` for names containing
    ``acc``, ``f1``, ``auc``, ``precision`` or ``recall`` and ``min`` otherwise (losses, errors)."""
    if mode in ("max", "min"):
        return mode
    if mode not in (None, "auto"):
        raise ValueError(f"trainer.monitor_mode must be auto, max or min, got {mode!r}")
    name = monitor.lower()
    return "max" if any(s in name for s in ("acc", "f1", "auc", "precision", "recall")) else "min"


class LocalEvaluator:
    """Per-device evaluation of a round (see :mod:`recipes.evaluation`).

    Args:
        holdout: the :class:`~recipes.evaluation.HoldoutPartitioner` given to the strategy (its ``holdout`` is
            filled when the strategy partitions the data).
        personalized: also evaluate every device's personalised model.
        steps: local steps of the personalisation (tau_1 by default in the recipes).
        seed: the run seed; round r's personalisation draws from ``seed * 1_000_003 + r``.
        batch_size: evaluation batch size.
    """

    def __init__(self, holdout: Any, personalized: bool, steps: int, seed: int, batch_size: int = 1000) -> None:
        self.holdout, self.personalized = holdout, bool(personalized)
        self.steps = int_option(steps, "eval.personal_steps", 1, allow_none=False)
        self.seed = int(seed)
        self.batch_size = int_option(batch_size, "eval.batch_size", 1, allow_none=False)

    def evaluate(self, strategy: Any, module: L.LightningModule, round_idx: int) -> dict[str, Any]:
        """``local_cloud_acc`` (per device, [D] list) and its :func:`device_summary` as ``local_cloud_acc_<stat>``;
        the same for ``local_personal_acc`` when personalised."""
        held = self.holdout.holdout
        if held is None:
            raise RuntimeError("the holdout partitioner has not been called: the strategy has not built its data")
        out: dict[str, Any] = {}
        cloud = per_device_accuracy(module, strategy.train_data, held, self.batch_size)
        out["local_cloud_acc"] = cloud.tolist()
        out.update({f"local_cloud_acc_{k}": v for k, v in device_summary(cloud).items()})
        if self.personalized:
            seed = (self.seed * 1_000_003 + int(round_idx)) % (2**62)
            pers = personalised_accuracy(strategy, module, held, self.steps, seed, self.batch_size)
            out["local_personal_acc"] = pers.tolist()
            out.update({f"local_personal_acc_{k}": v for k, v in device_summary(pers).items()})
        return out


class RunRecorder(Callback):
    """One record per global round: the strategy's record (``strategy.history``), the validation metrics (every
    logged metric whose name starts with ``val``), the cloud model's test accuracy/loss every ``test_every`` rounds
    (the curve, never used for selection), and the per-device evaluation every ``eval_every`` rounds; the last
    planned round is always evaluated. Keeps a copy of the cloud model that is best on ``monitor`` (the
    best-on-validation model) and logs the evaluations (``test_acc``, ``test_loss``, ``local/...``).

    Args:
        monitor: the validation metric that selects the best model (None: no selection).
        mode: ``"max"`` or ``"min"``.
        rounds: the planned number of global rounds.
        test_loader: the test set (None: no test curve).
        test_every: evaluate the test set every this many rounds (0: only at the end, by the recipe).
        local: a :class:`LocalEvaluator` (None: no per-device evaluation).
        eval_every: per-device evaluation every this many rounds.
        session_start: ``time.time()`` when this session started (wall time is summed over sessions).
    """

    def __init__(self, *, monitor: str | None, mode: str, rounds: int, test_loader: Any = None,
                 test_every: int = 1, local: LocalEvaluator | None = None, eval_every: int = 1,
                 session_start: float | None = None) -> None:
        self.monitor, self.mode, self.rounds = monitor, mode, int(rounds)
        self.test_loader = test_loader
        self.test_every = int_option(test_every, "eval.test_every", 0, allow_none=False)
        self.local = local
        self.eval_every = int_option(eval_every, "eval.every", 1, allow_none=False)
        self.session_start = time.time() if session_start is None else float(session_start)
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.wall_before = 0.0
        self.sessions: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self._val: dict[str, float] | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.resumed_from is not None:
            self.sessions.append({"resumed_from": self.resumed_from, "at_round": len(self.records)})

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        vals = {k: float(v) for k, v in metrics.items()
                if k.startswith("val") and isinstance(v, torch.Tensor) and v.numel() == 1}
        if self.monitor is not None and self.monitor not in metrics:
            raise ValueError(
                f"trainer.monitor={self.monitor!r} is not logged by the model's validation_step (validation metrics: "
                f"{sorted(vals) or 'none'}); set trainer.monitor to one of them, or trainer.monitor=null")
        self._val = vals

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        strategy = trainer.strategy
        history = getattr(strategy, "history", None)
        rec = dict(history[-1]) if history else {"round": trainer.current_epoch + 1}
        r = int(rec["round"])
        if self._val is not None:
            rec.update(self._val)
            self._val = None
        last = r >= self.rounds
        if not trainer.is_global_zero:  # one multi-process run: rank 0 evaluates (every rank holds the cloud model)
            self.records.append(rec)
            return
        if self.test_loader is not None and self.test_every and (r % self.test_every == 0 or last):
            t = evaluate_loader(module, self.test_loader)
            rec["test_acc"], rec["test_loss"] = t["acc"], t["loss"]
        if self.local is not None and (r % self.eval_every == 0 or last):
            rec.update(self.local.evaluate(strategy, module, r))
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


class LRPlateau(Callback):
    """``ReduceLROnPlateau`` on a validation metric for the module's one optimizer (the recipes'
    ``trainer.lr_plateau``): the LR is multiplied by ``factor`` after ``patience`` validations without improvement.

    The scheduler is stepped by this callback at the end of every round that validated, before that round's
    checkpoint is written, and its state travels in the checkpoint (this callback's state): a run resumed from any
    round boundary steps it exactly as the uninterrupted run did. (Given to Lightning as an epoch scheduler it would
    be stepped after the round's checkpoint, and that step would be lost on resume.) :meth:`attach` wraps the
    module instance's ``configure_optimizers`` to create the scheduler on the optimizer Lightning uses.
    """

    def __init__(self, monitor: str, mode: str, factor: float = 0.5, patience: int = 0, min_lr: float = 0.0) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"trainer.lr_plateau.factor must be in (0, 1), got {factor!r}")
        int_option(patience, "trainer.lr_plateau.patience", 0, allow_none=False)
        if not min_lr >= 0:
            raise ValueError(f"trainer.lr_plateau.min_lr must be >= 0, got {min_lr!r}")
        self.monitor, self.mode, self.factor, self.patience, self.min_lr = monitor, mode, factor, patience, min_lr
        self.scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._pending: dict[str, Any] | None = None
        self._value: float | None = None

    def attach(self, module: L.LightningModule) -> None:
        """Create the scheduler whenever ``module.configure_optimizers`` runs (raises ValueError there if it returns
        a scheduler already or several optimizers)."""
        original: Callable[[], Any] = module.configure_optimizers

        def configure_optimizers() -> Any:
            out = original()
            opt = None
            if isinstance(out, torch.optim.Optimizer):
                opt = out
            elif isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], torch.optim.Optimizer):
                opt = out[0]
            elif isinstance(out, dict) and "lr_scheduler" not in out and isinstance(out.get("optimizer"),
                                                                                    torch.optim.Optimizer):
                opt = out["optimizer"]
            if opt is None:
                raise ValueError(
                    f"trainer.lr_plateau adds a ReduceLROnPlateau to the model's one optimizer, but "
                    f"{type(module).__name__}.configure_optimizers returned {type(out).__name__} (with a scheduler, "
                    f"or several optimizers); schedule in configure_optimizers instead and set "
                    f"trainer.lr_plateau.patience=null")
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode=self.mode, factor=self.factor, patience=self.patience, min_lr=self.min_lr)
            if self._pending is not None:
                self.scheduler.load_state_dict(self._pending)
                self._pending = None
            return out

        module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

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
