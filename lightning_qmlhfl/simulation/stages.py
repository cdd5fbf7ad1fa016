"""The stages of an aggregation: Eq. 4/6 at layer n as an ordered chain of small steps over the layer's rows
(docs/algorithm.md#eq-4).

A :class:`Stage` declares its state when it is bound to a simulation (:meth:`Stage.bind`: the rows it keeps,
registered with the simulation's :class:`~lightning_qmlhfl.simulation.state.StateRegistry`) and, at every
aggregation, takes the frozen :class:`AggregationContext` and returns it, possibly with more filled in. The chain a
layer runs (:func:`~lightning_qmlhfl.simulation.layers.build_layer`):

1. :class:`SelectUploads`: who uploads and with which weight (participation, stragglers, dropouts; the draws'
   seeds);
2. :class:`ClipUpdates` (with ``LayerConfig.clip_norm``): each sender's model difference clipped to a norm;
3. :class:`CheckBuffers` (models with float buffers): a non-finite buffer upload stops the run;
4. :class:`CompressAndSum`: compression with its error-feedback memory and the weighted sum over every parent's
   children, one fused kernel; with the default server optimizer (Average) it adds into the parents (the server
   step fused in), otherwise it hands the pseudo-gradients on; a non-finite upload stops the run;
5. :class:`ServerStep` (a server optimizer other than Average);
6. :class:`AverageBuffers` (float buffers: the exact weighted mean);
7. :class:`ChangeTree` (mobility): devices move and edge servers fail before the re-synchronisation;
8. :class:`Resync`: Eq. 5, every node below layer n continues from its layer-n ancestor's new model.

A new capability is a new stage (with its declared state) placed in this chain, not a branch in the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..compressors import Compressor, Identity
from ..distribution.exchange import aggregate_across_ranks
from ..kernels import aggregate_layer_
from ..optimizers.server import ServerOptimizer
from ..rng import Stream, generator, row_seeds

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["AggregationContext", "Stage", "SelectUploads", "ClipUpdates", "CheckBuffers", "CompressAndSum",
           "ServerStep", "AverageBuffers", "ChangeTree", "Resync"]


@dataclass(frozen=True)
class AggregationContext:
    """One aggregation of layer n. Row indices and weights are this process's (all rows in one process).

    ``layer``: n; ``round``: the global round (0-based); ``event``: the aggregation's number in this round at this
    layer (0-based); ``step``: the local step (1-based in the round) that closed the period. Filled in by the
    stages: ``seeds`` (int64 per sender row: its draws), ``uploads`` (the sender rows that upload; None: all),
    ``uploads_global`` (the same over every rank), ``weights`` (float per sender row), ``received`` (bool per
    parent row: got at least one upload; None: all), ``norms`` (float32 [uploads, buckets] of the compressed
    uploads)."""

    layer: int
    round: int
    event: int
    step: int
    seeds: Tensor | None = None
    uploads: Tensor | None = None
    uploads_global: Tensor | None = None
    weights: Tensor | None = None
    received: Tensor | None = None
    norms: Tensor | None = None

    def replace(self, **changes: Any) -> "AggregationContext":
        return dataclasses.replace(self, **changes)

    def sent(self, num_senders: int) -> int:
        """How many uploads this aggregation received, over every rank."""
        return num_senders if self.uploads_global is None else int(self.uploads_global.numel())


class Stage:
    """One step of an aggregation (module docstring). Subclasses implement :meth:`apply`; those with state
    allocate and register it in :meth:`bind`."""

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        """Called once, when the simulation is built: allocate and register this stage's state for ``layer``."""
        self.layer = layer

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SelectUploads(Stage):
    """The aggregation's senders and weights from the population (partial participation, availability, stragglers,
    dropouts: :mod:`lightning_qmlhfl.federation.population`) and the counter-based seeds of their draws."""

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        seeds = row_seeds(sim.seed, ctx.round, n, ctx.event, sim.hierarchy.nodes_per_layer[n - 1])
        uploads_g, w, received = sim.population.aggregate(n, ctx.round, ctx.event, sim.weights[n - 1])
        if sim.shard is not None:  # this process's senders and parents
            child_rows, parent_rows = sim.rows[n - 1], sim.rows[n]
            seeds, w = seeds[child_rows], w[child_rows.to(w.device)]
            received = None if received is None else received[parent_rows]
        uploads = sim.local_rows(n - 1, uploads_g)
        return ctx.replace(seeds=seeds, weights=w, uploads_global=uploads_g,
                           uploads=None if uploads is None else uploads.to(sim.device),
                           received=None if received is None else received.to(sim.device))


