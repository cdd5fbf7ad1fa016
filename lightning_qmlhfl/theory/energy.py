"""Energy of one global iteration (docs/algorithm.md#energy; the model is **ours**, its default numbers are cited
below and there, the ones that are assumptions marked as such).

A device spends ``e_i`` joules per local step it trains. A sender c of layer n-1 transmits at ``P_c`` watts for as
long as its upload takes, ``bits_n / r_c`` seconds with the :class:`~.latency.LatencyModel`'s rate ``r_c`` of that
sender, so one upload costs ``P_c bits_n / r_c``. With everyone taking part, one global iteration costs the whole
system (all devices and nodes together)::

    E_glob(tau) = prod_m tau_m * sum_i e_i  +  sum_{n=1..N} (prod_{m>n} tau_m) * sum_{c in layer n-1} P_c bits_n / r_c

``bits_n`` is :func:`~.latency.upload_bits` (the engine's count, never a second one). Receiving, idling and downloads
are not modelled (they cost nothing here). E_glob is a polynomial in tau with non-negative coefficients, hence
non-decreasing in every tau_n: with an energy budget the planner's feasible set is still a down-set. With
stragglers dropped at deadlines it is an upper bound of the engine's count, which charges only delivered uploads
(:class:`~lightning_qmlhfl.federation.clock.SimulatedClock`). Units: joules, watts, seconds, bits/s.

Defaults (:func:`default_energy`):

* devices' links (layer 1): 0.2 W, i.e. 23 dBm, the maximum output power of an LTE UE of power class 3 (3GPP TS 36.101,
  "E-UTRA; User Equipment (UE) radio transmission and reception", section 6.2.2). Cited; it is the maximum, and
  with uplink power control a device often sends with less, so it over-counts.
* links of edge servers and above (layers >= 2): 6.3 W, i.e. 38 dBm, the rated output power limit of a Medium Range
  base station (3GPP TS 36.104, "E-UTRA; Base Station (BS) radio transmission and reception", section 6.2).
  The limit is cited; that an edge server reaches its parent over such a radio link is an **assumption** (a
  wired backhaul costs far less per bit; give power 0 to leave a layer's links uncharged).
* energy per local step: 5 W times the step time. 5 W is the lower of the Jetson Nano module's two power modes
  (5 W and 10 W; NVIDIA Jetson Nano module data sheet, 2019), read as an embedded device training at its power cap:
  an **assumption**, not a measurement of the project's models.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from ..hierarchy import Hierarchy, aggregations_per_round
from .latency import LatencyModel, RoundTime, _positive, upload_bits

__all__ = ["EnergyModel", "RoundEnergy", "default_energy", "energy_grid", "DEVICE_TRANSMIT_POWER",
           "EDGE_TRANSMIT_POWER", "DEVICE_COMPUTE_POWER"]

DEVICE_TRANSMIT_POWER = 0.2  # W: 23 dBm, LTE UE power class 3 (3GPP TS 36.101, section 6.2.2)
EDGE_TRANSMIT_POWER = 10 ** (38 / 10) / 1000  # W: 38 dBm, Medium Range BS limit (3GPP TS 36.104, section 6.2)
DEVICE_COMPUTE_POWER = 5.0  # W: assumption, the Jetson Nano's 5 W mode (NVIDIA Jetson Nano module data sheet, 2019)

Power = Union[float, Sequence[float]]
"""A layer's transmit power in W: one number (all senders alike) or one number per sender of that layer."""


