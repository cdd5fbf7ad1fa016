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
   :class:`MeasureCompression` (a compressor other than the identity, ``compression_warning`` set): the realised
   compression error of the first uploads, and one warning when it is large;
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
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..compressors import Compressor, Identity
from ..distribution.exchange import aggregate_across_ranks
from ..kernels import aggregate_layer_, row_uniforms
from ..optimizers.server import ServerOptimizer
from ..rng import Stream, generator, row_seeds

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["AggregationContext", "Stage", "SelectUploads", "ClipUpdates", "CheckBuffers", "MeasureCompression",
           "CompressionWarning", "CompressAndSum",
           "ServerStep", "AverageBuffers", "ChangeTree", "Resync", "sum_into_parents"]


@dataclass(frozen=True)
class AggregationContext:
    """One aggregation of layer n. Row indices and weights are this process's (all rows in one process).

    ``layer``: n; ``round``: the global round (0-based); ``event``: the aggregation's number in this round at this
    layer (0-based); ``step``: the local step (1-based in the round) that closed the period. Filled in by the
    stages: ``seeds`` (int64 per sender row: its draws), ``uploads`` (the sender rows that upload; None: all),
    ``uploads_global`` (the same over every rank), ``weights`` (float per sender row), ``mean_weights`` (the
    weights of an exact weighted mean, for the float buffers: ``weights`` renormalised over each parent's uploads
    when the participation weighting is unbiased, else ``weights`` itself), ``received`` (bool per
    parent row: got at least one upload; None: all), ``norms`` (float32 [uploads, buckets] of the compressed
    uploads); on the materialised path (:mod:`.trust_stages`) also ``messages`` (every sender's compressed upload,
    [senders, P]), ``clip_norms`` (float64 per parent row: the norms its received messages were clipped to) and
    ``aggregate`` (the parents' aggregates, [parents, P])."""

    layer: int
    round: int
    event: int
    step: int
    seeds: Tensor | None = None
    uploads: Tensor | None = None
    uploads_global: Tensor | None = None
    weights: Tensor | None = None
    mean_weights: Tensor | None = None
    received: Tensor | None = None
    norms: Tensor | None = None
    messages: Tensor | None = None
    clip_norms: Tensor | None = None
    aggregate: Tensor | None = None

    def replace(self, **changes: Any) -> "AggregationContext":
        return dataclasses.replace(self, **changes)

    def sent(self, num_senders: int) -> int:
        """How many uploads this aggregation received, over every rank."""
        return num_senders if self.uploads_global is None else int(self.uploads_global.numel())


def sum_into_parents(sim: "QMLHFLEngine", ctx: AggregationContext, parent: Tensor, child: Tensor, weights: Tensor,
                     compressor: Compressor, seeds: Tensor, *, memory: Tensor | None = None,
                     out: Tensor | None = None, backend: str | None = None, what: str = "parameters",
                     check: bool = True) -> Tensor:
    """parent[p] += sum over the uploading children c of p of weights[c] * C(child[c] - parent[p]) (or into
    ``out``) for one aggregation of layer n = ``ctx.layer``: one fused kernel, across the ranks at a multi-process
    run's cut layer. A non-finite upload stops the run (``what`` names it; ``check=False``: checked by an earlier
    stage, and in one process not again). Returns the uploads' norms."""
    n = ctx.layer
    idx = sim.parent_index[n - 1]
    backend = sim.backend if backend is None else backend
    if sim.at_cut(n):
        return aggregate_across_ranks(
            parent, child, idx, weights, compressor, seeds, backend, memory, ctx.uploads, ctx.uploads_global,
            sim.hierarchy.parent_index(n - 1), sim.shard.exchange, sim.comm,
            lambda norms: sim.guard.check_norms(n, norms, ctx.uploads, what), out)
    norms = aggregate_layer_(parent, child, idx, weights, compressor, seeds, backend, memory=memory,
                             rows=ctx.uploads, out=out)
    if check:
        sim.guard.check_norms(n, norms, ctx.uploads, what)
    return norms