class ClipUpdates(Stage):
    """Each uploading sender's model difference x = v_c - v_p is clipped to an L2 norm of at most ``max_norm``
    before compression: the sender's row becomes v_p + x * min(1, max_norm / ||x||) (the re-synchronisation after
    the aggregation overwrites it anyway). State: ``clipped`` (int64 per sender row), how many of each sender's
    uploads were clipped; the round's count is in the round statistics (``clipped_layer{n}``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)
        self.round_clipped = 0

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        rows = sim.state.params[layer - 1].shape[0]
        self.clipped = sim.registry.register_rows(f"clipped/{layer}", torch.zeros(rows, dtype=torch.int64),
                                                  layer - 1)

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        rows = ctx.uploads if ctx.uploads is not None else torch.arange(child.shape[0], device=child.device)
        if rows.numel() == 0:
            return ctx
        anchor = parent.index_select(0, sim.parent_index[n - 1].index_select(0, rows))
        diff = child.index_select(0, rows).to(torch.float32) - anchor.to(torch.float32)
        norms = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64)
        over = norms > self.max_norm
        if bool(over.any()):
            scale = (self.max_norm / norms[over]).to(torch.float32).unsqueeze(1)
            sel = rows[over]
            child[sel] = (anchor[over].to(torch.float32) + diff[over] * scale).to(child.dtype)
            self.clipped[sel.cpu()] += 1
            self.round_clipped += int(over.sum())
        return ctx

    def __repr__(self) -> str:
        return f"ClipUpdates({self.max_norm})"


class CheckBuffers(Stage):
    """A float-buffer upload (BatchNorm statistics) holding NaN or Inf stops the run before anything is
    aggregated (:class:`~lightning_qmlhfl.simulation.engine.NonFiniteUpdateError`)."""

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        buffers = sim.state.buffers[n - 1]
        sent = buffers if ctx.uploads is None else buffers[ctx.uploads]
        sim.guard.check_rows(n, ~torch.isfinite(sent).all(dim=1), ctx.uploads, "buffer")
        return ctx


class CompressAndSum(Stage):
    """C_n with its error-feedback memory and the weighted sum sum_c w_c C_n(x_c) over every parent's children,
    one fused kernel over the layer (:func:`lightning_qmlhfl.kernels.aggregate_layer_`). Without ``out`` the sum is
    added into the parents (Eq. 4/6 with the Average server optimizer fused in); with ``out`` it is written there
    for the next stage (:class:`ServerStep`). State: the EF memory (one row per sender), when the compressor has
    error feedback. A non-finite upload stops the run, the parents untouched."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.memory: Tensor | None = None
        self.delta_to: ServerStep | None = None  # the stage that receives the sum (None: add into the parents)

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        if self.compressor.error_feedback:
            mem = torch.zeros(sim.state.params[layer - 1].shape, dtype=sim.work_dtype, device=sim.device)
            self.memory = sim.registry.register_rows(f"memory/{layer}", mem, layer - 1)

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        params = sim.state.params
        idx = sim.parent_index[n - 1]
        out = None if self.delta_to is None else self.delta_to.delta
        if sim.at_cut(n):
            norms = aggregate_across_ranks(
                params[n], params[n - 1], idx, ctx.weights, self.compressor, ctx.seeds, sim.backend, self.memory,
                ctx.uploads, ctx.uploads_global, sim.hierarchy.parent_index(n - 1), sim.shard.exchange, sim.comm,
                lambda norms: sim.guard.check_norms(n, norms, ctx.uploads), out)
        else:
            norms = aggregate_layer_(params[n], params[n - 1], idx, ctx.weights, self.compressor, ctx.seeds,
                                     sim.backend, memory=self.memory, rows=ctx.uploads, out=out)
            sim.guard.check_norms(n, norms, ctx.uploads)
        return ctx.replace(norms=norms)

    def __repr__(self) -> str:
        return f"CompressAndSum({self.compressor!r})"


class ServerStep(Stage):
    """The server optimizer turns the pseudo-gradients Delta_p (written by :class:`CompressAndSum` into
    :attr:`delta`) into the update of the node models (:mod:`lightning_qmlhfl.optimizers.server`); nodes that
    received nothing do not step. State: the optimizer's rows (one per node of layer n)."""

    def __init__(self, optimizer: ServerOptimizer) -> None:
        self.optimizer = optimizer

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        rows = sim.state.params[layer].shape[0]
        self.delta = torch.empty(rows, sim.num_params, dtype=sim.work_dtype, device=sim.device)
        self.state = self.optimizer.init_state(rows, sim.num_params, sim.work_dtype, sim.device)

        def load(sd: dict[str, Tensor]) -> None:
            for k, v in self.state.items():
                v.copy_(sd[k])

        sim.registry.register(f"server/{layer}", lambda: self.state, load, rows=layer)

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        self.optimizer.step_(sim.state.params[ctx.layer], self.delta, self.state, ctx.received)
        return ctx

    def __repr__(self) -> str:
        return f"ServerStep({self.optimizer!r})"


