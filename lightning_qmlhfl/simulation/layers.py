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

if TYPE_CHECKING:
    from ..config import LayerConfig
    from .solver_stages import LocalSolvers
    from .engine import QMLHFLEngine

__all__ = ["AggregationLayer", "build_layer", "BitCounter"]


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
                compression_warning: float | None = None, solvers: "LocalSolvers | None" = None) -> AggregationLayer:
    """The chain of layer n (:mod:`.stages` lists the order); the Average server optimizer is fused into the
    compression kernel (it adds the aggregate into the parents), any other one is its own stage, which receives
    the pseudo-gradients from the kernel. ``solvers``: the local solvers' stages
    (:mod:`~lightning_qmlhfl.simulation.solver_stages`): layer n's at its uploads."""
    compress = CompressAndSum(config.compressor)
    stages: list[Stage] = [SelectUploads()]
    upload = None if solvers is None else solvers.upload_stage(layer)
    if upload is not None:
        stages.append(upload)
    consensus = None if solvers is None else solvers.consensus_stage(layer)
    if consensus is not None:
        stages.append(consensus.snapshot())
    if config.clip_norm is not None:
        stages.append(ClipUpdates(config.clip_norm))
    if has_buffers:
        stages.append(CheckBuffers())
    if compression_warning is not None and not config.compressor.is_identity:
        stages.append(MeasureCompression(config.compressor, compression_warning, compress=compress))
    stages.append(compress)
    if not config.server_optimizer.is_average:
        server = ServerStep(config.server_optimizer)
        stages.append(server)
        compress.delta_to = server  # the kernel writes the pseudo-gradients into the server stage's buffer
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
