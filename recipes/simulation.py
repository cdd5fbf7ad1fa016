"""Config -> the simulation's objects, and the strategy that runs them (no Lightning import at module level, so
``recipes.plan`` stays light).

The ``strategy`` node (``strategy=qmlhfl`` or ``qmlhfl_ddp``) carries the strategy's own options; the objects it
simulates are derived from their groups here and given to it: the tree and taus (``hierarchy``), one compressor,
server optimizer, participation rule and local solver per layer (``compressor``, ``server_optim``,
``participation``, ``local_solver``: one value broadcast to N layers, or a list of N), privacy, robust aggregation
and attacks (``privacy``, ``robust``, ``attack``: :mod:`recipes.trust`), availability, mobility, the simulated clock (``latency``), the partitioner
(``partition``, wrapped for ``eval.local_fraction``) and the number of global rounds (``rounds``, or from
``deadline``). Every value is checked where it is read (:mod:`recipes.options`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lightning_qmlhfl.federation.availability import Availability
from lightning_qmlhfl.compressors import Compressor, layer_compressors, layer_quantizers
from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.federation.mobility import Mobility, make_mobility
from lightning_qmlhfl.federation.participation import Participation, layer_participation
from lightning_qmlhfl.optimizers.local_solvers import LocalSolver, layer_local_solvers
from lightning_qmlhfl.optimizers.server import ServerOptimizer, layer_server_optimizers
from lightning_qmlhfl.theory.latency import LatencyModel, default_uplink_rates, downlink_bits, upload_bits
from lightning_qmlhfl.theory.measured import MeasureConstants, make_measure_constants
from lightning_qmlhfl.theory.schedules import TauSchedule, make_tau_schedule
from recipes.config import key_name
from recipes.options import (ConfigError, check_choice, check_fraction, check_number, int_list, int_option,
                             number_list, optional_number)

__all__ = ["STRATEGIES", "Simulation", "build_availability", "build_compressors", "build_hierarchy", "build_latency",
           "build_mobility", "build_participation", "build_server_optimizers", "build_local_solvers", "build_simulation", "build_theory", "build_tau_schedule", "check_strategy",
           "rounds_for"]

STRATEGIES = ("qmlhfl", "qmlhfl_ddp")  # one process, or one simulation over trainer.devices ranks


def _library(group: str, build: Callable[[], Any], options: dict[str, Any] | None = None) -> Any:
    """``build()``, with a library ValueError / TypeError (a value it refuses) named after the config group, and
    after the option when the message names one of ``options`` (``TopK ratio must ...``: ``compressor.ratio``)."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError) or str(e).startswith(f"{group}."):
            raise
        words = [w.strip(",:") for w in str(e).split(" ")[:3]]
        named = next((w for w in words if options and w in options), None)
        where = group if named is None else f"{group}.{named}={options[named]!r}"  # type: ignore[index]
        raise ConfigError(f"{where}: {e}") from e


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_hierarchy(cfg: DictConfig) -> Hierarchy:
    """The tree: ``hierarchy.parents`` (irregular trees), else ``hierarchy.branching``."""
    h = cfg.hierarchy
    if h.get("parents") is not None:
        return _library("hierarchy.parents", lambda: Hierarchy.from_parents(_plain(h.parents)))
    return Hierarchy.balanced(int_list(_plain(h.branching), "hierarchy.branching", 1))


def check_taus(cfg: DictConfig, num_layers: int) -> list[int]:
    return int_list(_plain(cfg.hierarchy.taus), "hierarchy.taus", 1, length=num_layers)


def build_compressors(cfg: DictConfig, num_layers: int) -> list[Compressor]:
    """C_1..C_N from the ``compressor`` group (``compressor.layers`` names one compressor per layer or one for all;
    ``compressor.levels`` / ``bucket_size`` / ``ratio`` / ``k`` / ``error_feedback`` are one value or a list of N;
    ``levels`` and ``bucket_size`` default to ``quantizer.levels`` / ``quantizer.bucket_size``). Configs without a
    ``compressor`` group use the QSGD levels of ``quantizer`` (null levels: 32-bit uploads)."""
    c: Any = cfg.get("compressor")
    if c is None:
        q = OmegaConf.to_container(cfg.quantizer, resolve=True)
        return _library("quantizer", lambda: layer_quantizers(q.get("levels"), q.get("bucket_size"), num_layers))
    if c.get("_target_"):  # one user compressor class on every layer (a fresh instance per layer)
        return [_instantiate_compressor(c, "compressor") for _ in range(num_layers)]
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "qsgd")
    if isinstance(layers, list) and any(isinstance(v, dict) for v in layers):
        if len(layers) != num_layers:
            raise ConfigError(f"compressor.layers has {len(layers)} entries, the hierarchy has N = {num_layers}")
        names = ["identity" if isinstance(v, dict) else v for v in layers]
        built = _library("compressor", lambda: layer_compressors(names, num_layers, **opts), opts)
        return [_instantiate_compressor(v, f"compressor.layers[{n}]") if isinstance(v, dict) else built[n]
                for n, v in enumerate(layers)]
    return _library("compressor", lambda: layer_compressors(layers, num_layers, **opts), opts)


