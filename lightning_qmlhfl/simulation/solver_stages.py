"""The local solvers (:mod:`lightning_qmlhfl.optimizers.local_solvers`) on the stacked rows: their declared state,
the correction of the devices' gradients, the stages they add to the aggregation chains (docs/algorithm.md#local-solvers).

A solver at layer n keeps rows of layer n-1 (its children) and of layer n (its parents) and acts in three places:

1. during the period, on the children's way from their anchor a_c (the parent's model, which does not change
   during the child's period): in every local step of every device below the child, by a term added to the
   device's gradient (:meth:`LocalSolvers.correct_gradients`, called by the device optimizer after unscaling,
   before clipping). At n = 1 the child is the device; at n > 1 a node of layer n-1 moves only through the steps
   of its devices, so its correction is theirs (the mean over its devices of mu (w_i - a_c) is mu (v_c - a_c));
   ADMM above ADMM is the exception: the child's model is then a consensus variable of the layer below, which
   :class:`ADMMConsensusStep` updates in closed form with this layer's dual and penalty (layer n-1's chain, after
   the sum, before the re-synchronisation);
2. at the layer-n aggregation, :class:`SolverUpload` (right after the uploads are selected): the drift
   ||y_c - a_c|| of the uploads is measured, SCAFFOLD's variates are updated and their deltas summed into the
   parents, ADMM's duals are updated and each child's row is set to a_c + (its augmented model's change), which the
   layer's compression and sum then carry up with the fixed weights of the tree;
3. the sums of learning rates SCAFFOLD's variates are scaled with (:meth:`LocalSolvers.after_step`): per device
   over its own steps in the period (layer 1, whose stragglers take fewer steps), and per layer over the steps
   since its last aggregation.

Every tensor is a declared row stack (``solver/...`` in the state registry), kept in the work dtype (fp32 under
bf16-mixed), checkpointed, sharded with its layer's rows, indexed by the device (so a device that moves keeps its
own rows) and touched only for the rows that take part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..compressors import Compressor, Identity, make_compressor
from ..optimizers.local_solvers import ADMM, FedProx, LocalSolver, Scaffold
from ..rng import Stream, mix, row_seeds
from .stages import AggregationContext, Stage, sum_into_parents

if TYPE_CHECKING:
    from .engine import QMLHFLEngine

__all__ = ["LocalSolvers", "SolverUpload", "ADMMConsensusStep"]


class _LayerSolver:
    """The state and arithmetic of one layer's solver (module docstring)."""

    def __init__(self, solver: LocalSolver, layer: int, below: LocalSolver | None = None) -> None:
        self.solver, self.layer = solver, layer
        self.active = not solver.is_plain
        # ADMM above ADMM: the child's model is layer n-1's consensus update, which takes this layer's terms
        # (ADMMConsensusStep) instead of the devices' gradients
        self.in_gradients = self.active and not (isinstance(solver, ADMM) and isinstance(below, ADMM))
        self.drift_sum, self.drift_count = 0.0, 0

    def bind(self, sim: "QMLHFLEngine") -> None:
        n, s = self.layer, self.solver
        child_rows, parent_rows = sim.state.params[n - 1].shape, sim.state.params[n].shape

        def rows(shape: torch.Size, name: str, layer: int, init: Tensor | None = None) -> Tensor:
            t = torch.zeros(shape, dtype=sim.work_dtype, device=sim.device) if init is None else init
            return sim.registry.register_rows(f"solver/{n}/{name}", t, layer)

        if isinstance(s, Scaffold):
            self.c_child = rows(child_rows, "variate_children", n - 1)
            self.c_parent = rows(parent_rows, "variate_parents", n)
            compressor = sim.config.compressors[n - 1]
            self.variate_compressor: Compressor = Identity() if s.variates == "full" else make_compressor(
                {**compressor.to_config(), "error_feedback": None})
        elif isinstance(s, ADMM):
            self.dual = rows(child_rows, "dual", n - 1)
            # the augmented models u_c = y_c + lambda_c / rho as last uploaded: the initial model (lambda = 0)
            self.augmented = rows(child_rows, "augmented", n - 1,
                                  sim.state.params[n - 1].to(sim.work_dtype).clone())
            if not self.in_gradients:  # the children's consensus u_bar (the initial model)
                self.consensus = rows(child_rows, "consensus", n - 1,
                                      sim.state.params[n - 1].to(sim.work_dtype).clone())

    # ------------------------------------------------------------------ 1. during the period
    def gradient_correction(self, sim: "QMLHFLEngine", rows: Tensor | None, w: Tensor) -> Tensor:
        """The term added to the gradients of the device rows ``rows`` (None: all) at parameters ``w``: layer n's
        correction of each device's layer-(n-1) ancestor c (the device itself at n = 1) towards its parent p."""
        n, s = self.layer, self.solver
        to_parent = sim.ancestors[n - 1][0]
        to_child = None if n == 1 else sim.ancestors[n - 2][0]
        if rows is not None:
            to_parent = to_parent.index_select(0, rows)
            to_child = rows if to_child is None else to_child.index_select(0, rows)
        if isinstance(s, Scaffold):
            own = self.c_child if to_child is None else self.c_child.index_select(0, to_child)
            return self.c_parent.index_select(0, to_parent) - own
        d = w.to(sim.work_dtype) - sim.state.params[n].index_select(0, to_parent).to(sim.work_dtype)
        if isinstance(s, FedProx):
            return d.mul_(s.mu)
        d.mul_(s.rho)  # ADMM: lambda_c + rho (w - a)
        return d.add_(self.dual if to_child is None else self.dual.index_select(0, to_child))

    @torch.no_grad()
    def consensus_step(self, sim: "QMLHFLEngine", ctx: AggregationContext, before: Tensor) -> None:
        """ADMM at layer n above ADMM at layer n-1: layer n-1's consensus models (the nodes that received uploads)
        z = argmin_z (rho_{n-1}/2)||z - u_bar||^2 + <lambda, z - a> + (rho_n/2)||z - a||^2, where u_bar, the
        weighted sum of the children's augmented models, has moved by what the aggregation added (the model rows
        ``before`` it)."""
        m = self.layer - 1
        z = sim.state.params[m]
        self.consensus += z.to(sim.work_dtype) - before
        rows = None if ctx.received is None else torch.nonzero(ctx.received).flatten()
        if rows is not None and rows.numel() == 0:
            return
        idx = sim.parent_index[m] if rows is None else sim.parent_index[m].index_select(0, rows)
        a = sim.state.params[m + 1].index_select(0, idx).to(sim.work_dtype)
        ubar = self.consensus if rows is None else self.consensus.index_select(0, rows)
        lam = self.dual if rows is None else self.dual.index_select(0, rows)
        r_below, r = sim.config.local_solvers[m - 1].rho, self.solver.rho  # type: ignore[attr-defined]
        new = (r_below * ubar + r * a - lam) / (r_below + r)
        if rows is None:
            z.copy_(new.to(z.dtype))
        else:
            z[rows] = new.to(z.dtype)

    # ------------------------------------------------------------------ 2. at the layer-n aggregation
    @torch.no_grad()
    def upload(self, sim: "QMLHFLEngine", ctx: AggregationContext, lr_sums: Tensor | float) -> AggregationContext:
        """Drift, then the solver's update of its rows and of what the uploads carry. ``lr_sums``: the learning
        rates summed over the period, per child row (float64 [rows]) or one number for all."""
        n = ctx.layer
        child, parent = sim.state.params[n - 1], sim.state.params[n]
        rows = ctx.uploads if ctx.uploads is not None else torch.arange(child.shape[0], device=child.device)
        if rows.numel() == 0:
            return ctx
        idx = sim.parent_index[n - 1].index_select(0, rows)
        y = child.index_select(0, rows).to(sim.work_dtype)
        a = parent.index_select(0, idx).to(sim.work_dtype)
        if self.solver.measures_drift:
            self.drift_sum += float(torch.linalg.vector_norm(y - a, dim=1, dtype=torch.float64).sum())
            self.drift_count += int(rows.numel())
        s = self.solver
        if isinstance(s, Scaffold):
            c_p = self.c_parent.index_select(0, idx)
            if isinstance(lr_sums, Tensor):
                S = lr_sums.index_select(0, rows.cpu()).to(device=y.device, dtype=y.dtype).unsqueeze(1)
            else:
                S = torch.full((1, 1), lr_sums, dtype=y.dtype, device=y.device)
            # x = c_child_new + c_parent - c_child = (a - y) / S; a row that took no step (S = 0) keeps its
            # variate (x = c_parent: a zero delta)
            x = torch.where(S > 0, (a - y) / torch.where(S > 0, S, torch.ones_like(S)), c_p)
            self.c_child[rows] += x - c_p
            full = torch.zeros_like(self.c_child)  # the kernel reads the sender rows of a full-size stack
            full[rows] = x
            seeds = row_seeds(mix(sim.seed, Stream.SOLVER), ctx.round, n, ctx.event,
                              sim.hierarchy.nodes_per_layer[n - 1])
            if sim.shard is not None:
                seeds = seeds[sim.rows[n - 1]]
            sum_into_parents(sim, ctx, self.c_parent, full, self._tree_weights(sim, n), self.variate_compressor,
                             seeds, what="control variates")
            return ctx
        if isinstance(s, ADMM):
            self.dual[rows] += s.rho * (y - a)
            u = y + self.dual.index_select(0, rows) / s.rho
            delta = u - self.augmented.index_select(0, rows)
            self.augmented[rows] = u
            child[rows] = (a + delta).to(child.dtype)  # the upload x_c = child - parent is the change of u_c
            # the parent adds sum_c w_c delta_c with the tree's weights: the children that stay away keep their
            # share of the consensus (FedADMM), so no renormalisation over the uploads
            return ctx.replace(weights=self._tree_weights(sim, n))
        return ctx

    @staticmethod
    def _tree_weights(sim: "QMLHFLEngine", n: int) -> Tensor:
        w = sim.weights[n - 1]
        return w if sim.shard is None else w[sim.rows[n - 1].to(w.device)]


