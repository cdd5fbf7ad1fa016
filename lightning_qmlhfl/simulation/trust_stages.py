"""The stages of trust: Byzantine senders, differential privacy and robust aggregation in a layer's chain
(docs/privacy.md, docs/robustness.md).

Where each acts, in the order :func:`~lightning_qmlhfl.simulation.layers.build_layer` places them:

1. :class:`SenderNoise` (local DP at layer n, ``GaussianDP(where="local")``): every sender clips its model
   difference x = v_c - v_p to the clip norm C and adds Gaussian noise of std z C, before compression (clip ->
   noise -> compress: the compressor, its error-feedback memory and everything after only post-process the
   noised upload, so the guarantee holds whatever the compressor);
2. :class:`AttackUploads` (an attack at layer n): the layer's Byzantine senders replace their uploads by the
   attack's message (after their own privacy stage: an attacker sends what it likes; before the compression, whose
   format the protocol enforces). At layer 2 this is a compromised edge server corrupting its aggregate;
3. when layer n aggregates with central noise or a robust aggregator, the fused compress-and-sum is replaced by
   four stages over the materialised messages: :class:`CompressUploads` (each upload C(x), with its
   error-feedback memory, from the same kernels and draws as the fused path), :class:`ReceiverClip` (central DP:
   the node clips what it receives, after decompression, so the sensitivity of its sum is exactly the clip
   whatever the compressor; fixed or adaptive clip norms), :class:`SumMessages` (the weighted sum, or the robust
   aggregator over the children of every node at once) and :class:`CentralNoise` (Gaussian noise of std
   z C max_c w_c, the sum's sensitivity, on every node that received uploads), then the server step or
   :class:`AddAggregate`.

All of these act on the senders that upload (participation masks honoured) and draw their noise from
counter-based generators keyed by (seed, purpose, round, layer, event), so a resumed run draws the same numbers.
They run in one process: a multi-process (DDP) run with any of them is refused when the engine is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..compressors import Compressor
from ..kernels import aggregate_layer_
from ..privacy import GaussianDP, adaptive_clip_update, clip_rows_
from ..rng import Stream, generator
from ..robust import Attack, RobustAggregator
from .stages import AggregationContext, ServerStep, Stage

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["SenderNoise", "AttackUploads", "CompressUploads", "ReceiverClip", "SumMessages", "CentralNoise",
           "AddAggregate"]


def _rows(ctx: AggregationContext, num_rows: int, device: torch.device) -> Tensor:
    return ctx.uploads if ctx.uploads is not None else torch.arange(num_rows, device=device)


def _normal(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Standard normal draws from a CPU generator (the same numbers on every device), moved to ``device``."""
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


class SenderNoise(Stage):
    """Local DP at layer n (module docstring, 1.). Round statistics: the fraction of uploads clipped and the
    noise's std."""

    def __init__(self, privacy: GaussianDP) -> None:
        self.privacy = privacy
        self.reset_round()

    def reset_round(self) -> None:
        self.round_uploads, self.round_clipped = 0, 0

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n, p = ctx.layer, self.privacy
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        rows = _rows(ctx, child.shape[0], child.device)
        if rows.numel() == 0:
            return ctx
        idx = sim.parent_index[n - 1].index_select(0, rows)
        anchor = parent.index_select(0, idx).to(sim.work_dtype)
        x = child.index_select(0, rows).to(sim.work_dtype) - anchor
        norms = clip_rows_(x, p.clip_norm)
        self.round_clipped += int((norms > p.clip_norm).sum())
        self.round_uploads += int(rows.numel())
        if p.noise_multiplier > 0:
            g = generator(sim.seed, Stream.PRIVACY, ctx.round, n, ctx.event)
            x.add_(_normal(tuple(x.shape), g, x.dtype, x.device), alpha=p.noise_multiplier * p.clip_norm)
        child[rows] = (anchor + x).to(child.dtype)
        return ctx

    summed = ("round_clipped", "round_uploads")

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        n, p = self.layer, self.privacy
        return {f"clip_fraction_layer{n}": sums["round_clipped"] / max(1, sums["round_uploads"]),
                f"noise_std_layer{n}": p.noise_multiplier * p.clip_norm}

    def __repr__(self) -> str:
        return f"SenderNoise({self.privacy!r})"


