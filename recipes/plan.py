"""Plan tau_n under a deadline: ``python -m recipes.plan [overrides]`` (config: ``recipes/conf/plan.yaml``).

Prints the chosen tau, the predicted number of global iterations, how one global iteration's time splits between
computation and each layer's links, the learning rate to use and its admissible bound (Eq. 15), and the terms of
Eq. 15 at the chosen tau. When no tau meets the deadline it prints what would (longer deadline, coarser
quantization, faster links) and exits with status 2.

Energy (docs/algorithm.md#energy): with ``energy.enabled=true`` (or any ``energy.*`` value, or an ``energy_budget``)
the plan also counts joules: ``energy.step_joules`` per local step, ``energy.transmit_power`` per layer's senders,
and ``energy_budget`` (joules for the whole system) bounds the global iterations beside the deadline;
``deadline=null`` plans under the energy budget alone.

Measured constants (docs/algorithm.md#measured-constants): ``calibrate_from=RUN_DIR`` takes L and the q_n of Eq. 15
from a pilot run made with ``theory=measure`` (its ``summary.json``) instead of ``L`` and the compressors' bounds,
and the report gives the headroom mu*/mu of the chosen learning rate, and of ``mu`` as given, at the chosen tau.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.simulation.stacked import upload_dims
from lightning_qmlhfl.theory.energy import EnergyModel, default_energy
from lightning_qmlhfl.theory.latency import LatencyModel, measure_compute_time, upload_bits
from lightning_qmlhfl.theory.planner import Plan, plan_taus
from lightning_qmlhfl.theory import lr_condition_terms, lr_headroom, quantizer_variances, term_provenance
from lightning_qmlhfl.theory.measured import MeasuredConstants
from recipes.simulation import build_compressors, build_local_solvers


def _per_layer(value: Any, N: int, what: str) -> list[Any]:
    """A scalar for every layer, or a list with one entry per layer."""
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        value = list(value)
        if len(value) != N:
            raise ValueError(f"{what} has {len(value)} entries but the hierarchy has N = {N} layers: {value}")
        return value
    return [value] * N


def measure(cfg: DictConfig) -> tuple[float, torch.nn.Module]:
    """Instantiate ``cfg.model`` and time one local step on random data: (seconds per step, the model)."""
    if cfg.model is None or cfg.model.get("_target_") is None:
        raise ValueError("compute_time is null: give it in seconds per local step, or set model._target_ to measure it")
    model = hydra.utils.instantiate(cfg.model)
    shape = [int(x) for x in cfg.input_shape]
    x = torch.randn(*shape)
    y = torch.randint(0, int(cfg.num_classes), (shape[0],))
    seconds = measure_compute_time(model, (x, y), loss_fn=torch.nn.functional.cross_entropy)
    return seconds, model


# ---------------------------------------------------------------------- energy (docs/algorithm.md#energy)
def build_energy(cfg: DictConfig, N: int, compute_time: float) -> EnergyModel | None:
    """The energy model of ``cfg.energy`` (None when it is off and no ``energy_budget`` is given); null values take
    :func:`~lightning_qmlhfl.theory.energy.default_energy`'s cited defaults and assumption."""
    e = cfg.get("energy") or {}
    step, power = e.get("step_joules"), e.get("transmit_power")
    if not (e.get("enabled") or step is not None or power is not None or cfg.get("energy_budget") is not None):
        return None
    default = default_energy(N, compute_time)
    return EnergyModel(step_joules=default.step_joules if step is None else float(step),
                       transmit_power=list(default.transmit_power) if power is None
                       else [float(p) for p in _per_layer(power, N, "energy.transmit_power")])


def print_energy(energy: EnergyModel | None, budget: float | None) -> None:
    """The energy inputs of the report (the plan's summary prints E_glob and its split)."""
    if energy is None:
        return
    powers = ", ".join(f"layer {n}: {p:g} W" for n, p in enumerate(energy.transmit_power, start=1))
    total = "none" if budget is None else f"{budget:g} J"
    print(f"energy              : {energy.step_joules:g} J per local step; transmit power {powers}; budget {total}")