class Stage:
    """One step of an aggregation (module docstring). Subclasses implement :meth:`apply`; those with state
    allocate and register it in :meth:`bind`."""

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        """Called once, when the simulation is built: allocate and register this stage's state for ``layer``."""
        self.layer = layer

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        raise NotImplementedError

    #: the attributes of this stage that count over its sender rows in the current round (uploads clipped, drift
    #: summed): a multi-process run adds each over the ranks that hold the layer's senders, and
    #: :meth:`round_stats` receives the totals
    summed: tuple[str, ...] = ()

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        """What this stage counted in the current (or just completed) round, for the round's statistics; ``sums``:
        the totals of the :attr:`summed` attributes over every process (their own values in one process)."""
        return {}

    def reset_round(self) -> None:
        """Start counting a new round."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SelectUploads(Stage):
    """The aggregation's senders and weights from the population (partial participation, availability, stragglers,
    dropouts: :mod:`lightning_qmlhfl.federation.population`) and the counter-based seeds of their draws."""

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        seeds = row_seeds(sim.seed, ctx.round, n, ctx.event, sim.hierarchy.nodes_per_layer[n - 1])
        uploads_g, w, received = sim.population.aggregate(n, ctx.round, ctx.event, sim.weights[n - 1])
        mean_w = w
        if (uploads_g is not None and sim.state.num_buffer_elems
                and sim.config.layers[n - 1].participation.weighting == "unbiased"):
            mean_w = _normalized(w, uploads_g, sim.tree.parent_index(n - 1), sim.hierarchy.nodes_per_layer[n])
        if sim.shard is not None:  # this process's senders and parents
            child_rows, parent_rows = sim.rows[n - 1], sim.rows[n]
            seeds, w = seeds[child_rows], w[child_rows.to(w.device)]
            mean_w = mean_w[child_rows.to(mean_w.device)]
            received = None if received is None else received[parent_rows]
        uploads = sim.local_rows(n - 1, uploads_g)
        return ctx.replace(seeds=seeds, weights=w, mean_weights=mean_w, uploads_global=uploads_g,
                           uploads=None if uploads is None else uploads.to(sim.device),
                           received=None if received is None else received.to(sim.device))


def _normalized(w: Tensor, uploads: Tensor, parent_index: Tensor, num_parents: int) -> Tensor:
    """``w`` divided, child by child, by the sum of the weights of its parent's uploading children (so that they sum
    to one under every parent that received an upload)."""
    pidx = parent_index.to(w.device)
    sel = uploads.to(w.device)
    sums = torch.zeros(num_parents, dtype=w.dtype, device=w.device).index_add_(0, pidx[sel], w[sel])
    sums = sums[pidx]
    return torch.where(sums > 0, w / torch.where(sums > 0, sums, torch.ones_like(sums)), w)


class ClipUpdates(Stage):
    """Each uploading sender's model difference x = v_c - v_p is clipped to an L2 norm of at most ``max_norm``
    before compression: the sender's row becomes v_p + x * min(1, max_norm / ||x||) (the re-synchronisation after
    the aggregation overwrites it anyway). State: ``clipped`` (int64 per sender row), how many of each sender's
    uploads were clipped; the round's count is in the round statistics (``clipped_layer{n}``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)
        self.round_clipped = 0

    summed = ("round_clipped",)

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        return {f"clipped_layer{self.layer}": sums["round_clipped"]}

    def reset_round(self) -> None:
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


class CompressionWarning(UserWarning):
    """A layer's compressor loses so much of its uploads that training suffers."""


