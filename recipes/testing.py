"""The test set, as a Lightning callback (:class:`TestEvaluation`): the cloud model's test curve, and the final and
the best-on-validation model at the end.

How a module is tested depends on what it is (``eval.metrics``, decided before training):

- ``classifier``: the recipes' classifier metrics (:mod:`recipes.evaluation`: accuracy and cross-entropy), every
  ``eval.test_every`` rounds and at the last round (``test_acc`` / ``test_loss`` in ``history.json``), and the final
  and the best model at the end (``final_test_acc``, ``best_test_acc``);
- ``module``: the module's own ``test_step`` through Lightning (``trainer.test``) after training, on the final and
  the best model (``final_test_metrics``, ``best_test_metrics``; ``final_test_acc`` when it logs ``test_acc``);
- ``auto`` (the default): ``classifier`` for a module with ``per_sample_metrics`` (the built-in models), ``module``
  for one with a ``test_step``, else ``classifier`` if one test batch shows class ids and logits
  (:func:`recipes.evaluation.classifier_problem`), else no test evaluation (with a warning saying why).

``eval.test_every=0`` tests only at the end; ``eval.test_every=null`` turns every test evaluation off.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch

from recipes.evaluation import TestLoader, classifier_problem, evaluate_loader
from recipes.flavor import is_overridden
from recipes.options import ConfigError, check_choice
from recipes.recorder import RoundEvaluation, RunRecorder

__all__ = ["METRICS", "TestEvaluation"]

METRICS = ("auto", "classifier", "module")


def _test_every(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"eval.test_every must be an integer >= 0, got {value!r} (or null: no test evaluation)")
    return value


class TestEvaluation(RoundEvaluation):
    """The test set (see the module docstring).

    Args:
        every: the test curve every this many rounds (0: only the final and best models; None: no test evaluation).
        metrics: ``auto``, ``classifier`` or ``module``.

    Attributes (after fit; rank 0):
        mode: ``"classifier"``, ``"module"`` or None (no test evaluation).
        final, best: the final and the best-on-validation model's results (``{"acc", "loss", ...}`` for a classifier,
            the logged ``test_*`` metrics for a module), None where not evaluated.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, every: int | None = 1, metrics: str = "auto") -> None:
        self.every = _test_every(every)
        self.metrics = check_choice(metrics, "eval.metrics", METRICS)
        self.mode: str | None = None
        self.reason = ""
        self.loader: TestLoader | None = None
        self.final: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None
        self._testing: str | None = None

    # ------------------------------------------------------------------ how to test
    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        self.mode, self.reason = self._decide(module, dm)
        if self.mode is None and self.every is not None and self.reason:
            warnings.warn(f"no test evaluation: {self.reason}", UserWarning, stacklevel=2)
        self.loader = TestLoader(dm) if self.mode == "classifier" else None

    def _decide(self, module: L.LightningModule, dm: Any) -> tuple[str | None, str]:
        if self.every is None:
            return None, ""
        if dm is None or not is_overridden("test_dataloader", dm):
            return None, f"the datamodule {type(dm).__name__} has no test_dataloader"
        name = type(module).__name__
        has_test_step = is_overridden("test_step", module)
        if self.metrics == "module":
            if not has_test_step:
                raise ConfigError(f"eval.metrics=module tests with the module's own test_step, but {name} has none")
            return "module", ""
        if self.metrics == "classifier" or callable(getattr(module, "per_sample_metrics", None)):
            return "classifier", ""
        if has_test_step:
            return "module", ""
        with torch.random.fork_rng():  # the probe's data loading draws nothing from the run's random state
            batch = next(iter(TestLoader(dm)), None)
            problem = "the test set is empty" if batch is None else classifier_problem(module, batch)
        if problem is None:
            return "classifier", ""
        return None, (f"{name} has no test_step and is not a classifier the recipes' metrics understand ({problem}); "
                      f"give it a test_step (tested with trainer.test) or per_sample_metrics(batch)")

    # ------------------------------------------------------------------ the curve
    def evaluate_round(self, trainer: L.Trainer, module: L.LightningModule, round_idx: int, last: bool
                       ) -> dict[str, Any]:
        if self.mode != "classifier" or not self.every or not (round_idx % self.every == 0 or last):
            return {}
        t = evaluate_loader(module, self.loader)
        return {"test_acc": t["acc"], "test_loss": t["loss"]}

    # ------------------------------------------------------------------ the end
    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.mode != "classifier" or not trainer.is_global_zero:
            return
        self.final = evaluate_loader(module, self.loader)
        recorder = RunRecorder.of(trainer)
        recorder.attach_final({"test_acc": self.final["acc"], "test_loss": self.final["loss"]})
        if recorder.best is not None:
            final_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
            module.load_state_dict(recorder.best["state_dict"])
            self.best = evaluate_loader(module, self.loader)
            module.load_state_dict(final_state)

    def test_module(self, trainer: L.Trainer, module: L.LightningModule, datamodule: Any) -> None:
        """``trainer.test`` of the final model, then of the best-on-validation model (one process only), when the
        module is tested with its own ``test_step``; call after ``trainer.fit`` on every rank."""
        if self.mode != "module":
            return
        self._testing = "final"
        trainer.test(module, datamodule=datamodule, verbose=False)
        recorder = RunRecorder.of(trainer)
        if recorder.best is not None and trainer.world_size == 1:
            final_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
            module.load_state_dict(recorder.best["state_dict"])
            self._testing = "best"
            try:
                trainer.test(module, datamodule=datamodule, verbose=False)
            finally:
                module.load_state_dict(final_state)
        self._testing = None

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._testing is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1 and k.startswith("test")}
        if "test_acc" in metrics:
            metrics.setdefault("acc", metrics["test_acc"])
        if "test_loss" in metrics:
            metrics.setdefault("loss", metrics["test_loss"])
        setattr(self, self._testing, metrics)
        if self._testing == "final":
            RunRecorder.of(trainer).attach_final({k: v for k, v in metrics.items() if k.startswith("test")})

    @staticmethod
    def of(trainer: L.Trainer) -> "TestEvaluation | None":
        """The Trainer's test evaluation, if it has one."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, TestEvaluation)), None)