class SolverUpload(Stage):
    """Layer n's solver at its aggregation (module docstring, 2.), right after the uploads are selected. Round
    statistic: the drift, mean ||y_c - a_c|| over the round's uploads (``drift_layer{n}``; NaN in a round without
    uploads), summed over the ranks in a multi-process run."""

    summed = ("drift_sum", "drift_count")

    def __init__(self, owner: "LocalSolvers", solver: _LayerSolver) -> None:
        self.owner, self.solver = owner, solver

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        return self.solver.upload(sim, ctx, self.owner.period_lr(ctx.layer))

    @property
    def drift_sum(self) -> float:
        return self.solver.drift_sum

    @property
    def drift_count(self) -> int:
        return self.solver.drift_count

    def round_stats(self, sums: dict[str, float]) -> dict[str, float]:
        count = sums["drift_count"]
        return {f"drift_layer{self.layer}": sums["drift_sum"] / count if count else float("nan")}

    def reset_round(self) -> None:
        self.solver.drift_sum, self.solver.drift_count = 0.0, 0

    def __repr__(self) -> str:
        return f"SolverUpload({self.solver.solver!r})"


class ADMMConsensusStep(Stage):
    """ADMM at layer n+1 over ADMM at layer n: the consensus update of layer n's new models (module docstring), in
    layer n's chain before the re-synchronisation; :meth:`snapshot` (a stage placed before the compression) keeps
    the models as they were before the aggregation."""

    def __init__(self, solver: _LayerSolver) -> None:
        self.solver = solver
        self.before: Tensor | None = None

    def snapshot(self) -> "Stage":
        outer = self

        class Snapshot(Stage):
            def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
                outer.before = sim.state.params[ctx.layer].to(sim.work_dtype).clone()
                return ctx

            def __repr__(self) -> str:
                return "ADMMConsensusSnapshot()"

        return Snapshot()

    def apply(self, sim: "QMLHFLEngine", ctx: AggregationContext) -> AggregationContext:
        self.solver.consensus_step(sim, ctx, self.before)
        self.before = None
        return ctx

    def __repr__(self) -> str:
        return f"ADMMConsensusStep({self.solver.solver!r})"