class MeasureCompression(Stage):
    """The realised relative compression error ||C(x) - x||^2 / ||x||^2 of layer n's uploads (x the compressor's
    input, error-feedback memory included), measured on the first uploading rows with the uploads' own draws, so it
    is exactly what the kernel sends. Measured here with the torch reference rather than returned by the fused
    kernels: a handful of rows, a handful of times, costs little and leaves the three kernel backends as they are;
    it changes no number of the run.

    Two uses. The warning (``warn_above`` not None): the first two uploading rows of the layer's first ``samples``
    aggregations; when their mean exceeds ``warn_above``, one :class:`CompressionWarning` names the layer, the value
    and the fix (typically QSGD with one norm per whole upload of a large model: its error grows with sqrt(d)).
    ``mean``: that mean (None before the first measurement). The measured constants (``every`` not None,
    ``SimulationConfig.theory``): the first ``rows`` uploading rows of the layer's first aggregation of every
    ``every``-th round; ``last_error`` and ``last_norm`` (the uploads' mean L2 norm) hold the latest, and the round's
    statistics report them as ``theory/compression_error_layer{n}``, ``theory/upload_norm_layer{n}`` with the
    compressor's bound ``theory/q_bound_layer{n}``."""

    def __init__(self, compressor: Compressor, warn_above: float | None, samples: int = 4,
                 compress: "CompressAndSum | None" = None, every: int | None = None, rows: int = 2) -> None:
        self.compressor, self.samples = compressor, int(samples)
        self.warn_above = None if warn_above is None else float(warn_above)
        self.compress = compress  # the stage whose error-feedback memory is part of the input
        self.measured, self.total, self.rows = 0, 0.0, 0
        self.every, self.sample_rows = every, max(2, int(rows))
        self.latest = torch.full((2,), math.nan, dtype=torch.float64)  # (error, norm) last measured; NaN: none yet
        self._round: dict[str, float] = {}

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        if self.every is not None:  # the latest values feed Eq. 15's check (theory_probe): they resume with the run
            sim.registry.register(f"theory/compression/{layer}", lambda: self.latest, self.latest.copy_)

    @property
    def last_error(self) -> float | None:
        v = float(self.latest[0])
        return None if math.isnan(v) else v

    @property
    def last_norm(self) -> float | None:
        v = float(self.latest[1])
        return None if math.isnan(v) else v

    @property
    def mean(self) -> float | None:
        return self.total / self.rows if self.rows else None

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        first = self.warn_above is not None and self.measured < self.samples
        periodic = self.every is not None and ctx.event == 0 and ctx.round % self.every == 0
        if not (first or periodic):
            return ctx
        n = ctx.layer
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        k = self.sample_rows if periodic else 2
        rows = ctx.uploads[:k] if ctx.uploads is not None else torch.arange(min(k, child.shape[0]),
                                                                            device=child.device)
        if rows.numel() == 0:
            return ctx
        x = child[rows].to(torch.float32) - parent[sim.parent_index[n - 1][rows]].to(torch.float32)
        memory = None if self.compress is None else self.compress.memory
        if memory is not None:
            x = x + memory[rows].to(torch.float32) if self.compressor.error_feedback == "ef" else \
                x - memory[rows].to(torch.float32)
        uniforms = row_uniforms(ctx.seeds[rows.cpu()], x.shape[1], x.device) if self.compressor.uses_uniforms \
            else None
        energy = x.double().pow(2).sum(1)
        err = (self.compressor(x, uniforms=uniforms).double() - x.double()).pow(2).sum(1)
        keep = energy > 0
        if periodic:
            if bool(keep.any()):
                self.latest[0] = float((err[keep] / energy[keep]).mean())
            self.latest[1] = float(energy.sqrt().mean())
            self._round = {f"theory/compression_error_layer{n}": math.nan if self.last_error is None
                           else self.last_error, f"theory/upload_norm_layer{n}": self.last_norm,
                           f"theory/q_bound_layer{n}": float(self.compressor.variance_bound(sim.num_params))}
        if not first:
            return ctx
        err, energy, keep = err[:2], energy[:2], keep[:2]
        self.total += float((err[keep] / energy[keep]).sum())
        self.rows += int(keep.sum())
        self.measured += 1
        if self.measured == self.samples and self.mean is not None and self.mean > self.warn_above:
            warnings.warn(
                f"layer {n}'s uploads lose much to compression: ||C(x) - x||^2 / ||x||^2 = {self.mean:.3g} on "
                f"average over its first {self.samples} aggregations with {self.compressor!r} (over "
                f"{self.warn_above:g}); training may stall or diverge. Use buckets (QSGD(s, bucket_size=512), the "
                f"default), more levels or error feedback; compression_warning=None silences this",
                CompressionWarning, stacklevel=2)
        return ctx

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        return dict(self._round)

    def reset_round(self) -> None:
        self._round = {}

    def __repr__(self) -> str:
        return "MeasureCompression()" if self.warn_above is None else f"MeasureCompression({self.warn_above:g})"


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
        out = None if self.delta_to is None else self.delta_to.delta
        norms = sum_into_parents(sim, ctx, sim.state.params[ctx.layer], sim.state.params[ctx.layer - 1],
                                 ctx.weights, self.compressor, ctx.seeds, memory=self.memory, out=out)
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
    """Float buffers (BatchNorm statistics) travel up uncompressed and are aggregated by the exact weighted mean
    (never quantized: stochastic rounding could make a running variance negative; never with unbiased
    participation weights, whose sum under a parent can exceed one and extrapolate a variance below zero)."""

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        buffers = sim.state.buffers
        sum_into_parents(sim, ctx, buffers[ctx.layer], buffers[ctx.layer - 1], ctx.mean_weights, Identity(),
                         ctx.seeds, backend="torch", what="buffers", check=False)
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
    the whole device stack at every aggregation). With partial participation the device layer is left alone: the
    devices of the next layer-1 period read their parents' rows when they start (the engine's
    ``lazy_devices``), so a round costs in proportion to the devices that take part."""

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        s = sim.state
        n = ctx.layer
        for m, anc in enumerate(sim.ancestors[n - 1]):
            if m == 0 and sim.lazy_devices:  # the next period's devices start from their parents' rows
                continue
            torch.index_select(s.params[n], 0, anc, out=s.params[m])
            if s.num_buffer_elems:
                torch.index_select(s.buffers[n], 0, anc, out=s.buffers[m])
        return ctx