def _instantiate_compressor(node: Any, what: str) -> Compressor:
    from recipes.components import instantiate_node

    spec = _plain(node)
    if not isinstance(spec, dict) or not spec.get("_target_"):
        raise ConfigError(f"{what} must be a compressor name or a node with _target_, got {spec!r}")
    spec.pop("layers", None)
    comp = instantiate_node(spec, "compressor")
    if not isinstance(comp, Compressor):
        raise TypeError(f"{what}._target_={spec['_target_']!r} built a {type(comp).__name__}, not a "
                        f"lightning_qmlhfl.compressors.Compressor")
    return comp


def build_server_optimizers(cfg: DictConfig, num_layers: int) -> list[ServerOptimizer]:
    """One server optimizer per layer from the ``server_optim`` group (``Average()`` everywhere without it)."""
    c: Any = cfg.get("server_optim")
    if c is None:
        return layer_server_optimizers("average", num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "average")
    return _library("server_optim", lambda: layer_server_optimizers(layers, num_layers, **opts), opts)


def build_participation(cfg: DictConfig, num_layers: int) -> list[Participation]:
    """One participation rule per layer from the ``participation`` group (Full everywhere without it)."""
    c: Any = cfg.get("participation")
    if c is None:
        return layer_participation("full", num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "full")
    return _library("participation", lambda: layer_participation(layers, num_layers, **opts), opts)


AT = ("all", "devices")


def build_local_solvers(cfg: DictConfig, num_layers: int) -> list[LocalSolver]:
    """One local solver per layer from the ``local_solver`` group (local SGD everywhere without it). A single name
    in ``layers`` applies to every layer (``at: all``) or to the device layer only (``at: devices``)."""
    c: Any = cfg.get("local_solver")
    if c is None:
        return layer_local_solvers("fedavg", num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "fedavg")
    at = opts.pop("at", "all")
    if at not in AT:
        raise ConfigError(f"local_solver.at={at!r}: must be 'all' or 'devices'")
    if at == "devices" and isinstance(layers, str):
        layers = [layers] + ["fedavg"] * (num_layers - 1)
    return _library("local_solver", lambda: layer_local_solvers(layers, num_layers, **opts), opts)


def _option_group(cfg: DictConfig, group: str, make: Callable[[Any], Any]) -> Any:
    """``make(options)`` of a group whose node is one option object's config (None without the group)."""
    c: Any = cfg.get(group)
    if c is None:
        return None
    opts = _plain(c)
    return _library(group, lambda: make(opts), opts)


def build_theory(cfg: DictConfig) -> MeasureConstants | None:
    """The measurement of Theorem 1's constants from the ``theory`` group (none without it)."""
    return _option_group(cfg, "theory", make_measure_constants)


def build_tau_schedule(cfg: DictConfig) -> TauSchedule | None:
    """The adaptive tau of the ``tau_schedule`` group (the paper's fixed tau without it)."""
    return _option_group(cfg, "tau_schedule", make_tau_schedule)


def build_availability(cfg: DictConfig) -> Availability | None:
    """The ``availability`` group: per-period probabilities of being unavailable and of dropping out, or a trace
    file of availability windows (None when every device is always there)."""
    c: Any = cfg.get("availability")
    if c is None:
        return None
    probs = {k: check_number(c.get(k) or 0.0, f"availability.{k}", minimum=0, maximum=1)
             for k in ("unavailable", "dropout")}
    a = _library("availability", lambda: Availability(**probs, trace=c.get("trace") or None))
    return None if a.is_always else a