def _non_negative(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (watts), got {value!r}")
    return float(value)


def _as_list(value: object) -> list | None:
    """The entries of a list/tuple/array/tensor, or None for a scalar."""
    if isinstance(value, torch.Tensor):
        return value.detach().flatten().tolist()
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        return list(value)
    return None


def _hierarchy(hierarchy: Any) -> Hierarchy:
    if isinstance(hierarchy, Hierarchy) or hasattr(hierarchy, "nodes_per_layer"):
        return hierarchy
    return Hierarchy.balanced(hierarchy)


class RoundEnergy(RoundTime):
    """Energy of one global iteration, split like :class:`~.latency.RoundTime` but in joules.

    total: E_glob(tau). compute: prod tau_m * sum_i e_i. per_layer_comm[n-1]: prod_{m>n} tau_m * the energy of one
    aggregation's uploads of layer n (all its senders). link_time[n-1] (alias :attr:`per_aggregation`): that energy.
    """

    @property
    def per_aggregation(self) -> tuple[float, ...]:
        """Per layer n, joules of the uploads of one aggregation of layer n (every sender once)."""
        return self.link_time


@dataclass(frozen=True)
class EnergyModel:
    """Joules per local step of every device and transmit power of every layer's senders (module docstring).

    step_joules: J per local step, one positive number for every device or one per device (list/tensor [N_tot]).
    transmit_power: per layer n = 1..N, the power (W, >= 0) of each sender of layer n-1 while it uploads to its
        parent: one number for all senders or one per sender. An upload's duration comes from the latency model.
    """

    step_joules: float | Sequence[float] | torch.Tensor
    transmit_power: Sequence[Power]

    def __post_init__(self) -> None:
        per = _as_list(self.step_joules)
        if per is None:
            _positive(self.step_joules, "step_joules (J per local step)")
        elif len(per) == 0:
            raise ValueError("step_joules is an empty list; give one J per step, or one per device")
        else:
            for i, e in enumerate(per):
                _positive(e, f"step_joules[{i}] (J per local step)")
        powers = _as_list(self.transmit_power)
        if not powers:
            raise ValueError(f"transmit_power must list one power (W) per layer n = 1..N, got {self.transmit_power!r}")
        for n, p in enumerate(powers, start=1):
            ps = _as_list(p)
            if ps is not None and len(ps) == 0:
                raise ValueError(f"transmit_power[{n - 1}] (layer {n}) is an empty list; give one W or one per sender")
            for i, x in enumerate([p] if ps is None else ps):
                _non_negative(x, f"transmit_power[{n - 1}]" + ("" if ps is None else f"[{i}]") + f" (layer {n})")
        object.__setattr__(self, "transmit_power", tuple(powers))

    @property
    def num_layers(self) -> int:
        return len(self.transmit_power)

    @classmethod
    def lognormal(cls, hierarchy: Any, step_joules: float | Sequence[float], transmit_power: Sequence[Power],
                  sigma: float = 0.0, seed: int = 0, classes: Sequence[int] | torch.Tensor | None = None
                  ) -> "EnergyModel":
        """Device classes and spread: device i's J per step is its class's median times exp(sigma Z), drawn once
        with ``seed`` (as :meth:`LatencyModel.lognormal` draws times). Without ``classes``, ``step_joules`` is one
        median; with ``classes`` (one class index per device), one median per class. ``sigma=0``: exactly the
        class values."""
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")
        h = _hierarchy(hierarchy)
        medians = _as_list(step_joules)
        if classes is None:
            if medians is not None:
                raise ValueError(f"step_joules lists one median per class: give classes (one index per device), "
                                 f"got step_joules={step_joules!r} without classes")
            base = torch.full((h.num_devices,), _positive(step_joules, "step_joules"), dtype=torch.float64)
        else:
            if medians is None or len(medians) == 0:
                raise ValueError(f"with classes, step_joules must list one median (J per step) per class, got "
                                 f"{step_joules!r}")
            med = torch.tensor([_positive(m, f"step_joules[{k}]") for k, m in enumerate(medians)], dtype=torch.float64)
            cl = torch.as_tensor(classes).flatten()
            if cl.numel() != h.num_devices or cl.is_floating_point() or cl.dtype == torch.bool:
                raise ValueError(f"classes must give one integer class index per device ({h.num_devices}), got "
                                 f"{classes!r}")
            if bool((cl < 0).any()) or bool((cl >= len(medians)).any()):
                raise ValueError(f"classes must be indices in [0, {len(medians) - 1}] (one per class of step_joules)"
                                 f", got {cl.tolist()}")
            base = med[cl.long()]
        g = torch.Generator().manual_seed(int(seed))
        draw = torch.exp(sigma * torch.randn(h.num_devices, generator=g, dtype=torch.float64))
        return cls(step_joules=base * draw, transmit_power=transmit_power)

    # ------------------------------------------------------------------ per-node values (the clock's inputs)
    def device_step_joules(self, num_devices: int) -> torch.Tensor:
        """float64 [num_devices]: J per local step of every device."""
        per = _as_list(self.step_joules)
        if per is None:
            return torch.full((num_devices,), float(self.step_joules), dtype=torch.float64)
        if len(per) != num_devices:
            raise ValueError(f"step_joules has {len(per)} entries but there are {num_devices} devices")
        return torch.tensor(per, dtype=torch.float64)

    def sender_powers(self, n: int, num_senders: int) -> torch.Tensor:
        """float64 [num_senders]: transmit power (W) of every sender of layer n-1 into layer n (1-based n)."""
        p = self.transmit_power[n - 1]
        ps = _as_list(p)
        if ps is None:
            return torch.full((num_senders,), float(p), dtype=torch.float64)
        if len(ps) != num_senders:
            raise ValueError(f"transmit_power[{n - 1}] (layer {n}) has {len(ps)} powers but layer {n - 1} has "
                             f"{num_senders} senders")
        return torch.tensor(ps, dtype=torch.float64)

    def upload_joules(self, n: int, bits: int, latency: LatencyModel, num_senders: int) -> torch.Tensor:
        """float64 [num_senders]: J of one upload of ``bits`` by every sender of layer n-1: P_c bits / r_c."""
        return self.sender_powers(n, num_senders) * (float(bits) / latency.sender_rates(n, num_senders))

    def totals(self, hierarchy: Any, latency: LatencyModel, upload_bits: Sequence[int]) -> tuple[float, list[float]]:
        """(sum_i e_i: J of one local step of every device, per layer n the J of one aggregation's uploads)."""
        h = _hierarchy(hierarchy)
        N = h.num_layers
        if self.num_layers != N or latency.num_layers != N:
            raise ValueError(f"the energy model describes {self.num_layers} layers, the latency model "
                             f"{latency.num_layers}, the hierarchy has N = {N}")
        if isinstance(upload_bits, (str, bytes)) or len(upload_bits) != N:
            raise ValueError(f"upload_bits must list the bits of one upload per layer ({N}), got {upload_bits!r}")
        step = float(self.device_step_joules(h.num_devices).sum())
        ups = [float(self.upload_joules(n, upload_bits[n - 1], latency, h.nodes_per_layer[n - 1]).sum())
               for n in range(1, N + 1)]
        return step, ups

    # ------------------------------------------------------------------ one round, many rounds
    def round_energy(self, taus: Sequence[int], hierarchy: Any, latency: LatencyModel, upload_bits: Sequence[int]
                     ) -> RoundEnergy:
        """E_glob(tau) and its split, everyone taking part (module docstring)."""
        from .convergence import check_taus

        step, ups = self.totals(hierarchy, latency, upload_bits)
        t = check_taus(taus, len(ups))
        compute = float(math.prod(t)) * step
        comm = tuple(aggregations_per_round(t, n) * ups[n - 1] for n in range(1, len(t) + 1))
        return RoundEnergy(total=compute + sum(comm), compute=compute, per_layer_comm=comm, link_time=tuple(ups))

    def round_energy_for(self, taus: Sequence[int], hierarchy: Any, latency: LatencyModel, quantizers: Sequence[Any],
                         d: int, buffer_elems: int = 0, local_solvers: Sequence[Any] | None = None) -> RoundEnergy:
        """:meth:`round_energy` with the bits of ``quantizers`` for a d-parameter model
        (:func:`~.latency.upload_bits`)."""
        return self.round_energy(taus, hierarchy, latency, upload_bits(quantizers, d, buffer_elems, local_solvers))

    def round_energy_grid(self, tau_grid: np.ndarray, hierarchy: Any, latency: LatencyModel,
                          upload_bits: Sequence[int]) -> np.ndarray:
        """Vectorised E_glob: ``tau_grid`` int array [K, N] -> float64 [K]."""
        return energy_grid(tau_grid, *self.totals(hierarchy, latency, upload_bits))


def energy_grid(tau_grid: np.ndarray, step_total: float, upload_totals: Sequence[float]) -> np.ndarray:
    """E_glob for many tau from :meth:`EnergyModel.totals`: prod tau * step_total + sum_n prod_{m>n} tau_m * up_n."""
    t = np.asarray(tau_grid, dtype=np.float64)
    total = np.prod(t, axis=1) * step_total
    suffix = np.ones(t.shape[0], dtype=np.float64)  # prod_{m>n} tau_m, from the top layer down
    for n in range(t.shape[1], 0, -1):
        total = total + suffix * upload_totals[n - 1]
        suffix = suffix * t[:, n - 1]
    return total


def default_energy(num_layers: int, compute_time: float) -> EnergyModel:
    """The cited defaults (module docstring): 0.2 W on the devices' links, 6.3 W above, and 5 W x ``compute_time``
    (seconds per local step, e.g. the latency model's) per local step."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    step = DEVICE_COMPUTE_POWER * _positive(compute_time, "compute_time (seconds per local step)")
    return EnergyModel(step_joules=step,
                       transmit_power=[DEVICE_TRANSMIT_POWER] + [EDGE_TRANSMIT_POWER] * (num_layers - 1))


# ---------------------------------------------------------------------- the planner's energy pieces
def planner_energy(energy: EnergyModel | None, budget: float | None, deadline: float | None, hierarchy: Any,
                   latency: LatencyModel, bits: Sequence[int]) -> tuple[EnergyModel | None, float | None, Any]:
    """Validate the planner's energy inputs: (model or None, budget or None, :meth:`EnergyModel.totals` or None).
    ``energy`` None falls back to the latency model's ``energy``."""
    if energy is None:
        energy = latency.energy
    if energy is not None and not isinstance(energy, EnergyModel):
        raise ValueError(f"energy must be an EnergyModel or None, got {type(energy).__name__}")
    if budget is not None:
        budget = _positive(budget, "energy_budget (joules)")
        if energy is None:
            raise ValueError("energy_budget needs an energy model: pass energy=EnergyModel(...) (or latency.energy)")
    if deadline is None and budget is None:
        raise ValueError("give a deadline (seconds), an energy_budget (joules), or both")
    return energy, budget, None if energy is None else energy.totals(hierarchy, latency, bits)


def rounds_within(deadline: float | None, t_glob: np.ndarray, budget: float | None, e_glob: np.ndarray | None,
                  slack: float) -> np.ndarray:
    """T(tau) = floor(min(T_d / T_glob, E_b / E_glob) + slack), a budget that is None left out (one is given)."""
    fits = np.full(np.shape(t_glob), np.inf) if deadline is None else deadline / np.asarray(t_glob)
    if budget is not None:
        fits = np.minimum(fits, budget / e_glob)
    return np.floor(fits + slack)


def explain_energy(ones: list[int], re: RoundEnergy, budget: float) -> list[str]:
    """Why tau = (1, ..., 1) exceeds the energy budget, and what would fit one global iteration."""
    parts = [f"compute {re.compute:.6g} J"] + [f"layer {n} uploads {c:.6g} J"
                                               for n, c in enumerate(re.per_layer_comm, start=1)]
    shares = [("computation", re.compute)] + [(f"layer {n}'s uploads", c)
                                              for n, c in enumerate(re.per_layer_comm, start=1)]
    name, worst = max(shares, key=lambda x: x[1])
    return [f"The energy budget binds: even tau = {ones} needs E_glob = {re.total:.6g} J for one global iteration "
            f"({', '.join(parts)}) > E_b = {budget:g} J.",
            f"* Larger energy budget: E_b >= {re.total:.6g} J allows one global iteration at tau = {ones}.",
            f"* The largest part is {name}: {worst:.6g} J of {re.total:.6g} J (an upload costs power x bits / rate: "
            f"coarser quantization, faster links or lower transmit power shrink it; cheaper steps shrink computation)."]


def energy_summary(rounds: int, re: RoundEnergy, budget: float | None, taus: Sequence[int]) -> list[str]:
    """The plan report's energy lines."""
    used = rounds * re.total
    tail = f"of the {budget:g} J budget" if budget is not None else "no energy budget"
    frac = re.fractions()
    lines = [f"energy E_glob       : {re.total:.6g} J per global iteration, {used:.6g} J for T = {rounds} ({tail})",
             f"  computation       : {re.compute:12.6g} J  ({100 * frac['compute']:5.1f} %)"]
    for n, c in enumerate(re.per_layer_comm, start=1):
        lines.append(f"  layer {n} uploads   : {c:12.6g} J  ({100 * frac[f'layer_{n}']:5.1f} %; "
                     f"{aggregations_per_round(taus, n)} x {re.per_aggregation[n - 1]:.6g} J)")
    return lines
