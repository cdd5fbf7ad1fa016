"""The QMLHFL engine: the schedule of docs/algorithm.md#schedule with Eqs. 3-6, on stacked state.

One global round = prod(tau) local steps of every device. After local step k (1-based inside the round):

    for n = 1..N:
        if k % (tau_1 * ... * tau_n) != 0: break
        aggregate layer n (Eq. 4; Eq. 6 for n == N), then re-synchronise its subtree (Eq. 5)

Layers aggregate bottom-up inside one step, so layer 2 sees layer 1's fresh models. The engine owns the schedule
and the objects that hold state; what one aggregation does is its layer's chain of stages (:mod:`.layers`,
:mod:`.stages`), and every piece of state is declared in one :class:`~.state.StateRegistry`, which checkpoints,
loads and shards it.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .. import checks
from ..compressors import Compressor, Identity
from ..config import SimulationConfig
from ..federation.availability import Availability
from ..federation.clock import SimulatedClock
from ..federation.mobility import Mobility
from ..federation.participation import Participation
from ..federation.population import Population
from ..hierarchy import Hierarchy, TreeState
from ..kernels import Backend
from ..optimizers.device import DeviceOptimizer, trainable_parameters
from ..optimizers.server import ServerOptimizer
from ..rng import Stream, mix
from ..theory.latency import LatencyModel, default_latency, downlink_bits
from .cpu_alloc import retain_large_allocations
from .executors import LossFn, make_executor
from .guard import NonFiniteGuard, NonFiniteUpdateError
from .layers import BitCounter, PrivacyLedger, build_layer
from .solver_stages import LocalSolvers
from .stacked import ParamOrder, StackedState
from .stages import AggregationContext, ChangeTree, CompressAndSum, ServerStep
from .checkpointing import EngineCheckpointing
from .rows import RowIndexing
from .statistics import RoundStatistics
from .state import StateRegistry
from .tau_schedule import TauScheduler
from .theory_probe import ConstantsProbe

__all__ = ["QMLHFLEngine", "NonFiniteUpdateError", "StepResult", "gather_batch"]


def gather_batch(data: Tensor, idx: Tensor) -> Tensor:
    """``data[idx]`` for an index tensor [N_tot, B] into the first dimension: one ``index_select`` over the
    flattened indices (faster than advanced indexing on CPU, bench/RESULTS.md; same values)."""
    return data.index_select(0, idx.reshape(-1)).view(*idx.shape, *data.shape[1:])


@dataclass
class StepResult:
    """Outcome of one local step of every device."""

    losses: Tensor  # [N_tot] (or one per training device) training loss of this step
    aux: dict[str, Tensor]  # per-device auxiliary scalars {name: [N_tot]} (or one per training device)
    aggregated: list[int] = field(default_factory=list)  # layers n that aggregated after this step, bottom-up
    round_completed: bool = False  # True when the cloud aggregated (a global round ended)
    devices: Tensor | None = None  # the devices that trained (indices; None = all): losses/aux are theirs


class QMLHFLEngine(EngineCheckpointing, RowIndexing, RoundStatistics):
    """Simulates QMLHFL for one model template on stacked state.

    Args:
        module: the model template; its current weights initialise every node. It is used as the functional
            skeleton for all devices and is not trained directly (call :meth:`load_cloud_into` to read w_t).
        loss_fn: ``loss_fn(module, batch) -> loss`` (or a dict with "loss", or (loss, {name: scalar})), run on
            each device's weights and mini-batch.
        config: the :class:`~lightning_qmlhfl.config.SimulationConfig` (the tree, per-layer tau, compressors,
            server optimizers, participation, seed, executor, backend, ...; its docstring lists every option).
            Instead of ``config``, the simulation options may be given as keywords (``hierarchy``, ``taus``,
            ``compressors`` or ``quantizers``, ``server_optimizers``, ``participation``, ``executor``, ``seed``,
            ``backend``, ``param_order``, ``availability``, ``latency``, ``mobility``, ``device_rng``,
            ``forwards``), which build it; here compressors default to 32-bit uploads.
        optimizer: an element-wise torch optimiser class (or its name) and ``optimizer_kwargs`` (lr = mu, ...).
        device_mass: optional float [N_tot] (e.g. local sample counts) for ``weighting: samples``;
            default: every device weighs 1, so weights are |C(child)| / |C(parent)|.
        device: where the stacks live (default: the module's device).
        param_groups: optional ``[{"params": [parameter names], "lr": ..., ...}, ...]``: per-group
            hyperparameters of the device optimiser, as torch parameter groups. Parameters in no group are frozen.
            Default: one group of every parameter with ``optimizer_kwargs``.
        grad_clip: optional ``("norm", max_norm)`` or ``("value", clip_value)``: each device's own gradient is
            clipped before its update (:class:`~lightning_qmlhfl.optimizers.device.DeviceOptimizer`).
        shard, comm: run one rank of a simulation split over processes (:mod:`lightning_qmlhfl.distribution.shard`):
            this engine holds the rows of its :class:`~lightning_qmlhfl.distribution.shard.Shard` and exchanges the
            uploads into the layer above the cut through ``comm`` (:mod:`lightning_qmlhfl.distribution.comm`);
            everything else is replicated. With the default exchange the result is bit-identical to one process.

    Only the devices that take part in a step compute it (their rows are gathered into a compact stack, trained
    and written back); :meth:`upcoming_devices` says which, and a batch may hold just their rows.

    Frozen parameters (in no group, or ``requires_grad=False``) are not stacked, trained, sent or counted in the
    bits: every device uses the template's copy.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        hierarchy: Hierarchy | None = None,
        taus: Sequence[int] | None = None,
        compressors: Sequence[Compressor | int | str | None] | None = None,
        optimizer: Any = torch.optim.SGD,
        optimizer_kwargs: dict[str, Any] | None = None,
        executor: str | None = None,
        seed: int | None = None,
        device_mass: Tensor | None = None,
        backend: Backend | None = None,
        device: torch.device | str | None = None,
        param_order: ParamOrder | None = None,
        param_groups: Sequence[dict[str, Any]] | None = None,
        grad_clip: tuple[str, float] | None = None,
        quantizers: Sequence[Compressor | int | str | None] | None = None,
        server_optimizers: Sequence[ServerOptimizer | str | dict] | ServerOptimizer | str | None = None,
        participation: Sequence[Participation | str | dict] | Participation | str | None = None,
        availability: Availability | None = None,
        latency: LatencyModel | None = None,
        mobility: Mobility | dict | None = None,
        shard: Any = None,
        comm: Any = None,
        device_rng: str | None = None,
        forwards: str | None = None,
        *,
        config: SimulationConfig | None = None,
    ) -> None:
        options = dict(hierarchy=hierarchy, taus=taus, compressors=compressors, quantizers=quantizers,
                       executor=executor, seed=seed, backend=backend, param_order=param_order,
                       server_optimizers=server_optimizers, participation=participation, availability=availability,
                       latency=latency, mobility=mobility, device_rng=device_rng, forwards=forwards)
        given = {k: v for k, v in options.items() if v is not None}
        if config is None:
            if hierarchy is None:
                raise ValueError("QMLHFLEngine needs the hierarchy (or config=SimulationConfig(...))")
            config = SimulationConfig.build(default_compressor=Identity(), **given)
        elif given:
            raise ValueError(f"give config= or the simulation options {sorted(given)}, not both")
        self.config = checks.instance(config, "config", SimulationConfig)
        self.hierarchy = hierarchy = config.hierarchy
        self.N = hierarchy.num_layers
        self.module = module
        # --- where the rows live: all of them, or one rank's share (shard)
        self.shard, self.comm = shard, comm
        if shard is not None:
            if shard.hierarchy is not hierarchy:
                raise ValueError("the shard must be built from this engine's hierarchy")
            if comm is None:
                raise ValueError("a sharded engine needs a communicator (comm=)")
            if not config.mobility.is_static:
                raise ValueError("mobility with a multi-process run is not supported: a device moving to an edge "
                                 "server of another rank would have to move its rows between processes")
            if config.theory is not None:
                raise ValueError("theory=measure runs in one process: the probe's samples and the adaptive step size "
                                 "would differ between ranks (use strategy=qmlhfl)")
            if config.tau_schedule is not None:
                raise ValueError(f"tau_schedule={config.tau_schedule!r} runs in one process: each rank would adapt tau to its "
                                 f"own devices' loss (use strategy=qmlhfl)")
            if config.uses_trust_stages:
                raise ValueError("privacy, robust aggregation and attacks run in one process: a multi-process run "
                                 "with them is not supported (use strategy=qmlhfl; the stacked rows make one "
                                 "process fast)")
        self.rows = [torch.arange(hierarchy.nodes_per_layer[m]) if shard is None else shard.rows(m)
                     for m in range(self.N + 1)]
        self._local = [None if shard is None else shard.local_index(m) for m in range(self.N + 1)]
        # --- the stacked models, the executor, every device's optimizer
        trainable, groups = trainable_parameters(module, param_groups)
        self.state = StackedState(module, hierarchy, device, config.param_order, trainable,
                                  rows_per_layer=[int(r.numel()) for r in self.rows])
        for c in config.compressors:
            c.check_dims(self.state.num_params)
        self.device = self.state.device
        self.work_dtype = torch.float64 if self.state.dtype == torch.float64 else torch.float32
        if self.device.type == "cpu":
            retain_large_allocations()  # per-step temporaries of 10s-100s of MB: reuse, don't re-fault (cpu_alloc)
        self.executor = make_executor(config.executor, module, loss_fn, self.state.param_layout,
                                      self.state.buffer_layout, self.device, forwards=config.forwards)
        self.optimizer = DeviceOptimizer(self.state.params[0], optimizer, optimizer_kwargs or {"lr": 0.01},
                                         layout=self.state.param_layout, groups=groups, clip=grad_clip)
        # --- the tree (it may change: mobility), its weights and resync maps; who takes part, and when
        self.tree = TreeState(hierarchy)
        self._device_mass = device_mass
        self.home = self.tree.parent_index(0).clone()  # every device's edge server, failures aside
        self.parent_index: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.ancestors: list[list[Tensor]] = []
        self.refresh_tree()
        self._taus = config.taus  # the current tau (an adaptive schedule changes them between rounds)
        self.latency = config.latency if config.latency is not None else default_latency(self.N)
        down = None
        if self.latency.slowest_downlink_rates is not None:
            down = [downlink_bits(self.state.num_params + self.state.num_buffer_elems)] * self.N
        self.clock = SimulatedClock(self.tree, self.latency, [self.upload_bits(n) for n in range(1, self.N + 1)],
                                    down)
        self.population = Population(self.tree, self.taus, config.participation, config.availability, self.clock,
                                     self.seed)
        mobility = config.mobility
        if not mobility.is_static:
            self.population.mid_period = mobility.mid_period
            self.population.trivial = False  # edge servers may be left without devices: they must not upload
        # --- the aggregation layers, their observers and the declared state
        self.guard = NonFiniteGuard(self.rows, comm, lambda: (self.round, self.step_in_round))
        self.bits = BitCounter(self)
        self.privacy = PrivacyLedger(config) if any(not p.is_off for p in config.privacy) else None
        self.change_tree = None if mobility.is_static else ChangeTree(mobility)
        self.solvers = LocalSolvers(list(config.local_solvers))
        self.layers = [build_layer(n, config.layers[n - 1], self.state.num_buffer_elems > 0, self.change_tree,
                                   config.compression_warning, self.solvers, config.theory)
                       for n in range(1, self.N + 1)]
        self.registry = StateRegistry()
        self._register_state()
        self.probe = None if config.theory is None else ConstantsProbe(config.theory)  # docs: measured-constants
        if self.probe is not None:
            self.probe.bind(self)
        self.tau_schedule = None if config.tau_schedule is None else TauScheduler(config.tau_schedule, config.taus)
        if self.tau_schedule is not None:
            self.tau_schedule.bind(self)
        for layer in self.layers:
            layer.bind(self)
        self.solvers.bind(self)
        if self.solvers.corrects_gradients:  # the solvers correct every device's gradient
            self.optimizer.grad_hook = partial(self.solvers.correct_gradients, self)
        # --- the schedule
        self._period = [math.prod(self.taus[:n]) for n in range(1, self.N + 1)]
        self.steps_per_round = self._period[-1]
        self.round = 0  # completed global rounds
        self.step_in_round = 0  # local steps done in the current round
        self.total_steps = 0
        self.events_in_round = [0] * self.N  # aggregations of layer n done in this round (RNG event index)
        self.aggregation_counts = [0] * self.N  # cumulative aggregations per layer
        self._grads: Tensor | list[Tensor | None] | None = None  # accumulated gradients of the current step
        self._step_losses: list[Tensor] = []
        self._step_aux: list[dict[str, Tensor]] = []
        self._compact: tuple[Tensor, Tensor, Tensor] | None = None  # (rows, params, buffers) of a partial period
        self.last_round_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ the options (one source: the config)
    @property
    def taus(self) -> tuple[int, ...]:
        return self._taus

    def set_taus(self, taus: Sequence[int]) -> None:
        """New intra-layer counts from the next global round on (an adaptive schedule: schedules.py)."""
        if self.step_in_round:
            raise RuntimeError(f"set_taus inside a global round (local step {self.step_in_round}): only between rounds")
        self._taus = tuple(int(t) for t in taus)
        self._period = [math.prod(self._taus[:n]) for n in range(1, self.N + 1)]
        self.steps_per_round = self._period[-1]
        self.population.period = list(self._period)

    @property
    def compressors(self) -> tuple[Compressor, ...]:
        return self.config.compressors

    @property
    def quantizers(self) -> tuple[Compressor, ...]:
        """The per-layer compressors (the earlier name)."""
        return self.config.compressors

    @property
    def server_optimizers(self) -> tuple[ServerOptimizer, ...]:
        return self.config.server_optimizers

    @property
    def participation(self) -> tuple[Participation, ...]:
        return self.config.participation

    @property
    def mobility(self) -> Mobility:
        return self.config.mobility

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def device_rng(self) -> str:
        return self.config.device_rng

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        return self.state.num_params

    @property
    def executor_name(self) -> str:
        return self.executor.name

    @property
    def memory(self) -> list[Tensor | None]:
        """Per layer n (index n-1): the error-feedback memory of its senders [rows, P], or None without EF."""
        return [layer.stage(CompressAndSum).memory for layer in self.layers]

    @property
    def server_state(self) -> list[dict[str, Tensor] | None]:
        """Per layer n (index n-1): the server optimizer's state of its nodes, or None for Average."""
        out = []
        for layer in self.layers:
            stage = layer.stage(ServerStep)
            out.append(None if stage is None else stage.state)
        return out

    @property
    def bits_sent(self) -> list[int]:
        """Cumulative upload bits into layer n (index n-1)."""
        return self.bits.bits_sent

    @property
    def baseline_bits(self) -> list[int]:
        """The same uploads at 32 bits per number."""
        return self.bits.baseline_bits

    @property
    def round_bits(self) -> list[int]:
        """Upload bits of the current (or just completed) round, per layer."""
        return self.bits.round_bits

    def upload_bits(self, n: int) -> int:
        """Bits of one upload into layer n (:func:`lightning_qmlhfl.compressors.upload_bits`: the parameters
        compressed by C_n, float buffers at 32 bits)."""
        return self.config.layers[n - 1].upload_bits(self.state.num_params, self.state.num_buffer_elems)

    def upload_baseline_bits(self, n: int) -> int:
        return 32 * (self.state.num_params + self.state.num_buffer_elems)

    # ------------------------------------------------------------------ the schedule
    def local_step(self, batch: Any) -> StepResult:
        """Eq. 3 for every device on its mini-batch (leading dim N_tot), then the aggregations that fall due."""
        self.compute_gradients(batch)
        return self.apply_step()

    @property
    def sim_time(self) -> float:
        """Simulated seconds at the end of the last completed global round."""
        return self.clock.now

    def upcoming_global_devices(self) -> Tensor | None:
        """The devices (global indices) that train in the next local step, on every rank, or None for all: the
        draws of the periods that start with it are made here (once per step)."""
        return self.population.begin_step(self.round, self.step_in_round, self.total_steps)

    def upcoming_devices(self) -> Tensor | None:
        """The devices of this engine's rows that train in the next local step (int64 indices into the device
        rows), or None for all of them."""
        active = self.local_rows(0, self.upcoming_global_devices())
        return None if active is None else active.to(self.device)

    def compute_gradients(self, batch: Any, loss_scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Every training device's gradient of ``loss_scale`` x its loss on its mini-batch, added to the gradients
        of the current step (several calls before one :meth:`apply_step` = gradient accumulation over mini-batches).
        ``batch``: one mini-batch per device (leading dimension N_tot) or per training device (that of
        :meth:`upcoming_devices`). Returns the per-device losses and auxiliary values {name: [...]} of the
        training devices."""
        s = self.state
        active = self.upcoming_devices()
        if self.probe is not None and self.probe.due(self):
            self.probe.measure(self, batch, active)
        if self.device_rng == "stream":  # every device's forward draws from its own (seed, device, step) stream
            ids = self.rows[0] if active is None else self.rows[0][active.cpu()]
            micro = len(self._step_losses)
            self.executor.row_seeds = [mix(self.seed, Stream.DEVICE_RNG, int(i), self.total_steps, micro)
                                       for i in ids.tolist()]
        if active is None:
            if self._rows_from_parents() and not self._step_losses:
                self._materialise_devices()
            grads, losses, aux = self.executor(s.params[0], s.buffers[0], batch, loss_scale)
        else:
            if self._compact is None:
                self._compact = self._gather_devices(active)
            rows, p_c, b_c = self._compact
            batch = tree_map(lambda t: t.index_select(0, rows) if isinstance(t, Tensor)
                             and t.shape[:1] == (s.params[0].shape[0],) and rows.numel() != t.shape[0] else t, batch)
            if rows.numel() == 0:
                grads, losses, aux = [None] * len(self.optimizer.columns), p_c.new_zeros(0), {}
            else:
                grads, losses, aux = self.executor(p_c, b_c, batch, loss_scale)
        if self._grads is None:
            self._grads = grads
        elif isinstance(grads, Tensor):
            self._grads.add_(grads)  # type: ignore[union-attr]
        else:
            self._grads = [a if b is None else b if a is None else a.add_(b) for a, b in zip(self._grads, grads)]
        self._step_losses.append(losses)
        self._step_aux.append(aux)
        return losses, aux

    def apply_step(self, scaler: Any = None) -> StepResult:
        """The update of Eq. 3 with the accumulated gradients, then the aggregations that fall due. ``scaler``: the
        ``torch.amp.GradScaler`` whose scale the losses were multiplied by (mixed precision), or None."""
        if self._grads is None:
            raise RuntimeError("apply_step() without gradients: call compute_gradients(batch) first")
        grads, self._grads = self._grads, None
        losses = self._step_losses[0] if len(self._step_losses) == 1 else torch.stack(self._step_losses).mean(0)
        aux = self._step_aux[-1]
        self._step_losses, self._step_aux = [], []
        devices = None
        capped = None if self.probe is None else self.probe.cap_lr(self)  # the adaptive step size (theory.adapt_lr)
        if self._compact is None:
            self.optimizer.step(grads, scaler=scaler)
        else:
            rows, p_c, _ = self._compact
            devices = rows
            if rows.numel():
                self.optimizer.step_rows(rows, p_c, grads, scaler)
            if (self.step_in_round + 1) % self._period[0] == 0:  # the period ends: its uploads are read next
                self.flush_devices()
        if self.tau_schedule is not None:
            self.tau_schedule.on_step(losses)
        if self.solvers.any_active:
            self.solvers.after_step(self.optimizer.lr, devices)
        if capped is not None:
            self.probe.restore_lr(self, capped)
        self.population.after_step()
        self.step_in_round += 1
        self.total_steps += 1
        k = self.step_in_round
        if self.step_in_round == 1:
            self.bits.on_round_start()
        done: list[int] = []
        for n in range(1, self.N + 1):
            if k % self._period[n - 1] != 0:
                break
            self._aggregate(n)
            done.append(n)
        completed = k == self.steps_per_round
        if completed:
            self.round += 1
            self.step_in_round = 0
            self.events_in_round = [0] * self.N
            self.last_round_stats = self.round_stats()
            if self.tau_schedule is not None:
                self.last_round_stats.update(self.tau_schedule.on_round_end(self))
            self.population.reset_stats()
            if self.change_tree is not None:
                self.change_tree.moves = self.change_tree.failures = 0
            for layer in self.layers:
                for stage in layer.stages:
                    stage.reset_round()
            if self.probe is not None:
                self.probe.reset_round()
        return StepResult(losses=losses, aux=aux, aggregated=done, round_completed=completed, devices=devices)

    @torch.no_grad()
    def _aggregate(self, n: int) -> None:
        """Eq. 4 at layer n (Eq. 6 when n == N) for all its nodes, then Eq. 5 down its subtrees: the layer's
        chain of stages, then its observers."""
        ctx = AggregationContext(layer=n, round=self.round, event=self.events_in_round[n - 1],
                                 step=self.step_in_round)
        ctx = self.layers[n - 1].aggregate(self, ctx)
        self.events_in_round[n - 1] += 1
        self.aggregation_counts[n - 1] += 1
        self.solvers.after_aggregate(n)
        self.bits.on_aggregate(self, ctx)

    def run_round(self, next_batch: Callable[[], Any]) -> list[StepResult]:
        """Run local steps until the current global round completes; ``next_batch()`` supplies each step's batch."""
        out = []
        while True:
            r = self.local_step(next_batch())
            out.append(r)
            if r.round_completed:
                return out

    # ------------------------------------------------------------------ reading the models
    def cloud_params(self) -> Tensor:
        """w_t: the cloud model's flat parameters [P]."""
        return self.state.cloud_params()

    @torch.no_grad()
    def load_cloud_into(self, module: nn.Module | None = None) -> nn.Module:
        """Copy the cloud model (parameters and float buffers) into ``module`` (default: the template)."""
        module = self.module if module is None else module
        self.state.load_row_into(module, self.N, 0)
        return module

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