def build_mobility(cfg: DictConfig, hierarchy: Hierarchy) -> Mobility:
    """The ``mobility`` group: devices moving between edge servers and edge-server failures (Static without it)."""
    c: Any = cfg.get("mobility")
    if c is None:
        return make_mobility(None)
    spec = OmegaConf.to_container(c, resolve=True)
    if spec.get("model") == "schedule" and spec.get("file"):
        _check_schedule_file(spec["file"])
    return _library("mobility", lambda: make_mobility(spec, hierarchy.nodes_per_layer[1]
                                                      if hierarchy.num_layers > 1 else None))


def _check_schedule_file(path: Any) -> None:
    """The keys of a schedule file's ``boundaries`` must be boundary indices (the library reads them with int())."""
    try:
        data = json.loads(Path(str(path)).read_text())
    except (OSError, ValueError):
        return  # the library's own message names the file and the error
    bounds = data.get("boundaries") if isinstance(data, dict) else None
    for k in bounds or {}:
        if not str(k).lstrip("-").isdigit():
            raise ConfigError(f"mobility.file={path}: the key {k!r} of \"boundaries\" is not an integer (keys are "
                              f"boundary indices: \"0\", \"1\", ...)")


def _uplink_rates(cfg: DictConfig, num_layers: int) -> list[float]:
    rates = cfg.hierarchy.get("uplink_rates")
    if rates is None:
        return default_uplink_rates(num_layers)
    return number_list(_plain(rates), "hierarchy.uplink_rates", num_layers, minimum=0, exclusive=True)


def build_latency(cfg: DictConfig, num_layers: int, hierarchy: Any = None) -> LatencyModel:
    """The simulated clock: compute time per local step from ``latency.compute_time``, uplink rates from the
    hierarchy preset; heterogeneous devices and links with ``latency.compute_sigma`` / ``latency.rate_sigma``
    (lognormal factors, drawn with ``latency.seed``) or per-node times from ``latency.file``; stragglers with
    ``latency.deadlines`` (one per layer, null entries: none) and ``latency.straggler`` (wait | drop)."""
    lat = cfg.latency
    deadlines = lat.get("deadlines")
    extra = dict(deadlines=None if deadlines is None else number_list(
        _plain(deadlines), "latency.deadlines", num_layers, minimum=0, exclusive=True, allow_none=True),
        straggler=check_choice(str(lat.get("straggler") or "wait"), "latency.straggler", ("wait", "drop")))
    if lat.get("file"):
        return _library("latency.file", lambda: LatencyModel.from_file(lat.file, **extra))
    compute = check_number(lat.compute_time, "latency.compute_time", minimum=0, exclusive=True)
    sigma_c = check_number(lat.get("compute_sigma") or 0.0, "latency.compute_sigma", minimum=0)
    sigma_r = check_number(lat.get("rate_sigma") or 0.0, "latency.rate_sigma", minimum=0)
    if sigma_c or sigma_r:
        if hierarchy is None:
            hierarchy = build_hierarchy(cfg)
        seed = int_option(lat.get("seed") or 0, "latency.seed", 0, allow_none=False)
        return LatencyModel.lognormal(hierarchy, compute, _uplink_rates(cfg, num_layers), compute_sigma=sigma_c,
                                      rate_sigma=sigma_r, seed=seed, **extra)
    return LatencyModel(compute_time=compute, uplink_rates=_uplink_rates(cfg, num_layers), **extra)


def rounds_for(cfg: DictConfig, latency: LatencyModel, quantizers: list[Compressor], d: int, buffers: int = 0,
               local_solvers: list[LocalSolver] | None = None) -> int:
    """``rounds``, or with ``deadline`` = T_d (simulated seconds) T = floor(T_d / T_glob(tau)), with the engine's
    bits per upload (d parameters and ``buffers`` float buffer entries, the local solvers' extra uploads)."""
    deadline = optional_number(cfg.get("deadline"), key_name("deadline"), minimum=0, exclusive=True)
    if deadline is None:
        return int_option(cfg.get("rounds"), key_name("rounds"), 1, allow_none=False)  # type: ignore[return-value]
    hierarchy = build_hierarchy(cfg)
    taus = check_taus(cfg, hierarchy.num_layers)
    t_glob = latency.round_time(taus, upload_bits(quantizers, d, buffers, local_solvers),
                                downlink_bits(d + buffers) if latency.slowest_downlink_rates else None,
                                hierarchy=hierarchy).total
    rounds = math.floor(deadline / t_glob + 1e-9)
    if rounds < 1:
        raise ConfigError(
            f"{key_name('deadline')}={cfg.deadline} s is shorter than one global round T_glob = {t_glob:.4g} s for "
            f"taus {taus}: raise the deadline or lower tau (python -m recipes.plan finds a tau)")
    return rounds