class AttackUploads(Stage):
    """Layer n's Byzantine senders (a fixed set drawn once from the run's seed: :meth:`Attack.byzantine`) replace
    their uploads by the attack's message (module docstring, 2.). Round statistic: how many uploads were
    replaced."""

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.reset_round()

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        byz = self.attack.byzantine(sim.hierarchy.nodes_per_layer[layer - 1], sim.seed, layer)
        self.byzantine = byz[sim.rows[layer - 1]].to(sim.device)

    def reset_round(self) -> None:
        self.round_attacked, self.round_uploads = 0, 0

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        rows = _rows(ctx, child.shape[0], child.device)
        self.round_uploads += int(rows.numel())
        bad = self.byzantine.index_select(0, rows)
        if not bool(bad.any()):
            return ctx
        idx = sim.parent_index[n - 1].index_select(0, rows)
        x = child.index_select(0, rows).to(sim.work_dtype) - parent.index_select(0, idx).to(sim.work_dtype)
        g = generator(sim.seed, Stream.ATTACK, ctx.round, n, ctx.event)
        sent = self.attack.corrupt(x, bad, idx, sim.hierarchy.nodes_per_layer[n], g)
        sel = rows[bad]
        child[sel] = (parent.index_select(0, idx[bad]).to(sim.work_dtype) + sent[bad]).to(child.dtype)
        self.round_attacked += int(bad.sum())
        return ctx

    summed = ("round_attacked", "round_uploads")

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        n = self.layer
        return {f"attacked_layer{n}": sums["round_attacked"],
                f"attack_fraction_layer{n}": sums["round_attacked"] / max(1, sums["round_uploads"])}

    def __repr__(self) -> str:
        return f"AttackUploads({self.attack!r})"


