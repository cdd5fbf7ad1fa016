"""What a completed global round reports (:meth:`RoundStatistics.round_stats`): the clock's split of the round time,
uploads and drops per layer, energy, moves, what the stages count, the local solvers' drift, epsilon, the measured
constants and the current tau. A mixin of :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`, kept apart so
that the engine's module holds the schedule and the steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

__all__ = ["RoundStatistics"]

if TYPE_CHECKING:
    from .engine import QMLHFLEngine


class RoundStatistics:
    """The engine's per-round statistics (module docstring)."""

    def round_stats(self: "QMLHFLEngine") -> dict[str, float]:
        """The current (or just completed) round: uploads and lost uploads per layer, the clock's split of the
        round time (computation, each layer's links), the simulated time, energy (with an energy model), what stages
        count (moves and edge failures with mobility, clipped uploads with clipping, the measured compression
        errors), the local solvers' drift, epsilon, the measured constants (``theory/*``) and the round's tau."""
        pop, clock = self.population, self.clock
        out: dict[str, float] = {"sim_time": clock.now, "round_time": clock.last_round_time,
                                 "time_compute": float(clock.last_split[0])}
        for n in range(1, self.N + 1):
            out[f"time_layer{n}"] = float(clock.last_split[n])
            out[f"participants_layer{n}"] = pop.uploads[n - 1]
            out[f"drops_layer{n}"] = pop.dropped[n - 1]
        if clock.energy_model is not None:  # joules (docs/algorithm.md#energy): total so far, the last round's
            out["energy"], out["round_energy"] = clock.energy, clock.last_round_energy
        ct = self.change_tree
        out["moves"], out["edge_failures"] = (0, 0) if ct is None else (ct.moves, ct.failures)
        if self.N > 1:
            counts = self.tree.device_counts(1)
            out["edge_devices_min"], out["edge_devices_max"] = int(counts.min()), int(counts.max())
        stages = [stage for layer in self.layers for stage in layer.stages]
        for stage, sums in zip(stages, self._stage_sums(stages)):
            out.update(stage.round_stats(sums))
        out.update(self.privacy_stats())
        if self.probe is not None:
            out.update(self.probe.round_stats())
        if self.tau_schedule is not None:
            out.update(self.tau_schedule.round_stats())
        return out

    def _stage_sums(self: "QMLHFLEngine", stages: list) -> list[dict[str, float]]:
        """Each stage's :attr:`~lightning_qmlhfl.simulation.stages.Stage.summed` counters, added over the ranks
        where the stage's senders are split between them (layers 1..cut + 1 of a multi-process run: one all-reduce
        for all of them, on every rank alike); above the cut every rank counts the same senders."""
        sums = [{k: getattr(s, k) for k in s.summed} for s in stages]
        if self.shard is None:
            return sums
        split = [(i, k) for i, s in enumerate(stages) if s.layer - 1 <= self.shard.cut for k in s.summed]
        if split:
            total = self.comm.all_reduce_sum(torch.tensor([float(sums[i][k]) for i, k in split], dtype=torch.float64))
            for (i, k), v in zip(split, total.tolist()):
                sums[i][k] = type(sums[i][k])(v)  # an integer count stays an integer
        return sums

    def privacy_stats(self: "QMLHFLEngine") -> dict[str, float]:
        """epsilon after the completed rounds (:class:`~lightning_qmlhfl.simulation.layers.PrivacyLedger`; empty
        without differential privacy)."""
        return {} if self.privacy is None else self.privacy.stats(self.round)
