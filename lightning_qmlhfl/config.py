"""One simulation's options, defined, documented and validated in one place.

:class:`SimulationConfig` (frozen) holds everything that describes a QMLHFL simulation, with one
:class:`LayerConfig` per aggregation layer n = 1..N (what happens on the uplinks into layer n). The strategy, its
DDP variant and the engine all take it; their keyword arguments (``QMLHFLStrategy(hierarchy=..., taus=...)``)
build one with :meth:`SimulationConfig.build`, which also accepts config values (an int s for QSGD, names, dicts)
and one value for every layer where a list of N is expected. Checkpoints store :meth:`SimulationConfig.identity`:
plain data, compared on resume.

Every option, its default and what it means:

- ``hierarchy``: the tree (:class:`~lightning_qmlhfl.hierarchy.Hierarchy`); default ``Hierarchy.balanced([4, 5,
  5])``, 100 devices, N = 3.
- per layer (``layers[n - 1]``, or the list arguments of :meth:`~SimulationConfig.build`):
  ``tau`` (tau_n >= 1; default [5, 2, 2] for the default tree, else 2 everywhere), ``compressor`` (C_n on the
  uploads into layer n, :mod:`lightning_qmlhfl.compressors`; default QSGD(8)), ``server_optimizer``
  (:mod:`lightning_qmlhfl.optimizers.server`; default Average, the paper's Eq. 4/6), ``participation``
  (:mod:`lightning_qmlhfl.federation.participation`: which children of every node of layer n take part in each of
  its periods; default Full), ``clip_norm`` (each sender's model difference clipped to this L2 norm before
  compression; default None, no clipping), ``local_solver`` (:mod:`lightning_qmlhfl.optimizers.local_solvers`:
  FedProx, SCAFFOLD or ADMM between layer n-1 and layer n; default LocalSGD, the paper's), ``privacy``
  (:mod:`lightning_qmlhfl.privacy`: Gaussian DP on the uploads into layer n, noise added by each sender or by the
  aggregating node; default NoPrivacy), ``robust`` (:mod:`lightning_qmlhfl.robust`: the aggregator of layer n's
  nodes over their children's uploads; default Mean, the weighted sum of Eq. 4), ``attack`` (Byzantine senders
  into layer n; default NoAttack).
- ``seed``: keys every random draw of the run (partition, sampling, dropout, augmentation, compression, who takes
  part); default 0.
- ``executor``: "auto" (the documented rule of :func:`~lightning_qmlhfl.simulation.executors.choose_executor`),
  "vmap" or "loop". ``backend``: the aggregation kernels, "auto" (Triton on CUDA, numba for float32 on CPU,
  torch otherwise), "torch", "numba" or "triton". ``param_order``: "fast" or "module", the storage order of the
  stacked rows (:mod:`lightning_qmlhfl.simulation.stacked`). ``device_rng``: "global" or "stream" (per-device
  dropout streams, independent of how rows are placed). ``forwards``: "ordered" or "concurrent", how the loop
  executor's worker threads run the devices' forward passes
  (:class:`~lightning_qmlhfl.simulation.executors.LoopExecutor`): one at a time in device order, or at the same
  time for steps whose effects do not depend on the device order (no random draws, no torchmetrics updates, no
  module attributes assigned: checked; no other state shared between devices' steps: the user's promise); the
  same numbers; its speed against the default is measured in bench/RESULTS.md.
- ``weighting``: "devices" (|C(child)| / |C(parent)|, the paper's) or "samples" (by local data size).
- ``availability`` (:class:`~lightning_qmlhfl.federation.availability.Availability` or None), ``latency``
  (:class:`~lightning_qmlhfl.theory.latency.LatencyModel` or None for the default clock), ``mobility``
  (:mod:`lightning_qmlhfl.federation.mobility`; default Static).
- The data (used by the strategies, which build the engine from a dataloader): ``partition`` (a
  :class:`~lightning_qmlhfl.data.Partitioner`; default Dirichlet(alpha=0.5)), ``label_key`` / ``label_fn`` (where
  the class ids are, for label-based partitions), ``train_transform`` (``f(batch, generator) -> batch`` on every
  stacked training batch), ``max_dataset_bytes`` (refuse larger training sets; default half the free memory of
  the training device).
- The run (strategies): ``global_rounds`` (stop after this many global rounds), ``smoothness`` (L: check the
  learning-rate condition, Eq. 15, at setup), ``strict_lr`` (make that check an error) and ``compression_warning``
  (warn when a layer's uploads lose more than this ratio ||C(x) - x||^2 / ||x||^2 to compression on average over
  their first aggregations, :class:`~lightning_qmlhfl.simulation.stages.MeasureCompression`; None: do not
  measure), ``dp_delta`` (the delta of the reported (epsilon, delta) guarantee when a layer adds
  privacy; default 1e-5), ``theory`` (:class:`~lightning_qmlhfl.theory.measured.MeasureConstants`: measure the
  constants of Theorem 1 during training, log them as ``theory/*``, check Eq. 15 with them and optionally adapt
  the step size, docs/algorithm.md#measured-constants; default None, nothing measured), ``tau_schedule``
  (:mod:`lightning_qmlhfl.theory.schedules`: adapt one layer's tau between global rounds, the loss-ratio rule of
  Hier-Local-QSGD or Eq. 15 at the measured constants; default None, the paper's fixed tau).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import checks
from .compressors import QSGD, Compressor, make_compressor, upload_bits
from .data.partition import Dirichlet, Partitioner, make_partitioner
from .federation.availability import Availability
from .federation.mobility import Mobility, Static, make_mobility
from .federation.participation import Full, Participation, make_participation
from .hierarchy import Hierarchy
from .optimizers.local_solvers import LocalSGD, LocalSolver, make_local_solver
from .optimizers.server import Average, ServerOptimizer, make_server_optimizer
from .privacy import NoPrivacy, Privacy, make_privacy
from .robust import Attack, LabelFlip, Mean, NoAttack, RobustAggregator, make_attack, make_robust_aggregator
from .theory.latency import LatencyModel
from .theory.measured import MeasureConstants, make_measure_constants
from .theory.schedules import TauSchedule, make_tau_schedule

__all__ = ["LayerConfig", "SimulationConfig", "EXECUTORS", "BACKENDS", "PARAM_ORDERS", "DEVICE_RNGS", "FORWARDS",
           "WEIGHTINGS"]

EXECUTORS = ("auto", "vmap", "loop")
BACKENDS = ("auto", "torch", "numba", "triton")
PARAM_ORDERS = ("fast", "module")
DEVICE_RNGS = ("global", "stream")
FORWARDS = ("ordered", "concurrent")
WEIGHTINGS = ("devices", "samples")
FORMAT_VERSION = 2  # of :meth:`SimulationConfig.identity` (1: the repr() strings of earlier checkpoints)


@dataclass(frozen=True)
class LayerConfig:
    """What happens on the uplinks into aggregation layer n (the module docstring lists the options)."""

    tau: int
    compressor: Compressor = field(default_factory=lambda: QSGD(8))
    server_optimizer: ServerOptimizer = field(default_factory=Average)
    participation: Participation = field(default_factory=Full)
    clip_norm: float | None = None
    local_solver: LocalSolver = field(default_factory=LocalSGD)
    privacy: Privacy = field(default_factory=NoPrivacy)
    robust: RobustAggregator = field(default_factory=Mean)
    attack: Attack = field(default_factory=NoAttack)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", checks.integer(self.tau, "tau", 1))
        checks.instance(self.compressor, "compressor", Compressor)
        checks.instance(self.server_optimizer, "server_optimizer", ServerOptimizer)
        checks.instance(self.participation, "participation", Participation)
        object.__setattr__(self, "clip_norm", checks.real(self.clip_norm, "clip_norm", 0.0, low_open=True,
                                                          allow_none=True))
        checks.instance(self.local_solver, "local_solver", LocalSolver)
        checks.instance(self.privacy, "privacy", Privacy)
        checks.instance(self.robust, "robust", RobustAggregator)
        checks.instance(self.attack, "attack", Attack)

    def identity(self) -> dict[str, Any]:
        out = {"tau": self.tau, "compressor": self.compressor.to_config(),
               "server_optimizer": self.server_optimizer.to_config(),
               "participation": self.participation.to_config()}
        if self.clip_norm is not None:  # (absent when off: checkpoints of runs without it keep their identity)
            out["clip_norm"] = self.clip_norm
        if self.local_solver != LocalSGD():  # (absent when it is the default, as clip_norm)
            out["local_solver"] = self.local_solver.to_config()
        for key, value, default in (("privacy", self.privacy, NoPrivacy()), ("robust", self.robust, Mean()),
                                    ("attack", self.attack, NoAttack())):
            if value != default:  # (absent when off, as clip_norm)
                out[key] = value.to_config()
        return out

    def upload_bits(self, num_params: int, num_buffer_elems: int = 0) -> int:
        """Bits of one upload into this layer (:func:`lightning_qmlhfl.compressors.upload_bits`)."""
        return upload_bits(self.compressor, num_params, num_buffer_elems, local_solver=self.local_solver)


def _per_layer(value: Any, what: str, num_layers: int, hint: str = "") -> list[Any]:
    """A list of N values from one value for every layer or a list of N (a string is one value)."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        return [value] * num_layers
    value = list(value)
    if len(value) != num_layers:
        raise ValueError(f"{what} has length {len(value)} but the hierarchy has N = {num_layers} layers: give one "
                         f"per layer{hint}")
    return value