class LocalSolvers:
    """Every layer's solver of one simulation and the learning-rate sums they are scaled with (module docstring);
    their round statistics are their upload stages'."""

    def __init__(self, solvers: list[LocalSolver]) -> None:
        self.layers = [_LayerSolver(s, n, solvers[n - 2] if n > 1 else None) for n, s in enumerate(solvers, start=1)]
        self.N = len(solvers)
        self.lr_since = [0.0] * self.N  # per layer m: device learning rates summed since m's last aggregation
        self.device_lr: Tensor | None = None  # per device row: its own learning rates summed over its period

    @property
    def any_active(self) -> bool:
        return any(s.active for s in self.layers)


    def upload_stage(self, n: int) -> SolverUpload | None:
        s = self.layers[n - 1]
        return SolverUpload(self, s) if s.active or s.solver.measures_drift else None

    def consensus_stage(self, n: int) -> "ADMMConsensusStep | None":
        """The stage layer n's chain runs for layer n+1's ADMM when layer n runs ADMM too (None otherwise)."""
        if n >= self.N or self.layers[n].in_gradients or not self.layers[n].active:
            return None
        return ADMMConsensusStep(self.layers[n])

    @property
    def corrects_gradients(self) -> bool:
        return any(s.in_gradients for s in self.layers)

    def bind(self, sim: "QMLHFLEngine") -> None:
        if not self.any_active:
            return
        lrs = {float(g["lr"]) for g in sim.optimizer.optimizer.param_groups}
        if len(lrs) > 1:
            raise ValueError(f"local solvers {[repr(s.solver) for s in self.layers if s.active]} scale their "
                             f"corrections with the devices' learning rate, but the parameter groups have several "
                             f"({sorted(lrs)}): use one learning rate")
        for s in self.layers:
            if s.active:
                s.bind(sim)

        def load_since(v: list[float]) -> None:
            self.lr_since = [float(x) for x in v]

        sim.registry.register("solver/lr_since", lambda: list(self.lr_since), load_since)
        if isinstance(self.layers[0].solver, Scaffold):
            self.device_lr = sim.registry.register_rows(
                "solver/device_lr", torch.zeros(sim.state.params[0].shape[0], dtype=torch.float64), 0)

    # ------------------------------------------------------------------ hooks the engine calls
    def correct_gradients(self, sim: "QMLHFLEngine", grads: list[Tensor | None], rows: Tensor | None,
                          params: Tensor) -> None:
        """Add every layer's correction to the gradients (one per optimizer column, [R, *shape]) of the device rows
        ``rows`` (None: all) at their parameters ``params`` [R, P]."""
        d = None
        for s in self.layers:
            if s.in_gradients:
                t = s.gradient_correction(sim, rows, params)
                d = t if d is None else d.add_(t)
        if d is None:
            return
        layout = sim.optimizer.layout
        parts = [d] if layout is None else list(layout.views(d).values())
        for g, p in zip(grads, parts):
            if g is not None:
                g.add_(p.to(g.dtype))

    def after_step(self, lr: float, devices: Tensor | None) -> None:
        """One local step was taken by ``devices`` (local rows; None: all) at learning rate ``lr``."""
        for m in range(self.N):
            self.lr_since[m] += lr
        if self.device_lr is not None:
            if devices is None:
                self.device_lr += lr
            else:
                self.device_lr[devices.cpu()] += lr

    def period_lr(self, n: int) -> Tensor | float:
        """The learning rates summed over the period that layer n's aggregation closes: per device row at n = 1
        (each device its own steps), else one number."""
        if n == 1 and self.device_lr is not None:
            return self.device_lr
        return self.lr_since[n - 1]

    def after_aggregate(self, n: int) -> None:
        self.lr_since[n - 1] = 0.0
        if n == 1 and self.device_lr is not None:
            self.device_lr.zero_()

    def __repr__(self) -> str:
        return f"LocalSolvers({[s.solver for s in self.layers]!r})"
