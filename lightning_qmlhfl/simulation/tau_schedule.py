"""The engine's side of an adaptive tau (:mod:`lightning_qmlhfl.theory.schedules`): the current tau, checkpointed;
the round's training loss; the rule applied at the end of every ``every``-th global round, so that the next round
runs with the new period (the engine's :meth:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine.set_taus`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..theory.schedules import Eq15Tau, LossRatioTau, TauSchedule, eq15_tau, loss_ratio_tau

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["TauScheduler"]


class TauScheduler:
    """Holds the schedule's state: ``taus`` (int64 [N], the current tau) and ``start`` (float64: F_0, mu_0 of the
    loss-ratio rule, NaN until the first round ends); the loss of the running round is summed per step."""

    def __init__(self, rule: TauSchedule, taus: tuple[int, ...]) -> None:
        self.rule = rule
        self.taus = torch.tensor(taus, dtype=torch.int64)
        self.initial = tuple(taus)
        self.start = torch.full((2,), math.nan, dtype=torch.float64)
        self._loss: Tensor | float = 0.0
        self._steps = 0

    def bind(self, sim: "QMLHFLEngine") -> None:
        def load(state: dict[str, Tensor]) -> None:
            self.taus.copy_(state["taus"])
            self.start.copy_(state["start"])
            sim.set_taus(tuple(int(t) for t in self.taus))

        sim.registry.register("tau_schedule", lambda: {"taus": self.taus, "start": self.start}, load, sharded=False)

    def on_step(self, losses: Tensor) -> None:
        if losses.numel():  # summed on the losses' device: no host sync in the per-step loop (read at round end)
            mean = losses.detach().float().mean()
            self._loss = mean if self._steps == 0 else self._loss + mean
            self._steps += 1

    def on_round_end(self, sim: "QMLHFLEngine") -> dict[str, float]:
        """Called when a global round completes (``sim.round`` already counts it); returns what it decided:
        ``tau_next_layer{n}`` and, when the rule ran, ``tau_wanted_layer{n}`` (before the bounds)."""
        loss = float(self._loss) / self._steps if self._steps else math.nan
        self._loss, self._steps = 0.0, 0
        lr = sim.optimizer.lr
        if math.isnan(float(self.start[0])):
            self.start[0], self.start[1] = loss, lr
        n = self.rule.layer
        decided = self._decide(sim, n, loss, lr)
        if decided is not None:
            self.wanted = decided
            tau = min(max(decided, self.rule.tau_min), self.rule.tau_max)
            if tau != int(self.taus[n - 1]):
                self.taus[n - 1] = tau
                sim.set_taus(tuple(int(t) for t in self.taus))
        out: dict[str, float] = {f"tau_next_layer{n}": int(self.taus[n - 1])}
        if decided is not None:
            out[f"tau_wanted_layer{n}"] = decided
        return out

    def _decide(self, sim: "QMLHFLEngine", n: int, loss: float, lr: float) -> int | None:
        """The rule's tau_n (None: no decision this round)."""
        if sim.round % self.rule.every != 0:
            return None
        if isinstance(self.rule, LossRatioTau):
            if not (loss > 0 and math.isfinite(loss)) or not float(self.start[0]) > 0:
                return None
            return loss_ratio_tau(self.initial[n - 1], float(self.start[0]), loss, float(self.start[1]), lr)
        elif isinstance(self.rule, Eq15Tau):
            probe = sim.probe
            L = None if probe is None else probe.stats.get("theory/L_max")
            if L is None or not math.isfinite(L) or L <= 0:
                return None
            return eq15_tau(list(self.taus.tolist()), n, L, lr, probe.qs(sim), sim.hierarchy, self.rule.safety,
                              self.rule.tau_max)
        else:  # pragma: no cover - the family has two rules
            raise TypeError(f"unknown tau schedule {self.rule!r}")

    def max_steps_per_round(self) -> int:
        """The longest round the rule allows (its layer at ``tau_max``, or longer if it is there now)."""
        t = self.taus.tolist()
        n = self.rule.layer
        t[n - 1] = max(t[n - 1], self.rule.tau_max)
        return math.prod(t)

    def round_stats(self) -> dict[str, float]:
        """The tau the round ran with."""
        return {f"tau_layer{n}": int(t) for n, t in enumerate(self.taus.tolist(), start=1)}
