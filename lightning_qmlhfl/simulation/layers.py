"""An aggregation layer: the chain of stages (:mod:`.stages`) that one aggregation at layer n runs, built from
the layer's :class:`~lightning_qmlhfl.config.LayerConfig`, and the observers that follow every aggregation.

Observers watch events without changing the aggregation: :class:`BitCounter` counts the bits of every upload
(:meth:`~lightning_qmlhfl.config.LayerConfig.upload_bits`, through the one function the engine, the latency model and the planner
count with) against the 32-bit baseline; the simulated clock advances with the population inside
:class:`~lightning_qmlhfl.simulation.stages.SelectUploads`; the non-finite guard is
:class:`~lightning_qmlhfl.simulation.guard.NonFiniteGuard`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .stages import (AggregationContext, AverageBuffers, ChangeTree, CheckBuffers, ClipUpdates, CompressAndSum,
                     MeasureCompression, Resync, SelectUploads, ServerStep, Stage)
from .trust_stages import (AddAggregate, AttackUploads, CentralNoise, CompressUploads, ReceiverClip, SenderNoise,
                           SumMessages)

if TYPE_CHECKING:
    from ..config import LayerConfig, SimulationConfig
    from ..theory.measured import MeasureConstants
    from .solver_stages import LocalSolvers
    from .engine import QMLHFLEngine

__all__ = ["AggregationLayer", "build_layer", "BitCounter", "PrivacyLedger"]


class AggregationLayer:
    """The stages of layer n, run in order at every aggregation of the layer."""

    def __init__(self, layer: int, stages: list[Stage]) -> None:
        self.layer = layer
        self.stages = list(stages)

    def bind(self, sim: "QMLHFLEngine") -> None:
        for stage in self.stages:
            stage.bind(sim, self.layer)

    def aggregate(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        for stage in self.stages:
            ctx = stage.apply(sim, ctx)
        return ctx

    def stage(self, kind: type) -> Any:
        """This layer's stage of type ``kind``, or None."""
        return next((s for s in self.stages if isinstance(s, kind)), None)

    def __repr__(self) -> str:
        return f"AggregationLayer({self.layer}: {' -> '.join(map(repr, self.stages))})"


def build_layer(layer: int, config: "LayerConfig", has_buffers: bool, change_tree: ChangeTree | None,
                compression_warning: float | None = None, solvers: "LocalSolvers | None" = None,
                theory: "MeasureConstants | None" = None) -> AggregationLayer:
    """The chain of layer n (:mod:`.stages` lists the order); the Average server optimizer is fused into the
    compression kernel (it adds the aggregate into the parents), any other one is its own stage, which receives
    the pseudo-gradients from the kernel. ``solvers``: the local solvers' stages
    (:mod:`~lightning_qmlhfl.simulation.solver_stages`): layer n's at its uploads. ``theory``: the measured
    constants are on, so the compression error is measured every ``theory.every`` rounds (the identity's too)."""
    privacy, robust, attack = config.privacy, config.robust, config.attack
    materialised = not robust.is_mean or (not privacy.is_off and privacy.where == "central")
    compress: Stage = CompressUploads(config.compressor) if materialised else CompressAndSum(config.compressor)
    stages: list[Stage] = [SelectUploads()]
    upload = None if solvers is None else solvers.upload_stage(layer)
    if upload is not None:
        stages.append(upload)
    consensus = None if solvers is None else solvers.consensus_stage(layer)
    if consensus is not None:
        stages.append(consensus.snapshot())
    if config.clip_norm is not None:
        stages.append(ClipUpdates(config.clip_norm))
    if not privacy.is_off and privacy.where == "local":
        stages.append(SenderNoise(privacy))
    if not attack.is_none:
        stages.append(AttackUploads(attack))
    if has_buffers:
        stages.append(CheckBuffers())
    warn = None if config.compressor.is_identity else compression_warning
    if warn is not None or theory is not None:
        stages.append(MeasureCompression(config.compressor, warn, compress=compress,
                                         every=None if theory is None else theory.every,
                                         rows=2 if theory is None else theory.rows))
    stages.append(compress)
    total: Stage = compress
    if materialised:  # the messages, clipped by the receiver, summed (robustly), noised
        if not privacy.is_off and privacy.where == "central":
            stages.append(ReceiverClip(privacy))
        total = SumMessages(robust)
        stages.append(total)
        if not privacy.is_off and privacy.where == "central":
            stages.append(CentralNoise(privacy))
    if not config.server_optimizer.is_average:
        server = ServerStep(config.server_optimizer)
        stages.append(server)
        total.delta_to = server  # the sum is written into the server stage's buffer (the pseudo-gradients)
    elif materialised:
        stages.append(AddAggregate())
    if has_buffers:
        stages.append(AverageBuffers())
    if consensus is not None:
        stages.append(consensus)
    if change_tree is not None:
        stages.append(change_tree)
    stages.append(Resync())
    return AggregationLayer(layer, stages)


class BitCounter:
    """Bits of every upload into every layer, per round and in total, against 32-bit floats (observer of the
    aggregations)."""

    def __init__(self, sim: "QMLHFLEngine") -> None:
        N = sim.N
        self.bits = [sim.upload_bits(n) for n in range(1, N + 1)]
        self.baseline = [32 * (sim.num_params + sim.state.num_buffer_elems)] * N
        self.bits_sent = [0] * N  # cumulative, per layer n (index n-1)
        self.baseline_bits = [0] * N
        self.round_bits = [0] * N  # of the current (or just completed) round

    def on_round_start(self) -> None:
        self.round_bits = [0] * len(self.round_bits)

    def on_aggregate(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> None:
        n = ctx.layer
        sent = ctx.sent(sim.hierarchy.nodes_per_layer[n - 1])
        bits, base = sent * self.bits[n - 1], sent * self.baseline[n - 1]
        self.bits_sent[n - 1] += bits
        self.baseline_bits[n - 1] += base
        self.round_bits[n - 1] += bits


class PrivacyLedger:
    """The device-level (epsilon, delta) guarantee of the run's differential privacy after every completed round
    (observer): one noise point per layer that adds noise (:func:`lightning_qmlhfl.privacy.noise_points`),
    accounted by :class:`~lightning_qmlhfl.privacy.PrivacyAccountant` (Google's dp-accounting); ``epsilon`` is the
    guarantee against the outside world (the smallest of the points'), ``epsilon_layer{n}`` each point's."""

    def __init__(self, config: "SimulationConfig") -> None:
        from ..privacy import PrivacyAccountant, noise_points

        self.points = noise_points(config.hierarchy, list(config.taus), list(config.privacy),
                                   list(config.participation))
        self.accountant = PrivacyAccountant(self.points)
        self.delta = config.dp_delta

    def stats(self, rounds: int) -> dict[str, float]:
        eps = self.accountant.epsilons(rounds, self.delta)
        out = {"epsilon": min(eps)}
        out.update({f"epsilon_layer{p.layer}": e for p, e in zip(self.points, eps)})
        return out
