"""The constants of Theorem 1 measured during a run (``SimulationConfig.theory``; the estimators and their
reasoning: :mod:`lightning_qmlhfl.theory.measured`).

At the first local step of every ``every``-th global round, before the devices' own gradients, :class:`ConstantsProbe`
samples ``rows`` of the devices that train in that step (a counter-based draw of the seed and the round) and
evaluates, at the cloud model w, each one's gradient on the two halves of its own mini-batch, then again at the
point w - lr g_i its next SGD step reaches: two calls of the executor on 2 x rows rows of half batches, under a
forked RNG and on copies of the buffers, so the run's own numbers do not change. The realised compression errors
and upload norms per layer come from each layer's
:class:`~lightning_qmlhfl.simulation.stages.MeasureCompression` stage, once per round.

With these it checks Eq. 15 at the current learning rate (``theory/eq15``, ``theory/lr_headroom`` = mu*/lr, one
:class:`~lightning_qmlhfl.theory.LearningRateWarning` when it fails) and, with ``adapt_lr``, caps every local step's
learning rate at ``adapt_lr * mu*`` (the cap is checkpointed state, ``theory/probe``). One process only (the engine
refuses a sharded run with it).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from ..rng import Stream, generator
from ..theory.convergence import LearningRateWarning, lr_condition_bracket
from ..theory.measured import MeasureConstants, heterogeneity, minibatch_variance, path_smoothness

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["ConstantsProbe"]


def _batch_rows(batch: Any) -> int | None:
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.dim() > 0]
    return None if not leaves else int(leaves[0].shape[0])


class ConstantsProbe:
    """Measures L, sigma^2 and the heterogeneity on sampled devices; checks Eq. 15 and caps the learning rate
    (module docstring)."""

    def __init__(self, options: MeasureConstants) -> None:
        self.options = options
        self.stats: dict[str, float] = {}
        # checkpointed: the largest L so far, the learning-rate cap (inf: none), whether the warning was given
        self.state = torch.tensor([math.nan, math.inf, 0.0], dtype=torch.float64)

    def bind(self, sim: "QMLHFLEngine") -> None:
        sim.registry.register("theory/probe", lambda: self.state, lambda v: self.state.copy_(v))

    def due(self, sim: "QMLHFLEngine") -> bool:
        return sim.step_in_round == 0 and not sim._step_losses and sim.round % self.options.every == 0

    # ------------------------------------------------------------------ measuring
    def _grads(self, sim: "QMLHFLEngine", params: Tensor, buffers: Tensor, batch: Any) -> Tensor:
        """[rows, P] gradients of every row's loss (the executor's per-parameter parts laid into one row stack)."""
        grads, _, _ = sim.executor(params, buffers.clone(), batch)
        if isinstance(grads, Tensor):
            return grads.to(torch.float64)
        out = torch.zeros(params.shape, dtype=torch.float64, device=params.device)
        for view, g in zip(sim.state.param_layout.views(out).values(), grads):
            if g is not None:
                view.copy_(g)
        return out

    @torch.no_grad()
    def measure(self, sim: "QMLHFLEngine", batch: Any, active: Tensor | None) -> None:
        """One measurement with this step's batch (one mini-batch per device row, or per training device)."""
        # every mini-batch of the step is a device's own data (the probe evaluates at the cloud model, so a device
        # that does not train in this step serves as well): sample among the batch's rows
        R = _batch_rows(batch)
        if R is None or R < 2:
            return
        k = min(self.options.rows, R)
        pick = torch.randperm(R, generator=generator(sim.seed, Stream.THEORY, sim.round))[:k].to(sim.device)
        sample = tree_map(lambda t: t.index_select(0, pick) if isinstance(t, Tensor) and t.dim() > 0
                          and t.shape[0] == R else t, batch)
        B = next((int(t.shape[1]) for t in tree_flatten(sample)[0] if isinstance(t, Tensor) and t.dim() > 1), 1)
        halves = B >= 2

        def split(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != k:
                return t
            if t.dim() == 1 or not halves:
                return torch.cat([t, t])
            h = t.shape[1] // 2
            return torch.cat([t[:, :h], t[:, h:2 * h]])

        two = tree_map(split, sample)
        N = sim.N
        w = sim.state.params[N][:1].expand(2 * k, -1).contiguous()
        buffers = sim.state.buffers[N][:1].expand(2 * k, -1)
        lr = sim.optimizer.lr
        devices = [sim.device] if sim.device.type == "cuda" else []
        # the template's integer buffers (BatchNorm's count, shared by all rows) stay as they were
        ints = [(b, b.clone()) for b in sim.module.buffers() if not b.is_floating_point()]
        with torch.random.fork_rng(devices=devices):
            g2 = self._grads(sim, w, buffers, two)
            g = (g2[:k] + g2[k:]) / 2
            w1 = (w[:k].to(torch.float64) - lr * g).to(w.dtype)
            g2_1 = self._grads(sim, torch.cat([w1, w1]), buffers, two)
        for b, saved in ints:
            b.copy_(saved)
        g1 = (g2_1[:k] + g2_1[k:]) / 2
        L_rows = path_smoothness(g, g1, w[:k], w1)
        finite = L_rows[torch.isfinite(L_rows)]
        sigma2 = float(minibatch_variance(g2[:k], g2[k:]).mean()) if halves else math.nan
        spread, zeta2 = heterogeneity(g, 0.0 if not halves else sigma2)
        L_max = float(finite.max()) if finite.numel() else math.nan
        stats = {"L_max": L_max, "L_mean": float(finite.mean()) if finite.numel() else math.nan, "sigma2": sigma2,
                 "spread": spread, "heterogeneity": zeta2 if halves else math.nan,
                 "grad_norm2": float(g.pow(2).sum(1).mean())}
        if math.isfinite(L_max):
            self.state[0] = L_max if math.isnan(float(self.state[0])) else max(float(self.state[0]), L_max)
        self.stats = {f"theory/{k_}": v for k_, v in stats.items()}
        self._check(sim, L_max)

    # ------------------------------------------------------------------ Eq. 15 at the measured constants
    def qs(self, sim: "QMLHFLEngine") -> list[float]:
        """q_n per layer: the latest realised compression error, or the compressor's bound before one was measured
        (the identity: 0)."""
        from .stages import MeasureCompression

        out = []
        for layer, comp in zip(sim.layers, sim.compressors):
            stage = layer.stage(MeasureCompression)
            last = None if stage is None else stage.last_error
            out.append(float(last) if last is not None else float(comp.variance_bound(sim.num_params)))
        return out

    def _check(self, sim: "QMLHFLEngine", L: float) -> None:
        if not math.isfinite(L) or L <= 0:
            return
        qs = self.qs(sim)
        bracket = lr_condition_bracket(list(sim.taus), qs, sim.hierarchy)
        mu_star = math.inf if bracket <= 0 else 1.0 / (L * math.sqrt(bracket))
        base = sim.optimizer.lr
        if self.options.adapt_lr is not None:
            self.state[1] = self.options.adapt_lr * mu_star
        lr = min(base, float(self.state[1]))
        value = 1.0 - L * L * lr * lr * bracket
        self.stats.update({"theory/mu_star": mu_star, "theory/lr_headroom": mu_star / lr if lr > 0 else math.inf,
                           "theory/eq15": value, "theory/lr": lr})
        if value <= 0 and self.options.warn and not bool(self.state[2]):
            self.state[2] = 1.0
            warnings.warn(
                f"round {sim.round}: with the measured constants (L = {L:.4g} along the path, q = "
                f"{[round(q, 4) for q in qs]}) the learning rate {lr:g} violates Eq. 15 "
                f"(1 - L^2 mu^2 * {bracket:.6g} = {value:.4g} <= 0); admissible: mu < {mu_star:.4g} "
                f"(theory.adapt_lr caps the step size there)", LearningRateWarning, stacklevel=2)

    # ------------------------------------------------------------------ the adaptive step size
    def cap_lr(self, sim: "QMLHFLEngine") -> list[float] | None:
        """Before a step: scale every parameter group's learning rate so that the first is at most the cap; returns
        the optimizer's own rates for :meth:`restore_lr` after the step (None: nothing capped). The optimizer keeps
        its own rates between steps (its schedule and checkpoints see them), so the cap is applied step by step."""
        cap = float(self.state[1])
        groups = sim.optimizer.optimizer.param_groups
        base = float(groups[0]["lr"])
        if self.options.adapt_lr is None or not math.isfinite(cap) or base <= cap:
            return None
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * (cap / base)
        return saved

    @staticmethod
    def restore_lr(sim: "QMLHFLEngine", saved: list[float] | None) -> None:
        if saved is not None:
            for g, lr in zip(sim.optimizer.optimizer.param_groups, saved):
                g["lr"] = lr

    def reset_round(self) -> None:
        self.stats = {}

    def round_stats(self) -> dict[str, float]:
        out = dict(self.stats)
        if self.stats:
            out["theory/L_run_max"] = float(self.state[0])
        return out