def check_strategy(name: str, devices: Any, sweep: str | None, local_fraction: float) -> tuple[str, int]:
    """The strategy's name and ``trainer.devices``, checked together: (name, devices)."""
    check_choice(name, key_name("strategy"), STRATEGIES)
    devices = int_option(devices, "trainer.devices", 1, allow_none=False)
    if name == "qmlhfl" and devices != 1:
        raise ConfigError(f"trainer.devices={devices} needs strategy=qmlhfl_ddp (one simulation over {devices} "
                          f"processes); strategy=qmlhfl runs in one process")
    if name == "qmlhfl_ddp":
        if sweep is not None:
            raise ConfigError("strategy=qmlhfl_ddp cannot run inside a Hydra multirun (-m): Lightning's DDP launcher "
                              "restarts the command for every rank; run the sweep's points one at a time")
        if local_fraction > 0:
            raise ConfigError("eval.local_fraction > 0 (per-device evaluation) needs every device's data in one "
                              "process: use strategy=qmlhfl")
    return name, int(devices)  # type: ignore[arg-type]


def strategy_name(cfg: DictConfig) -> str:
    """``qmlhfl_ddp`` for a ``strategy`` node whose target is the DDP strategy, else ``qmlhfl``."""
    return "qmlhfl_ddp" if str(cfg.strategy.get("_target_", "")).endswith("QMLHFLDDPStrategy") else "qmlhfl"


@dataclass
class Simulation:
    """What :func:`build_simulation` made: the strategy and the objects it was given."""

    strategy: Any
    rounds: int
    participation: list[Participation]
    mobility: Mobility
    holdout: Any


def build_simulation(cfg: DictConfig, model: Any, datamodule: Any, sweep: str | None = None) -> Simulation:
    """The strategy of ``cfg.strategy``, given the simulation's objects (see the module docstring)."""
    from lightning_qmlhfl.simulation.stacked import upload_dims
    from recipes.components import build_partitioner, instantiate_node
    from recipes.local_eval import HoldoutPartitioner

    hierarchy = build_hierarchy(cfg)
    N = hierarchy.num_layers
    taus = check_taus(cfg, N)
    compressors = build_compressors(cfg, N)
    latency = build_latency(cfg, N, hierarchy)
    local_solvers = build_local_solvers(cfg, N)
    rounds = rounds_for(cfg, latency, compressors, *upload_dims(model), local_solvers=local_solvers)
    partitioner = build_partitioner(cfg)
    local_fraction = check_fraction((cfg.get("eval") or {}).get("local_fraction", 0.0) or 0.0, "eval.local_fraction")
    holdout = HoldoutPartitioner(partitioner, local_fraction) if local_fraction > 0 else None
    name, _ = check_strategy(strategy_name(cfg), cfg.trainer.get("devices", 1), sweep, local_fraction)
    participation, mobility = build_participation(cfg, N), build_mobility(cfg, hierarchy)
    from recipes.trust import build_attacks, build_privacy, build_robust, dp_delta

    trust: dict[str, Any] = dict(
        privacy=build_privacy(cfg, N, taus, participation, hierarchy, rounds),
        robust=build_robust(cfg, N), attacks=build_attacks(cfg, N))
    if dp_delta(cfg) is not None:
        trust["dp_delta"] = dp_delta(cfg)
    objects: dict[str, Any] = dict(
        hierarchy=hierarchy, taus=taus, compressors=compressors, server_optimizers=build_server_optimizers(cfg, N),
        local_solvers=local_solvers, **trust,
        participation=participation, availability=build_availability(cfg), mobility=mobility,
        partition=holdout or partitioner, global_rounds=rounds, latency=latency, theory=build_theory(cfg),
        tau_schedule=build_tau_schedule(cfg),
        train_transform=getattr(datamodule, "train_transform", None))
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if "device" in cfg.strategy and cfg.strategy.device is None and accelerator in ("cpu", "gpu", "cuda"):
        objects["device"] = "cpu" if accelerator == "cpu" else "cuda"  # the simulation lives where the accelerator says
    int_option(cfg.strategy.get("seed"), "seed", 0, allow_none=False)
    strategy = instantiate_node(cfg.strategy, "strategy", **objects)
    return Simulation(strategy, rounds, participation, mobility, holdout)
