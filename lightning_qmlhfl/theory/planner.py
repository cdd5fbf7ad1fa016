"""Choose the intra-layer counts tau_n under a deadline (docs/algorithm.md#planner; the paper's Algorithm 2 is not
recoverable, so the problem statement below is **ours**, built from the paper's pieces).

Problem. Over integer ``tau in [1, tau_max]^N`` maximise the rate proxy of Remark 2 (**paper**)::

    objective(tau) = mu(tau) * T(tau) * prod_n tau_n,      T(tau) = floor(T_d / T_glob(tau))

subject to T(tau) >= 1 (at least one global iteration fits the deadline T_d) and the learning-rate condition of
Theorem 1 (Eq. 15, :mod:`lightning_qmlhfl.theory`) holding at mu(tau). ``T_glob`` is :class:`LatencyModel`'s.
With an energy budget E_b (:mod:`.energy`, docs/algorithm.md#energy), ``T(tau) = floor(min(T_d / T_glob(tau),
E_b / E_glob(tau)))``; either budget may be left out (not both).

How mu enters (**ours**). With ``mu`` = the learning rate you intend to train with:

* ``adapt_mu=True`` (default): mu(tau) = mu where mu satisfies Eq. 15 at tau, else ``safety * mu_max(tau)``.
  Larger tau then buys more local progress per global iteration (prod tau) and amortises communication, until
  Eq. 15 binds; beyond that the learning rate must shrink roughly like 1 / prod tau, and rounds get longer, so the
  objective falls again. Every tau is admissible at its own mu(tau); the plan reports the mu to train with.
* ``adapt_mu=False``: mu(tau) = mu, and a tau at which mu violates Eq. 15 is infeasible.
* ``mu=None``: mu(tau) = safety * min(mu_max(tau), 1 / L) (1/L: the classic step-size limit of L-smooth SGD, needed
  because mu_max is infinite at tau = 1 without quantization). Caveat: since mu_max(tau) * prod tau is nearly constant
  in tau, this objective is close to "maximise T" and prefers prod tau of 1 or 2; pass your learning rate for a
  plan that trades local steps against communication.

Only the product L * mu matters. Ties (objective within a relative 1e-12) go to the smaller prod tau, then to the
lexicographically smaller tau. ``T`` is computed as floor(T_d / T_glob + 1e-9) so that float rounding of an exact
fit does not lose a round.

Search. T_glob, E_glob (a polynomial in tau with non-negative coefficients) and the bracket of Eq. 15 are all
non-decreasing in every tau_n, so the feasible set is a down-set:
if tau = (1, ..., 1) is infeasible nothing is, and every feasible tau_n is at most the largest value feasible with
all other counts at 1 (the per-layer caps).

* ``exact``: evaluates every tau in the box [1, cap_1] x ... x [1, cap_N] (vectorised with numpy, in chunks);
  refuses boxes larger than ``exact_limit`` points.
* ``heuristic`` (for large N): coordinate ascent (:mod:`.tau_search`). Starts from (1, ..., 1), from the best
  uniform tau = (k, ..., k) and from the best tau with a single layer above 1; repeatedly (a) line-searches each
  tau_n over [1, cap_n] with the others fixed, and, when no single coordinate improves, (b) searches pairs of
  layers on a grid over [1, cap_i] x [1, cap_j] (thinned to powers of two and a window around the current values
  beyond 48 values), then (c) every tau + delta with delta in {-1, 0, 1}^N (N <= 9); it stops when nothing improves
  the objective. It only ever moves to feasible points with a strictly better objective from a feasible start, so
  it never returns an infeasible tau; it is checked against the exact search in ``tests/test_planner.py``.
* ``auto``: exact when the box has at most ``exact_limit`` points, heuristic otherwise.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from ..hierarchy import Hierarchy, aggregations_per_round
from .latency import LatencyModel, RoundTime, _positive, downlink_bits, upload_bits
from .energy import (EnergyModel, RoundEnergy, energy_grid, energy_summary, planner_energy,
                     rounds_within)
from ..compressors import make_compressor
from .convergence import (aggregation_ratios, check_taus, lr_condition_bracket_grid, quantizer_variances,
                          warn_local_solvers)
from .infeasible import ROUND_SLACK, explain_infeasible
from .tau_search import TIE, TauSearch

__all__ = ["Plan", "InfeasiblePlanError", "plan_taus", "evaluate_taus"]

Method = Literal["auto", "exact", "heuristic"]

class InfeasiblePlanError(ValueError):
    """No tau meets the deadline / energy budget (and the learning-rate condition); the message says what would."""


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    taus: the chosen tau_n, n = 1..N (``None`` when infeasible). rounds: T, global iterations within the deadline.
    objective: mu * T * prod tau. mu: the learning rate to train with. mu_max: the supremum admissible at taus (Eq. 15).
    lr_condition: 1 - L^2 mu^2 * bracket at (mu, taus), > 0. round_time: T_glob(taus) split by compute and layer.
    feasible: whether any tau meets the constraints. method: "exact" or "heuristic". evaluated: tau values scored.
    message: for an infeasible problem, why and what would help (longer deadline, coarser quantization, faster links).
    deadline / energy_budget: the budgets (None: not given). round_energy: E_glob(taus) split by compute and layer
    (with an energy model); :attr:`energy`: rounds x E_glob, the joules the plan spends.
    """

    taus: tuple[int, ...] | None
    rounds: int
    objective: float
    mu: float | None
    mu_max: float | None
    lr_condition: float | None
    round_time: RoundTime | None
    feasible: bool
    method: str
    deadline: float | None
    evaluated: int
    message: str = ""
    expected_round_time: float | None = None  # under partial participation / availability (Monte Carlo), if given
    energy_budget: float | None = None
    round_energy: RoundEnergy | None = None

    @property
    def energy(self) -> float | None:
        """Joules of the planned T global iterations (None without an energy model)."""
        return None if self.round_energy is None else self.rounds * self.round_energy.total

    def require_feasible(self) -> "Plan":
        """Return self, or raise :class:`InfeasiblePlanError` with :attr:`message`."""
        if not self.feasible:
            raise InfeasiblePlanError(self.message)
        return self

    def summary(self) -> str:
        """A human-readable report: tau, rounds, time split, learning rate."""
        if not self.feasible:
            return self.message
        rt = self.round_time
        assert rt is not None and self.taus is not None
        used = self.rounds * rt.total
        lines = [
            f"chosen tau          : {list(self.taus)}  (prod = {math.prod(self.taus)} local steps per global iteration;"
            f" {self.method} search over {self.evaluated} candidates)",
            f"global iterations T : {self.rounds}  (T_glob = {rt.total:.6g} s, {used:.6g} s "
            + ("without a deadline)" if self.deadline is None else f"of the {self.deadline:g} s deadline)"),
            "time per global iteration:",
        ]
        frac = rt.fractions()
        lines.append(f"  computation       : {rt.compute:12.6g} s  ({100 * frac['compute']:5.1f} %)")
        for n, c in enumerate(rt.per_layer_comm, start=1):
            count = aggregations_per_round(self.taus, n)
            lines.append(
                f"  layer {n} links     : {c:12.6g} s  ({100 * frac[f'layer_{n}']:5.1f} %; "
                f"{count} x {rt.link_time[n - 1]:.6g} s)"
            )
        mu_max = "inf" if self.mu_max is None or math.isinf(self.mu_max) else f"{self.mu_max:.6g}"
        lines.append(
            f"learning rate mu    : {self.mu:.6g}  (admissible: mu < {mu_max}; Eq. 15 value {self.lr_condition:.4g})"
        )
        lines.append(f"rate proxy mu*T*prod(tau) : {self.objective:.6g}")
        if self.expected_round_time is not None:
            lines.append(f"expected T_glob under the given participation: {self.expected_round_time:.6g} s (the plan "
                         f"uses the everyone-takes-part time above, an upper bound of every round's time)")
        if self.round_energy is not None:
            lines += energy_summary(self.rounds, self.round_energy, self.energy_budget, self.taus)
        return "\n".join(lines)