def default_taus(hierarchy: Hierarchy) -> list[int]:
    """tau of the strategy's default tree (the documented [5, 2, 2]), else 2 on every layer."""
    return [5, 2, 2] if hierarchy.nodes_per_layer == (100, 20, 4, 1) else [2] * hierarchy.num_layers


@dataclass(frozen=True)
class SimulationConfig:
    """A QMLHFL simulation's options (module docstring). Build it with :meth:`build` from keyword arguments and
    config values; construct it directly from a Hierarchy and LayerConfigs."""

    hierarchy: Hierarchy
    layers: tuple[LayerConfig, ...]
    seed: int = 0
    executor: str = "auto"
    backend: str = "auto"
    param_order: str = "fast"
    device_rng: str = "global"
    forwards: str = "ordered"
    weighting: str = "devices"
    availability: Availability | None = None
    latency: LatencyModel | None = None
    mobility: Mobility = field(default_factory=Static)
    partition: Partitioner = field(default_factory=lambda: Dirichlet(alpha=0.5))
    label_key: str | int | None = None
    label_fn: Callable[[Any], Any] | None = None
    train_transform: Callable[[Any, Any], Any] | None = None
    max_dataset_bytes: int | None = None
    global_rounds: int | None = None
    smoothness: float | None = None
    strict_lr: bool = False
    compression_warning: float | None = 5.0
    dp_delta: float = 1e-5
    theory: MeasureConstants | None = None
    tau_schedule: TauSchedule | None = None

    def __post_init__(self) -> None:
        checks.instance(self.hierarchy, "hierarchy", Hierarchy)
        N = self.hierarchy.num_layers
        layers = tuple(self.layers)
        if len(layers) != N:
            raise ValueError(f"layers has length {len(layers)} but the hierarchy has N = {N} layers: give one "
                             f"LayerConfig per layer")
        for n, layer in enumerate(layers, start=1):
            checks.instance(layer, f"layers[{n - 1}]", LayerConfig)
            layer.participation.check_tree(self.hierarchy.parent_index(n - 1), self.hierarchy.nodes_per_layer[n], n)
            if isinstance(layer.attack, LabelFlip) and n != 1:
                raise ValueError(f"attack {layer.attack!r} at layer {n}: label flipping corrupts devices' data, so it "
                                 f"acts at layer 1 only (at a higher layer use a model attack: sign_flip, gaussian, "
                                 f"alie)")
        set_ = object.__setattr__
        set_(self, "layers", layers)
        set_(self, "seed", checks.integer(self.seed, "seed"))
        checks.choice(self.executor, "executor", EXECUTORS)
        checks.choice(self.backend, "backend", BACKENDS)
        checks.choice(self.param_order, "param_order", PARAM_ORDERS)
        checks.choice(self.device_rng, "device_rng", DEVICE_RNGS)
        checks.choice(self.forwards, "forwards", FORWARDS)
        if self.forwards == "concurrent" and self.executor == "vmap":
            raise ValueError("forwards='concurrent' is a mode of the loop executor, which executor='vmap' never runs: "
                             "use executor='loop' or 'auto', or forwards='ordered'")
        checks.choice(self.weighting, "weighting", WEIGHTINGS)
        checks.instance(self.availability, "availability", Availability, allow_none=True)
        if self.availability is not None:
            self.availability.check(self.hierarchy.num_devices)
        checks.instance(self.latency, "latency", LatencyModel, allow_none=True)
        if self.latency is not None and self.latency.num_layers != N:
            raise ValueError(f"latency model describes {self.latency.num_layers} layers, the hierarchy has N = {N}")
        checks.instance(self.mobility, "mobility", Mobility)
        if not self.mobility.is_static:
            if N < 2:
                raise ValueError("mobility needs edge servers: a hierarchy of at least N = 2 layers (devices move "
                                 "between the nodes of layer 1)")
            self.mobility.check(self.hierarchy.num_devices, self.hierarchy.nodes_per_layer[1], N)
        checks.instance(self.partition, "partition", Partitioner)
        checks.function(self.label_fn, "label_fn", "f(data) -> Tensor[n]")
        checks.function(self.train_transform, "train_transform", "f(batch, generator) -> batch")
        set_(self, "max_dataset_bytes", checks.integer(self.max_dataset_bytes, "max_dataset_bytes", 1,
                                                       allow_none=True))
        set_(self, "global_rounds", checks.integer(self.global_rounds, "global_rounds", 1, allow_none=True))
        if self.smoothness is not None:
            set_(self, "smoothness", checks.real(self.smoothness, "smoothness L", 0.0, low_open=True))
        set_(self, "strict_lr", bool(self.strict_lr))
        set_(self, "compression_warning", checks.real(self.compression_warning, "compression_warning", 0.0,
                                                      allow_none=True))
        set_(self, "dp_delta", checks.real(self.dp_delta, "dp_delta", 0.0, 1.0, low_open=True, high_open=True))
        set_(self, "theory", make_measure_constants(self.theory))
        set_(self, "tau_schedule", make_tau_schedule(self.tau_schedule))
        if self.tau_schedule is not None:
            self.tau_schedule.check(N)
            if self.tau_schedule.needs_measurements and self.theory is None:
                raise ValueError(f"tau_schedule {self.tau_schedule!r} sets tau from the measured constants: add "
                                 f"theory=measure (SimulationConfig(theory='measure'))")
            if any(not p.is_off for p in self.privacy):
                raise ValueError(f"tau_schedule {self.tau_schedule!r} with differential privacy: the accountant needs "
                                 f"the schedule of releases in advance, so tau must stay fixed (tau_schedule=None)")

    # ------------------------------------------------------------------ the keyword API
    @classmethod
    def build(cls, hierarchy: Hierarchy | None = None, taus: Sequence[int] | None = None,
              compressors: Any = None, server_optimizers: Any = None, participation: Any = None,
              clip_norms: Any = None, local_solvers: Any = None, partition: Any = None, mobility: Any = None, quantizers: Any = None,
              privacy: Any = None, robust: Any = None, attacks: Any = None,
              default_compressor: Any = None, **options: Any) -> "SimulationConfig":
        """A config from the strategies' keyword arguments: per-layer options (``taus``, ``compressors`` or its
        earlier name ``quantizers``, ``server_optimizers``, ``participation``) as a list of N or, except taus, one
        value for every layer, and ``clip_norms`` (:class:`~lightning_qmlhfl.simulation.stages.ClipUpdates`: the
        norm each sender's upload into layer n is clipped to, None for no clipping), ``local_solvers``
        (:mod:`~lightning_qmlhfl.optimizers.local_solvers`, one or a list of N); config values accepted (an
        int s = QSGD(s), names, dicts); ``None`` takes the
        default (``default_compressor`` replaces QSGD(8) as the compressors' default: the engine's is 32-bit
        uploads). ``options``: the other fields of the class."""
        h = hierarchy if hierarchy is not None else Hierarchy.balanced([4, 5, 5])
        checks.instance(h, "hierarchy", Hierarchy)
        N = h.num_layers
        if taus is None:
            taus = default_taus(h)
        if isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence):
            raise ValueError(f"taus must be a list of {N} integers >= 1, got {taus!r}")
        if len(taus) != N:
            raise ValueError(f"taus has length {len(taus)} but the hierarchy has N = {N} layers: give one tau per "
                             f"layer")
        taus = [checks.integer(t, f"tau_{n}", 1) for n, t in enumerate(taus, start=1)]
        comps = _compressors(compressors, quantizers, N, default_compressor)
        servers = [make_server_optimizer(s) for s in _per_layer(
            server_optimizers, "server_optimizers", N,
            " (layer 1 = the edge servers above the devices, layer N = the cloud)")]
        parts = [make_participation(p) for p in _per_layer(
            participation, "participation", N, " (layer 1 draws devices, layer n draws layer n-1's nodes) or one "
                                               "for all")]
        clips = _per_layer(clip_norms, "clip_norms", N)
        solvers = [make_local_solver(x) for x in _per_layer(
            local_solvers, "local_solvers", N, " (layer 1 = between the devices and their edge servers)")]
        privs = [make_privacy(x) for x in _per_layer(privacy, "privacy", N)]
        robusts = [make_robust_aggregator(x) for x in _per_layer(robust, "robust", N)]
        atts = [make_attack(x) for x in _per_layer(attacks, "attacks", N)]
        layers = tuple(LayerConfig(t, c, s, p, k, x, dp, r, a)
                       for t, c, s, p, k, x, dp, r, a in zip(taus, comps, servers, parts, clips, solvers, privs,
                                                             robusts, atts))
        extra: dict[str, Any] = {}
        if partition is not None:
            extra["partition"] = make_partitioner(partition)
        if mobility is not None:
            extra["mobility"] = make_mobility(mobility, h.nodes_per_layer[1] if N > 1 else 1)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown simulation options {unknown}; the options are "
                            f"{sorted(f.name for f in dataclasses.fields(cls) if f.name != 'layers')} and the "
                            f"per-layer taus, compressors, server_optimizers, participation, clip_norms, local_solvers, "
                            f"privacy, robust, attacks")
        return cls(hierarchy=h, layers=layers, **extra, **options)

    def replace(self, **changes: Any) -> "SimulationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ per-layer views
    @property
    def num_layers(self) -> int:
        return self.hierarchy.num_layers

    @property
    def taus(self) -> tuple[int, ...]:
        return tuple(layer.tau for layer in self.layers)

    @property
    def compressors(self) -> tuple[Compressor, ...]:
        return tuple(layer.compressor for layer in self.layers)

    @property
    def server_optimizers(self) -> tuple[ServerOptimizer, ...]:
        return tuple(layer.server_optimizer for layer in self.layers)

    @property
    def participation(self) -> tuple[Participation, ...]:
        return tuple(layer.participation for layer in self.layers)

    @property
    def local_solvers(self) -> tuple[LocalSolver, ...]:
        return tuple(layer.local_solver for layer in self.layers)

    @property
    def privacy(self) -> tuple[Privacy, ...]:
        return tuple(layer.privacy for layer in self.layers)

    @property
    def robust(self) -> tuple[RobustAggregator, ...]:
        return tuple(layer.robust for layer in self.layers)

    @property
    def attacks(self) -> tuple[Attack, ...]:
        return tuple(layer.attack for layer in self.layers)

    @property
    def uses_trust_stages(self) -> bool:
        """Whether any layer adds privacy, robust aggregation or an attack (:mod:`~lightning_qmlhfl.simulation.trust_stages`)."""
        return any(not (l.privacy.is_off and l.robust.is_mean and l.attack.is_none) for l in self.layers)

    # ------------------------------------------------------------------ what a checkpoint records
    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with its checkpoint, as plain data: the tree, the seed, the layers
        and the mobility model (the rest may change between sessions: executor, backend, data settings, ...)."""
        return {"format_version": FORMAT_VERSION, "hierarchy": self.hierarchy.to_dict(), "seed": self.seed,
                "layers": [layer.identity() for layer in self.layers], "mobility": self.mobility.to_config()}

    def legacy_identity(self) -> dict[str, Any]:
        """:meth:`identity` as checkpoints of format 1 wrote it (``repr()`` strings), to compare with them."""
        return {"taus": list(self.taus), "compressors": [c.legacy_repr() for c in self.compressors],
                "server_optimizers": [repr(o) for o in self.server_optimizers],
                "participation": [repr(p) for p in self.participation], "mobility": repr(self.mobility),
                "hierarchy": self.hierarchy.to_dict(), "seed": self.seed}


def _compressors(compressors: Any, quantizers: Any, N: int, default: Any) -> list[Compressor]:
    if compressors is not None and quantizers is not None:
        raise ValueError("give compressors= or its alias quantizers=, not both")
    what = "quantizers" if quantizers is not None else "compressors"
    value = quantizers if quantizers is not None else compressors
    if value is None:  # the default compressor on every layer
        value = [default if default is not None else QSGD(8)] * N
    if isinstance(value, (Compressor, numbers.Integral, str)) and not isinstance(value, bool):
        raise ValueError(f"{what} must be a list of {N} compressors (one per layer), got {value!r}")
    value = list(value)
    if len(value) != N:
        raise ValueError(f"{what} has length {len(value)} but the hierarchy has N = {N} layers: give one per layer")
    return [make_compressor(c) for c in value]
