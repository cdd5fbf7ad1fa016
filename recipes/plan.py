"""Plan tau_n under a deadline: ``python -m recipes.plan [overrides]`` (config: ``recipes/conf/plan.yaml``).

Prints the chosen tau, the predicted number of global iterations, how one global iteration's time splits between
computation and each layer's links, the learning rate to use and its admissible bound (Eq. 15), and the terms of
Eq. 15 at the chosen tau. When no tau meets the deadline it prints what would (longer deadline, coarser
quantization, faster links) and exits with status 2.
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
from lightning_qmlhfl.theory.latency import LatencyModel, measure_compute_time, upload_bits
from lightning_qmlhfl.theory.planner import Plan, plan_taus
from lightning_qmlhfl.theory import lr_condition_terms, quantizer_variances, term_provenance
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
    solvers = build_local_solvers(cfg, N)
    plan = plan_taus(
        hierarchy,
        quantizers,
        d,
        latency,
        deadline=float(cfg.deadline),
        L=float(cfg.L),
        mu=mu,
        safety=float(cfg.safety),
        adapt_mu=bool(cfg.adapt_mu),
        tau_max=int(cfg.tau_max),
        method=str(cfg.method),
        exact_limit=int(cfg.exact_limit),
        buffer_elems=buffers,
        local_solvers=solvers,
    )
    qs = quantizer_variances(quantizers, d)
    bits = upload_bits(quantizers, d, buffers, solvers)
    print(f"hierarchy           : N = {N} layers, nodes per layer {list(hierarchy.nodes_per_layer)}")
    for n, (qz, q, b) in enumerate(zip(quantizers, qs, bits), start=1):
        print(f"  layer {n} uplink     : {qz!r}, q_{n} = {q:.4g}, {b} bits per upload (32-bit: {32 * d})")
    print(f"deadline            : {float(cfg.deadline):g} s;  L = {float(cfg.L):g};  mu = {cfg.mu}")
    print(plan.summary())
    if plan.feasible:
        assert plan.taus is not None
        terms = lr_condition_terms(plan.taus, qs, hierarchy)
        source = term_provenance(N)
        shown = ", ".join(f"{k} = {v:.4g} ({source[k]})" for k, v in terms.items())
        print(f"Eq. 15 bracket      : {math.fsum(terms.values()):.6g} = {shown}")
    return plan


@hydra.main(config_path="conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan = run(cfg)
    if not plan.feasible:
        sys.exit(2)


if __name__ == "__main__":
    main()