class _Problem(TauSearch):
    """Everything the search needs, validated once; :meth:`evaluate` scores many tau at once."""

    def __init__(
        self,
        hierarchy: Hierarchy | Sequence[int],
        quantizers: Sequence[Any],
        d: int,
        latency: LatencyModel,
        deadline: float | None,
        L: float,
        mu: float | None,
        safety: float,
        adapt_mu: bool,
        tau_max: int,
        buffer_elems: int = 0,
        local_solvers: Sequence[Any] | None = None,
        energy: EnergyModel | None = None,
        energy_budget: float | None = None,
        qs: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(hierarchy, Hierarchy):
            hierarchy = Hierarchy.balanced(hierarchy)
        self.hierarchy = hierarchy
        N = hierarchy.num_layers
        self.N = N
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
            raise ValueError(f"d (the number of model parameters) must be an integer >= 1, got {d!r}")
        self.d = int(d)
        if isinstance(quantizers, (str, bytes)) or not isinstance(quantizers, Sequence) or len(quantizers) != N:
            raise ValueError(f"quantizers must list one quantizer spec per layer (N = {N}), got {quantizers!r}")
        self.quantizers = [make_compressor(q) for q in quantizers]
        if not isinstance(latency, LatencyModel):
            raise ValueError(f"latency must be a LatencyModel, got {type(latency).__name__}")
        if latency.num_layers != N:
            raise ValueError(f"the latency model describes {latency.num_layers} layers but the hierarchy has N = {N}")
        self.latency = latency
        self.deadline = None if deadline is None else _positive(deadline, "deadline (seconds)")
        self.L = _positive(L, "L (the smoothness constant)")
        self.mu = None if mu is None else _positive(mu, "mu (the learning rate)")
        s = _positive(safety, "safety")
        if s >= 1.0:
            raise ValueError(f"safety must be in (0, 1): mu = safety * mu_max must stay below mu_max; got {safety!r}")
        self.safety = s
        self.adapt_mu = bool(adapt_mu)
        if isinstance(tau_max, bool) or not isinstance(tau_max, numbers.Integral) or tau_max < 1:
            raise ValueError(f"tau_max must be an integer >= 1, got {tau_max!r}")
        self.tau_max = int(tau_max)
        if qs is not None and (isinstance(qs, (str, bytes)) or not isinstance(qs, Sequence) or len(qs) != N):
            raise ValueError(f"qs (measured q_n) must list one number >= 0 per layer (N = {N}), got {qs!r}")
        # Eq. 15's q_n: the compressors' bounds, or measured values (docs/algorithm.md#measured-constants)
        self.qs = quantizer_variances(self.quantizers, self.d) if qs is None else quantizer_variances([float(q) for q in qs])
        self.rhos = aggregation_ratios(hierarchy, N)
        self.buffer_elems = int(buffer_elems)
        self.local_solvers = None if local_solvers is None else list(local_solvers)
        self.bits = upload_bits(self.quantizers, self.d, self.buffer_elems, self.local_solvers)
        down = downlink_bits(self.d + self.buffer_elems)
        self.down_bits = down if latency.slowest_downlink_rates is not None else None
        self.link = latency.link_times(self.bits, self.down_bits)
        self.energy, self.energy_budget, self.energy_totals = planner_energy(
            energy, energy_budget, self.deadline, hierarchy, latency, self.bits)
        self.evaluated = 0

    # ------------------------------------------------------------------ scoring
    def evaluate(self, grid: np.ndarray) -> dict[str, np.ndarray]:
        """Score tau rows [K, N]: objective (-inf where infeasible), mu, mu_max, rounds, T_glob, feasible, bracket."""
        grid = np.asarray(grid, dtype=np.int64)
        self.evaluated += grid.shape[0]
        bracket = lr_condition_bracket_grid(grid, self.qs, self.rhos)
        with np.errstate(divide="ignore"):
            mu_max = np.where(bracket > 0, 1.0 / (self.L * np.sqrt(np.maximum(bracket, 1e-300))), np.inf)
        if self.mu is None:
            mu = self.safety * np.minimum(mu_max, 1.0 / self.L)
            lr_ok = np.ones(grid.shape[0], dtype=bool)
        else:
            admissible = (self.L * self.mu) ** 2 * bracket < 1.0
            if self.adapt_mu:
                mu = np.where(admissible, self.mu, self.safety * mu_max)
                lr_ok = np.ones(grid.shape[0], dtype=bool)
            else:
                mu = np.full(grid.shape[0], self.mu)
                lr_ok = admissible
        t_glob = self.latency.round_time_grid(grid, self.link, self.hierarchy, self.bits, self.down_bits)
        e_glob = None if self.energy is None else energy_grid(grid, *self.energy_totals)
        rounds = rounds_within(self.deadline, t_glob, self.energy_budget, e_glob, ROUND_SLACK)
        feasible = lr_ok & (rounds >= 1)
        prod = np.prod(grid.astype(np.float64), axis=1)
        objective = np.where(feasible, mu * rounds * prod, -np.inf)
        return {
            "objective": objective,
            "mu": mu,
            "mu_max": mu_max,
            "rounds": rounds,
            "t_glob": t_glob,
            "e_glob": e_glob,
            "feasible": feasible,
            "bracket": bracket,
        }

    def best_index(self, grid: np.ndarray, objective: np.ndarray) -> int | None:
        """Row of the best tau by (objective desc, prod tau asc, tau lexicographic asc); None if none feasible."""
        best = objective.max() if objective.size else -np.inf
        if not np.isfinite(best):
            return None
        cand = np.nonzero(objective >= best - abs(best) * TIE)[0]
        if cand.size == 1:
            return int(cand[0])
        sub = np.asarray(grid, dtype=np.int64)[cand]
        prod = np.prod(sub.astype(np.float64), axis=1)
        keys = tuple(sub[:, n] for n in range(sub.shape[1] - 1, -1, -1)) + (prod,)
        return int(cand[np.lexsort(keys)[0]])

    def caps(self) -> list[int]:
        """Per layer, the largest tau_n <= tau_max that is feasible with every other count at 1 (0: none)."""
        caps = []
        for n in range(self.N):
            line = np.ones((self.tau_max, self.N), dtype=np.int64)
            line[:, n] = np.arange(1, self.tau_max + 1)
            feas = self.evaluate(line)["feasible"]
            caps.append(int(np.nonzero(feas)[0].max()) + 1 if feas.any() else 0)
        return caps

    # ------------------------------------------------------------------ answers
    def plan_for(self, taus: Sequence[int], method: str) -> Plan:
        row = np.asarray([list(taus)], dtype=np.int64)
        ev = self.evaluate(row)
        self.evaluated -= 1
        rt = self.latency.round_time(list(taus), self.bits, self.down_bits, self.hierarchy)
        mu = float(ev["mu"][0])
        value = 1.0 - (self.L * mu) ** 2 * float(ev["bracket"][0])
        return Plan(
            taus=tuple(int(t) for t in taus),
            rounds=int(ev["rounds"][0]),
            objective=float(ev["objective"][0]),
            mu=mu,
            mu_max=float(ev["mu_max"][0]),
            lr_condition=value,
            round_time=rt,
            feasible=True,
            method=method,
            deadline=self.deadline,
            evaluated=self.evaluated,
            energy_budget=self.energy_budget,
            round_energy=self._round_energy(taus),
        )

    def infeasible(self, method: str) -> Plan:
        return Plan(
            taus=None,
            rounds=0,
            objective=0.0,
            mu=None,
            mu_max=None,
            lr_condition=None,
            round_time=None,
            feasible=False,
            method=method,
            deadline=self.deadline,
            evaluated=self.evaluated,
            message=explain_infeasible(self),
            energy_budget=self.energy_budget,
        )

    def _round_energy(self, taus: Sequence[int]) -> RoundEnergy | None:
        return None if self.energy is None else self.energy.round_energy(taus, self.hierarchy, self.latency,
                                                                           self.bits)


def plan_taus(
    hierarchy: Hierarchy | Sequence[int],
    quantizers: Sequence[Any],
    d: int,
    latency: LatencyModel,
    deadline: float | None,
    L: float,
    mu: float | None = None,
    *,
    safety: float = 0.5,
    adapt_mu: bool = True,
    tau_max: int = 32,
    method: Method = "auto",
    exact_limit: int = 500_000,
    buffer_elems: int = 0,
    participation: Sequence[Any] | None = None,
    availability: Any = None,
    local_solvers: Sequence[Any] | None = None,
    energy: EnergyModel | None = None,
    energy_budget: float | None = None,
    qs: Sequence[float] | None = None,
) -> Plan:
    """Integer tau_n >= 1 maximising mu * floor(T_d / T_glob(tau)) * prod tau under Eq. 15 (module docstring).

    hierarchy: the tree (or a balanced branching list); quantizers: one spec per layer n = 1..N (a Quantizer,
    an int s, ``None`` = 32-bit); d: number of model parameters; latency: the :class:`LatencyModel`; deadline: T_d in
    seconds; L: smoothness constant; mu: the learning rate you train with (``None``: chosen per tau);
    safety in (0, 1): mu = safety * mu_max where mu must be lowered; tau_max: search bound per layer;
    method: "exact", "heuristic" or "auto"; exact_limit: the largest box the exact search enumerates;
    buffer_elems: float buffer entries (BatchNorm statistics) that travel with every upload at 32 bits.
    The theory behind the rate (Eq. 15) covers unbiased compressors without error feedback and plain averaging
    (``Average()``) and local SGD only; other configurations get a TheoryWarning and are planned with the same
    formulas (``local_solvers``: one per layer; their extra uploads, SCAFFOLD's variates, are in the bits). T_glob follows the tree when the latency model is heterogeneous (the engine's clock with everyone taking
    part). With ``participation`` (one rule per layer) / ``availability`` the plan still uses that time, an upper
    bound of every round's time under any selection (a subset's slowest sender is never slower, drops only
    shorten a period), and reports the expected round time under them (Monte Carlo with the engine's clock).
    energy: an :class:`~.energy.EnergyModel` (default ``latency.energy``; the plan then reports E_glob and its
    total); energy_budget: E_b in joules for the whole system; with it ``deadline`` may be None; qs: the q_n of
    Eq. 15 per layer when measured (:class:`~.measured.MeasuredConstants`), instead of the compressors' bounds
    (the compressors still give the bits). Returns a :class:`Plan`; when nothing is feasible, ``plan.feasible`` is False and ``plan.message`` says what
    would help (``plan.require_feasible()`` raises :class:`InfeasiblePlanError` with it).
    """
    if method not in ("auto", "exact", "heuristic"):
        raise ValueError(f"method must be 'auto', 'exact' or 'heuristic', got {method!r}")
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, numbers.Integral) or exact_limit < 1:
        raise ValueError(f"exact_limit must be an integer >= 1, got {exact_limit!r}")
    if local_solvers is not None:
        from ..optimizers.local_solvers import make_local_solver

        local_solvers = [make_local_solver(x) for x in local_solvers]
        warn_local_solvers(local_solvers)
    prob = _Problem(hierarchy, quantizers, d, latency, deadline, L, mu, safety, adapt_mu, tau_max, buffer_elems,
                    local_solvers, energy, energy_budget, qs)
    caps = prob.caps()
    if min(caps) == 0:  # (1, ..., 1) is infeasible, hence every tau is (module docstring)
        return prob.infeasible("exact" if method == "auto" else method)
    if method == "auto":
        method = "exact" if math.prod(caps) <= exact_limit else "heuristic"
    plan = prob.exact(caps, int(exact_limit)) if method == "exact" else prob.heuristic(caps)
    return _with_expected_time(plan, prob, participation, availability)