# ---------------------------------------------------------------------- measured constants
def calibration(cfg: DictConfig, N: int) -> tuple[float, list[float] | None]:
    """(L, measured q_n or None) from ``calibrate_from`` (a pilot run's directory), else (``L``, None)."""
    run_dir = cfg.get("calibrate_from")
    if run_dir is None:
        return float(cfg.L), None
    m = MeasuredConstants.from_run(str(run_dir))
    if len(m.q_bound) != N:
        raise ValueError(f"calibrate_from={run_dir!r}: the pilot run has {len(m.q_bound)} layers, this plan N = {N}; "
                         f"calibrate from a run of the same hierarchy depth")
    if not math.isfinite(m.L) or m.L <= 0:
        raise ValueError(f"calibrate_from={run_dir!r}: the pilot measured no smoothness (L = {m.L})")
    qs = m.qs()
    print(f"calibrated from     : {run_dir} ({m.rounds} measured rounds): L = {m.L:.4g} (largest; median of the "
          f"rounds' largest {m.L_median:.4g}), q_n measured {[round(q, 4) for q in qs]} against the bounds "
          f"{[round(q, 4) for q in m.q_bound]}, sigma^2 = {m.sigma2:.4g}, heterogeneity = {m.heterogeneity:.4g}")
    return m.L, qs


# ---------------------------------------------------------------------- the plan
def run(cfg: DictConfig) -> Plan:
    """Build everything from the config, plan, print the report; returns the :class:`Plan`."""
    hierarchy = Hierarchy.balanced([int(b) for b in cfg.hierarchy.branching])
    N = hierarchy.num_layers
    quantizers = build_compressors(cfg, N)
    buffers = int(cfg.get("buffer_elems") or 0)
    d = int(cfg.d)
    compute_time = cfg.compute_time
    if compute_time is None:
        compute_time, model = measure(cfg)
        d, buffers = upload_dims(model)
        print(f"measured compute time: {compute_time:.6g} s per local step of {cfg.model._target_} (d = {d})")
    latency = LatencyModel(
        compute_time=float(compute_time),
        uplink_rates=[float(r) for r in _per_layer(cfg.uplink_rates, N, "uplink_rates")],
        downlink_rates=None
        if cfg.downlink_rates is None
        else [float(r) for r in _per_layer(cfg.downlink_rates, N, "downlink_rates")],
    )
    mu = None if cfg.mu is None else float(cfg.mu)
    L, measured_qs = calibration(cfg, N)
    solvers = build_local_solvers(cfg, N)
    energy = build_energy(cfg, N, float(compute_time))
    budget = None if cfg.get("energy_budget") is None else float(cfg.energy_budget)
    plan = plan_taus(
        hierarchy,
        quantizers,
        d,
        latency,
        deadline=None if cfg.deadline is None else float(cfg.deadline),
        L=L,
        mu=mu,
        safety=float(cfg.safety),
        adapt_mu=bool(cfg.adapt_mu),
        tau_max=int(cfg.tau_max),
        method=str(cfg.method),
        exact_limit=int(cfg.exact_limit),
        buffer_elems=buffers,
        local_solvers=solvers,
        energy=energy,
        energy_budget=budget,
        qs=measured_qs,
    )
    qs = quantizer_variances(quantizers, d) if measured_qs is None else measured_qs
    bits = upload_bits(quantizers, d, buffers, solvers)
    print(f"hierarchy           : N = {N} layers, nodes per layer {list(hierarchy.nodes_per_layer)}")
    for n, (qz, q, b) in enumerate(zip(quantizers, qs, bits), start=1):
        print(f"  layer {n} uplink     : {qz!r}, q_{n} = {q:.4g}, {b} bits per upload (32-bit: {32 * d})")
    print(f"deadline            : {'none' if cfg.deadline is None else f'{float(cfg.deadline):g} s'};  "
          f"L = {L:g};  mu = {cfg.mu}")
    print_energy(energy, budget)
    print(plan.summary())
    if plan.feasible:
        assert plan.taus is not None
        terms = lr_condition_terms(plan.taus, qs, hierarchy)
        source = term_provenance(N)
        shown = ", ".join(f"{k} = {v:.4g} ({source[k]})" for k, v in terms.items())
        print(f"Eq. 15 bracket      : {math.fsum(terms.values()):.6g} = {shown}")
    if plan.feasible and measured_qs is not None:  # (only when calibrated: the default report stays as it was)
        assert plan.taus is not None
        chosen = [("chosen mu", plan.mu)] + ([] if mu is None or mu == plan.mu else [("given mu", mu)])
        print("headroom mu*/mu     : " + ";  ".join(f"{what} {m:g}: {lr_headroom(m, L, plan.taus, qs, hierarchy):.4g}"
                                                   for what, m in chosen if m))
    return plan


@hydra.main(config_path="conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan = run(cfg)
    if not plan.feasible:
        sys.exit(2)


if __name__ == "__main__":
    main()