class CompressUploads(Stage):
    """Every upload's message C(x) (module docstring, 3.): the layer's kernel with each sender as its own parent,
    weight one, writing into :attr:`messages` ([senders, P], the work dtype; rows of senders that do not upload
    are zero). State: the error-feedback memory (``memory/{n}``, as the fused path's)."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.memory: Tensor | None = None

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        child = sim.state.params[layer - 1]
        if self.compressor.error_feedback:
            mem = torch.zeros(child.shape, dtype=sim.work_dtype, device=sim.device)
            self.memory = sim.registry.register_rows(f"memory/{layer}", mem, layer - 1)
        self.messages = torch.zeros(child.shape, dtype=sim.work_dtype, device=sim.device)
        self.own = torch.arange(child.shape[0], device=sim.device)
        self.ones = torch.ones(child.shape[0], dtype=sim.work_dtype, device=sim.device)

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        anchors = parent.index_select(0, sim.parent_index[n - 1])
        self.messages.zero_()
        norms = aggregate_layer_(anchors, child, self.own, self.ones, self.compressor, ctx.seeds, sim.backend,
                                 memory=self.memory, rows=ctx.uploads, out=self.messages)
        sim.guard.check_norms(n, norms, ctx.uploads, "parameters")
        return ctx.replace(norms=norms, messages=self.messages)

    def __repr__(self) -> str:
        return f"CompressUploads({self.compressor!r})"


class ReceiverClip(Stage):
    """Central DP at layer n: each node clips the messages it received to its clip norm (module docstring, 3.).
    Fixed, or adaptive by the quantile method of Andrew et al. (2021): after each aggregation a node's norm moves by
    C <- C exp(-eta (b - gamma)), b the noised fraction of its uploads that were not clipped. State: the clip norm of
    every node of layer n (``privacy/{n}/clip``, float64). Round statistics: the fraction clipped, the mean norm."""

    def __init__(self, privacy: GaussianDP) -> None:
        self.privacy = privacy
        self.reset_round()

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        rows = sim.state.params[layer].shape[0]
        clip = torch.full((rows,), self.privacy.clip_norm, dtype=torch.float64, device=sim.device)
        self.clip = sim.registry.register_rows(f"privacy/{layer}/clip", clip, layer)

    def reset_round(self) -> None:
        self.round_uploads, self.round_clipped = 0, 0

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n, p = ctx.layer, self.privacy
        msgs = ctx.messages
        rows = _rows(ctx, msgs.shape[0], msgs.device)
        used = self.clip.clone()  # the norms of this aggregation (the adaptive update is for the next one)
        if rows.numel() == 0:
            return ctx.replace(clip_norms=used)
        idx = sim.parent_index[n - 1].index_select(0, rows)
        bound = used.index_select(0, idx)
        x = msgs.index_select(0, rows)
        norms = clip_rows_(x, bound)
        msgs[rows] = x
        over = norms > bound
        self.round_clipped += int(over.sum())
        self.round_uploads += int(rows.numel())
        if p.target_quantile is not None:
            parents = self.clip.shape[0]
            k = torch.zeros(parents, dtype=torch.float64, device=msgs.device).index_add_(
                0, idx, torch.ones(idx.shape, dtype=torch.float64, device=msgs.device))
            below = torch.zeros_like(k).index_add_(0, idx, (~over).to(torch.float64))
            g = generator(sim.seed, Stream.PRIVACY, ctx.round, n, ctx.event, 1)
            noisy = below + p.count_noise_for(int(k.max())) * _normal((parents,), g, torch.float64, k.device)
            got = k > 0
            frac = noisy[got] / k[got]
            self.clip[got] = adaptive_clip_update(self.clip[got], frac, p.target_quantile, p.clip_lr)
        return ctx.replace(clip_norms=used)

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        # one process only (module docstring): the clip norms are rows of the parents, not counters of the senders
        n = self.layer
        return {f"clip_fraction_layer{n}": self.round_clipped / max(1, self.round_uploads),
                f"clip_norm_layer{n}": float(self.clip.mean())}

    def __repr__(self) -> str:
        return f"ReceiverClip({self.privacy!r})"


class SumMessages(Stage):
    """The aggregate of every node of layer n from its children's messages (module docstring, 3.): the weighted
    sum sum_c w_c m_c with the aggregator ``Mean``, else the robust aggregator's estimate over the node's messages
    (unweighted) times the sum of their weights, so that equal uploads give the weighted mean's result. Written into
    the server optimizer's buffer (``delta_to``) or into :attr:`aggregate` for :class:`AddAggregate`. Round
    statistic (robust aggregators that select rows: Krum): the uploads left out."""

    def __init__(self, aggregator: RobustAggregator) -> None:
        self.aggregator = aggregator
        self.delta_to: ServerStep | None = None
        self.reset_round()

    def bind(self, sim: "QMLHFLEngine", layer: int) -> None:
        super().bind(sim, layer)
        rows = sim.state.params[layer].shape[0]
        self.aggregate = torch.zeros(rows, sim.num_params, dtype=sim.work_dtype, device=sim.device)
        kids = torch.bincount(sim.parent_index[layer - 1].cpu(), minlength=rows)
        self.aggregator.check_children(int(kids.min()) if kids.numel() else 0, layer)

    def reset_round(self) -> None:
        self.round_rejected = 0

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n = ctx.layer
        msgs = ctx.messages
        out = self.aggregate if self.delta_to is None else self.delta_to.delta
        out.zero_()
        rows = _rows(ctx, msgs.shape[0], msgs.device)
        if rows.numel() == 0:
            return ctx.replace(aggregate=out)
        idx = sim.parent_index[n - 1].index_select(0, rows)
        w = ctx.weights.to(device=msgs.device, dtype=msgs.dtype).index_select(0, rows)
        x = msgs.index_select(0, rows)
        if self.aggregator.is_mean:
            out.index_add_(0, idx, x * w.unsqueeze(1))
        else:
            res = self.aggregator.aggregate(x, idx, out.shape[0], backend=sim.backend)
            mass = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device).index_add_(0, idx, w)
            out.copy_(res.value.to(out.dtype) * mass.unsqueeze(1))
            self.round_rejected += int(res.rejected)
        return ctx.replace(aggregate=out)

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        return {} if self.aggregator.is_mean else {f"rejected_layer{self.layer}": self.round_rejected}

    def __repr__(self) -> str:
        return f"SumMessages({self.aggregator!r})"


class CentralNoise(Stage):
    """Central DP at layer n: every node that received uploads adds Gaussian noise of std z C_p max_c w_c to its
    aggregate (z: the sum's share of the noise multiplier when the clip norm is adaptive,
    :func:`~lightning_qmlhfl.privacy.noise_multiplier_for_sum`). Round statistic: the mean std."""

    def __init__(self, privacy: GaussianDP) -> None:
        self.privacy = privacy
        self.reset_round()

    def reset_round(self) -> None:
        self.round_std, self.round_events = 0.0, 0

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        n, p = ctx.layer, self.privacy
        agg = ctx.aggregate
        msgs = ctx.messages
        rows = _rows(ctx, msgs.shape[0], msgs.device)
        if rows.numel() == 0 or p.noise_multiplier == 0:
            return ctx
        idx = sim.parent_index[n - 1].index_select(0, rows)
        w = ctx.weights.to(device=agg.device, dtype=torch.float64).index_select(0, rows)
        wmax = torch.zeros(agg.shape[0], dtype=torch.float64, device=agg.device).scatter_reduce_(
            0, idx, w, "amax", include_self=True)
        got = torch.zeros(agg.shape[0], dtype=torch.bool, device=agg.device)
        got[idx] = True
        z = p.sum_noise_multiplier(int(torch.bincount(idx).max()))
        std = z * ctx.clip_norms * wmax  # the norms the messages were clipped with (ReceiverClip)
        g = generator(sim.seed, Stream.PRIVACY, ctx.round, n, ctx.event, 2)
        noise = _normal(tuple(agg.shape), g, agg.dtype, agg.device)
        agg.add_(noise * torch.where(got, std, torch.zeros_like(std)).to(agg.dtype).unsqueeze(1))
        self.round_std += float(std[got].mean())
        self.round_events += 1
        return ctx

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        return {f"noise_std_layer{self.layer}": self.round_std / max(1, self.round_events)}

    def __repr__(self) -> str:
        return f"CentralNoise({self.privacy!r})"


class AddAggregate(Stage):
    """parent += aggregate (the Average server optimizer, Eq. 4/6) on the materialised path."""

    @torch.no_grad()
    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        parent = sim.state.params[ctx.layer]
        parent.copy_((parent.to(ctx.aggregate.dtype) + ctx.aggregate).to(parent.dtype))
        return ctx