class AverageBuffers(Stage):
    """Float buffers (BatchNorm statistics) travel up uncompressed and are aggregated by the exact weighted sum
    (never quantized: stochastic rounding could make a running variance negative)."""

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        buffers = sim.state.buffers
        idx = sim.parent_index[n - 1]
        if sim.at_cut(n):
            aggregate_across_ranks(buffers[n], buffers[n - 1], idx, ctx.weights, Identity(), ctx.seeds, "torch",
                                   None, ctx.uploads, ctx.uploads_global, sim.hierarchy.parent_index(n - 1),
                                   sim.shard.exchange, sim.comm,
                                   lambda norms: sim.guard.check_norms(n, norms, ctx.uploads, "buffers"), None)
        else:
            aggregate_layer_(buffers[n], buffers[n - 1], idx, ctx.weights, Identity(), ctx.seeds, "torch",
                             rows=ctx.uploads)
        return ctx


class ChangeTree(Stage):
    """Mobility (:mod:`lightning_qmlhfl.federation.mobility`): after the aggregation and before the
    re-synchronisation, devices that moved during the layer-1 period move to another edge server, at the model's
    boundary layer every device may move and edge servers may fail; movers continue from their new parent. One
    instance serves every layer (the tree is the simulation's). State: the current tree, every device's edge server
    (``home``, failures aside) and the round's moves and failures."""

    def __init__(self, mobility: Any) -> None:
        self.mobility = mobility
        self.moves = self.failures = 0  # in the current round
        self._bound = False

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        if self._bound:
            return
        self._bound = True
        self.boundary_layer = self.mobility.every or sim.N

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        from ..federation.mobility import _other_parent

        n = ctx.layer
        M1 = sim.hierarchy.nodes_per_layer[1]
        pop = sim.population
        if n == 1 and bool(pop.movers.any()):  # moved during the period (their uploads were lost)
            g = generator(sim.seed, Stream.MOBILITY, ctx.round, ctx.event, 2)
            movers = pop.movers
            sim.home[movers] = _other_parent(sim.home[movers], M1, g)
            self.moves += int(movers.sum())
            pop.movers = torch.zeros_like(movers)
        effective = sim.home
        if n == self.boundary_layer:
            boundary = sim.aggregation_counts[n - 1]
            new = self.mobility.move(boundary, sim.home, M1, generator(sim.seed, Stream.MOBILITY, boundary))
            self.moves += int((new != sim.home).sum())
            sim.home = new.clone()
            effective = sim.home
            failures = self.mobility.failures
            if failures is not None:
                down = failures.down(boundary, M1, generator(sim.seed, Stream.MOBILITY, boundary, 3))
                self.failures += int(down.sum())
                if failures.mode == "fallback" and not bool(down.all()):
                    effective = self.fallback(sim, down, generator(sim.seed, Stream.MOBILITY, boundary, 4))
                    down = torch.zeros_like(down)
                pop.set_down(down)
        if not torch.equal(effective, sim.tree.parent_index(0)):
            sim.tree.set_device_parents(effective)
            sim.refresh_tree()
        return ctx

    @staticmethod
    def fallback(sim: "QMLHFLEngine", down: Tensor, g: torch.Generator) -> Tensor:
        """Devices of failed edge servers attach to a uniformly chosen live edge server under the same regional
        server when there is one, else to any live one."""
        region = sim.tree.parent_index(1)  # the layer-2 node of every edge server
        live = torch.nonzero(~down).flatten()
        order = live[torch.argsort(region[live], stable=True)]
        regions = sim.hierarchy.nodes_per_layer[2]
        counts = torch.bincount(region[live], minlength=regions)
        starts = torch.cumsum(counts, 0) - counts
        out = sim.home.clone()
        stranded = down[sim.home]
        r = region[sim.home[stranded]]
        u = torch.rand(int(stranded.sum()), generator=g, dtype=torch.float64)
        local = counts[r] > 0
        pick_local = order[(starts[r] + (u * counts[r].double()).long().clamp(max=counts[r] - 1).clamp(min=0))
                           .clamp(max=order.numel() - 1)]
        pick_any = live[(u * live.numel()).long().clamp(max=live.numel() - 1)]
        out[stranded] = torch.where(local, pick_local, pick_any)
        return out

    def __repr__(self) -> str:
        return f"ChangeTree({self.mobility!r})"


class Resync(Stage):
    """Eq. 5: everything below layer n continues from its layer-n ancestor's new model (parameters and float
    buffers), by ``index_select`` into the rows directly (a gather-then-copy would allocate a temporary as large as
    the whole device stack at every aggregation)."""

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        s = sim.state
        n = ctx.layer
        for m, anc in enumerate(sim.ancestors[n - 1]):
            torch.index_select(s.params[n], 0, anc, out=s.params[m])
            if s.num_buffer_elems:
                torch.index_select(s.buffers[n], 0, anc, out=s.buffers[m])
        return ctx