def _with_expected_time(plan: Plan, prob: "_Problem", participation: Sequence[Any] | None, availability: Any
                        ) -> Plan:
    """The plan with its expected round time under partial participation / availability (when given)."""
    if plan.taus is None or (participation is None and availability is None):
        return plan
    from dataclasses import replace

    from ..federation.participation import validate_participation
    from ..federation.population import estimate_round_time

    parts = validate_participation(participation, prob.N)
    if all(p.is_full for p in parts) and availability is None:
        return plan
    down = None if prob.down_bits is None else [prob.down_bits] * prob.N
    mean, _ = estimate_round_time(prob.hierarchy, plan.taus, prob.latency, prob.bits, parts, availability, down)
    return replace(plan, expected_round_time=mean)


def evaluate_taus(
    taus: Sequence[int],
    hierarchy: Hierarchy | Sequence[int],
    quantizers: Sequence[Any],
    d: int,
    latency: LatencyModel,
    deadline: float | None,
    L: float,
    mu: float | None = None,
    *,
    safety: float = 0.5,
    adapt_mu: bool = True,
    buffer_elems: int = 0,
    energy: EnergyModel | None = None,
    energy_budget: float | None = None,
    qs: Sequence[float] | None = None,
) -> Plan:
    """Score one given tau the way :func:`plan_taus` does (e.g. a random feasible tau for comparison).

    Returns a Plan with ``method="given"``; ``feasible`` is False (with the reason) when tau misses the deadline or
    the energy budget or, with ``adapt_mu=False``, violates Eq. 15.
    """
    prob = _Problem(hierarchy, quantizers, d, latency, deadline, L, mu, safety, adapt_mu, 1, buffer_elems, None,
                    energy, energy_budget, qs)
    t = check_taus(taus, prob.N)
    ev = prob.evaluate(np.asarray([t], dtype=np.int64))
    if not ev["feasible"][0]:
        T_d, E_b, slack = prob.deadline, prob.energy_budget, 1 + ROUND_SLACK
        why = (
            f"tau = {list(t)} is infeasible: T_glob = {ev['t_glob'][0]:.6g} s"
            + (f" > deadline {T_d:g} s" if T_d is not None and ev["t_glob"][0] > T_d * slack else "")
            + (f"; E_glob = {ev['e_glob'][0]:.6g} J > energy budget {E_b:g} J" if E_b and ev["e_glob"][0] > E_b * slack
               else "")
            + ("" if ev["rounds"][0] < 1 else f"; mu = {mu:g} violates Eq. 15 (mu_max = {ev['mu_max'][0]:.6g})")
        )
        return Plan(None, 0, 0.0, None, None, None, None, False, "given", prob.deadline, 1, why,
                    energy_budget=prob.energy_budget)
    return prob.plan_for(list(t), "given")
