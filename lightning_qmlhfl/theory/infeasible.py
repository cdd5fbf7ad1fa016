"""Why the planner found no feasible tau (:func:`~lightning_qmlhfl.theory.planner.plan_taus`), in the words of the
:class:`~lightning_qmlhfl.theory.planner.InfeasiblePlanError` it raises: which part of one global iteration at
tau = (1, ..., 1) breaks the deadline, the energy budget or Eq. 15, and the numbers that would fix it (a longer
deadline, faster links, coarser quantization, a smaller learning rate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..compressors import QSGD
from .energy import explain_energy
from .latency import upload_bits

if TYPE_CHECKING:
    from .planner import _Problem

__all__ = ["explain_infeasible", "ROUND_SLACK"]

#: a budget met to within this relative slack counts as met (float rounding of an exact fit must not lose a round)
ROUND_SLACK = 1e-9


def explain_infeasible(prob: "_Problem") -> str:
    """Why tau = (1, ..., 1), the cheapest tau, fails, and what numbers would make it work."""
    ones = [1] * prob.N
    rt = prob.latency.round_time(ones, prob.bits, prob.down_bits, prob.hierarchy)
    T_d, E_b = prob.deadline, prob.energy_budget
    budgets = ([] if T_d is None else [f"deadline T_d = {T_d:g} s"]) + ([] if E_b is None else
                                                                        [f"energy budget E_b = {E_b:g} J"])
    lines = [f"no tau meets the constraints with {' and '.join(budgets)}."]
    re = prob._round_energy(ones)
    over_energy = E_b is not None and re.total > E_b * (1 + ROUND_SLACK)
    if T_d is not None and rt.total > T_d * (1 + ROUND_SLACK):
        parts = [f"compute {rt.compute:.6g} s"] + [
            f"layer {n} links {c:.6g} s" for n, c in enumerate(rt.per_layer_comm, start=1)
        ]
        lines.append(
            f"Even tau = {ones} needs T_glob = {rt.total:.6g} s for one global iteration ({', '.join(parts)})."
        )
        lines.append(f"* Longer deadline: T_d >= {rt.total:.6g} s allows one global iteration at tau = {ones}.")
        comm = rt.communication
        shares = [("computation", rt.compute)] + [
            (f"layer {n}'s communication", c) for n, c in enumerate(rt.per_layer_comm, start=1)
        ]
        name, worst = max(shares, key=lambda x: x[1])
        lines.append(f"* The largest part is {name}: {worst:.6g} s of {rt.total:.6g} s.")
        budget = T_d - rt.compute
        if budget <= 0:
            lines.append(
                f"* One local step alone takes {rt.compute:.6g} s >= the deadline: no quantization or link speed "
                f"helps; only a longer deadline, faster devices or a smaller model/batch do."
            )
        else:
            factor = comm / budget
            ups = ", ".join(
                f"layer {n}: {r:.4g} -> {r * factor:.4g} bits/s"
                for n, r in enumerate(prob.latency.slowest_uplink_rates, start=1)
            )
            which = "uplink and downlink" if prob.down_bits is not None else "uplink"
            lines.append(
                f"* Faster links: every {which} {factor:.4g}x faster ({ups}) fits one global iteration."
            )
            others = comm - max(rt.per_layer_comm)
            k = int(np.argmax(rt.per_layer_comm))
            if others < budget:
                f1 = rt.per_layer_comm[k] / (budget - others)
                r = prob.latency.slowest_uplink_rates[k]
                lines.append(f"  Or only layer {k + 1}'s links {f1:.4g}x faster ({r:.4g} -> {r * f1:.4g} bits/s).")
            lines.append(_coarser_quantization_hint(prob, ones, T_d))
    elif not over_energy:
        # Only the learning-rate condition (adapt_mu=False) can make tau = (1..1) infeasible here.
        ev = prob.evaluate(np.ones((1, prob.N), dtype=np.int64))
        mu_max = float(ev["mu_max"][0])
        lines.append(
            f"tau = {ones} fits the {'budgets' if E_b else 'deadline'} ({rt.total:.6g} s per global iteration) "
            f"but the learning rate "
            f"mu = {prob.mu:g} violates Eq. 15 even there (admissible: mu < {mu_max:.6g}, from the quantization "
            f"terms q_n = {[round(q, 6) for q in prob.qs]})."
        )
        lines.append(
            f"* Use mu < {mu_max:.6g}, finer quantization (more levels or smaller buckets), or adapt_mu=True "
            f"(the planner then lowers mu to {prob.safety:g} x mu_max)."
        )
    if over_energy:  # alone or beside the deadline
        lines += explain_energy(ones, re, E_b)
    return "\n".join(lines)

def _coarser_quantization_hint(prob: "_Problem", ones: list[int], T_d: float) -> str:
    for b in range(15, 0, -1):  # QSGD with s = 2^b - 1 levels sends 1 + b bits per entry (+32 per bucket)
        s = 2**b - 1
        qz = [QSGD(s, q.bucket_size) for q in prob.quantizers]
        bits = upload_bits(qz, prob.d, prob.buffer_elems, prob.local_solvers)
        if any(nb > ob for nb, ob in zip(bits, prob.bits)):
            continue  # never suggest more bits than now on any layer
        rt = prob.latency.round_time(ones, bits, prob.down_bits, prob.hierarchy)
        if rt.total <= T_d * (1 + ROUND_SLACK):
            return (
                f"* Coarser quantization: QSGD with s <= {s} levels on every uplink ({1 + b} bits per entry; "
                f"uploads {bits} bits instead of {prob.bits}) gives T_glob = {rt.total:.6g} s <= {T_d:g} s "
                f"(the learning-rate condition then tightens: q_n grows)."
            )
    qz = [QSGD(1, q.bucket_size) for q in prob.quantizers]
    rt = prob.latency.round_time(ones, upload_bits(qz, prob.d, prob.buffer_elems, prob.local_solvers),
                                 prob.down_bits, prob.hierarchy)
    return (
        f"* Coarser quantization alone cannot do it: even s = 1 (2 bits per entry) on every uplink gives "
        f"T_glob = {rt.total:.6g} s > {T_d:g} s."
    )
