"""The device-level privacy guarantee of a hierarchy with Gaussian noise at some layers, computed with Google's
``dp-accounting`` library (its RDP and PLD accountants; docs/privacy.md#accounting).

**Noise points.** A :class:`NoisePoint` is one place in the hierarchy where noise is added: ``where="local"`` at
layer n (every sender into layer n, a node of layer n-1, noises its own clipped upload) or ``where="central"`` at
layer n (every node of layer n noises the weighted sum of the clipped uploads it received). Per global round the
layer-n aggregation happens prod_{m > n} tau_m times (``events_per_round``); in each one a device influences exactly
one sender into layer n and one node of layer n (the tree gives every device one parent per layer), and the nodes
of a layer see disjoint devices, so per aggregation a device takes part in one Gaussian release of the point
(parallel composition across nodes) and the releases of successive aggregations compose adaptively.

**Adjacency.** The guarantee is device-level: two federations are neighbours when one device's contribution is
added or removed (equivalently, for every analysis used here, replaced by a zero update: the zero-out relation,
Kairouz et al. 2021 Def. 1.1, under which the participation draws and the aggregation weights are the same in both).
What that means for one release depends on who the senders are:

- layer 1: the senders are the devices. One device's clipped upload moves the sum by at most C (times its weight,
  which the noise std already carries): the Gaussian's multiplier is z; analysed under the library's
  ``ADD_OR_REMOVE_ONE`` relation.
- layer n > 1: a sender is a node of layer n-1, present in both neighbours; its upload changes from u to u' when one
  of its devices changes, both clipped to C, so ||u - u'|| <= 2C: replace-one at the sender level, sensitivity 2C,
  effective multiplier z / 2. Analysed as a Gaussian with multiplier z / 2 (identical, for a release without
  subsampling, to the PLD accountant's ``REPLACE_ONE`` relation with multiplier z, which doubles the shift itself;
  the RDP accountant's ``REPLACE_ONE`` does *not* double it: its multiplier is the std over the relation's
  sensitivity, so it is given z / 2).

**Amplification by sampling** (only where the library has an analysis for it):

- local noise: none (the receiver sees who sent, and every upload is released on its own).
- central, Bernoulli participation (Poisson sampling with rate p): ``PoissonSampledDpEvent(p, Gaussian)``. At
  layer 1 under ``ADD_OR_REMOVE_ONE`` with both accountants. At layer n > 1 (replace-one): the PLD accountant
  supports it (``REPLACE_ONE`` with the mixtures q N(+C) + (1-q) N(0) vs q N(-C) + (1-q) N(0)); the RDP accountant
  supports Poisson only for add/remove, so there the release is accounted *without* amplification.
- central, fixed-size participation (Fraction / UniformK: k of the n children of a node, uniformly without
  replacement): ``SampledWithoutReplacementDpEvent(n, k, Gaussian)``, which only the RDP accountant supports and
  only under ``REPLACE_ONE`` (Wang, Balle, Kasiviswanathan 2019, Thm 27, n public). It is given the replace-one
  sensitivity 2C (multiplier z / 2) at every layer: at layer 1 this is conservative (the zero-out pairs are
  replace-one pairs at distance <= C <= 2C), so the accountant also computes the release without amplification
  (multiplier z) and keeps the smaller epsilon: both are valid upper bounds. The PLD accountant has no
  without-replacement analysis: fixed-size sampling gets no amplification there.

**The device-level guarantee** against an observer outside the federation (who sees the cloud's models, or anything
computed after every noise point) is the minimum of the points' epsilons: everything downstream of one point is
post-processing of that point's releases (the device's data enters the rest of the system only through them), so
each point alone bounds it. ``epsilon(..., observer_layer=L)`` bounds what the nodes of layer L see instead: only
the points below them count (local noise at layers <= L, central noise at layers < L).

**Where the numbers are upper bounds, not exact**: RDP's conversion to (epsilon, delta) is loose (PLD is tight up to
its pessimistic discretisation); every release is charged the worst-case sensitivity although a device's influence
is diluted by the aggregations below; the minimum ignores that several noise points together protect more than the
best one alone; sampling at the layers below a point, and any sampling at all for local noise, are not credited;
local noise is charged for every aggregation whether or not the sender took part. **Assumptions** (not checked
here, and the guarantee does not hold without them): a device has one parent per layer during each period (no
mobility within a period); every child is available when fixed-size samples are drawn (unavailability makes the
actual sampling rate k / (available children) larger than k / n); with over-selection the rate is that of the
ceil(k (1 + o)) children drawn; aggregation weights and participation do not depend on the data; nothing else about
the devices' data leaves them (metrics, logs of un-noised norms or clip fractions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dp_accounting
import torch
from dp_accounting import pld, rdp

from .. import checks
from ..federation.participation import Bernoulli, Fraction, Full, Participation, UniformK, validate_participation
from ..hierarchy import Hierarchy, aggregations_per_round
from .mechanisms import GaussianDP, Privacy, make_privacy

__all__ = ["NoisePoint", "Analysis", "PrivacyAccountant", "ACCOUNTANTS", "SAMPLINGS", "analyses",
           "point_epsilon", "calibrate_noise_multiplier", "noise_points", "DP_ACCOUNTING_VERSION"]

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("none", "poisson", "fixed")
PLD_DISCRETIZATION = 1e-4  # the library's default value_discretization_interval

try:
    from importlib.metadata import version as _version
    DP_ACCOUNTING_VERSION = _version("dp-accounting")
except Exception:  # pragma: no cover - metadata missing in an unusual install
    DP_ACCOUNTING_VERSION = "unknown"

Relation = dp_accounting.NeighboringRelation


@dataclass(frozen=True)
class NoisePoint:
    """One place where noise is added (module docstring).

    ``layer`` (1..N): the aggregation layer; ``where``: ``"local"`` (the senders into ``layer`` noise their uploads)
    or ``"central"`` (the nodes of ``layer`` noise their aggregates); ``noise_multiplier``: z (None: to be found by
    :func:`calibrate_noise_multiplier`); ``events_per_round``: aggregations of ``layer`` per global round;
    ``sampling``: how the senders of one aggregation are drawn, ``"none"`` (all), ``"poisson"`` (each
    independently with probability ``sampling_rate``) or ``"fixed"`` (``sample_size`` of the ``population``
    children of a node, uniformly without replacement; ``sampling_rate`` is then ``sample_size / population``).
    Local noise takes no sampling (it gets no amplification)."""

    layer: int
    where: str
    noise_multiplier: float | None
    events_per_round: int
    sampling: str = "none"
    sampling_rate: float | None = None
    population: int | None = None
    sample_size: int | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("layer", checks.integer(self.layer, "NoisePoint layer", minimum=1))
        set_("where", checks.choice(self.where, "NoisePoint where", ("local", "central")))
        set_("noise_multiplier", checks.real(self.noise_multiplier, "NoisePoint noise_multiplier", 0.0,
                                             allow_none=True))
        set_("events_per_round", checks.integer(self.events_per_round, "NoisePoint events_per_round", minimum=1))
        set_("sampling", checks.choice(self.sampling, "NoisePoint sampling", SAMPLINGS))
        if self.where == "local" and self.sampling != "none":
            raise ValueError(f"NoisePoint sampling must be 'none' for local noise (the receiver sees who sent: no "
                             f"amplification by sampling), got {self.sampling!r}")
        if self.sampling == "fixed":
            n = checks.integer(self.population, "NoisePoint population (fixed-size sampling)", minimum=1)
            k = checks.integer(self.sample_size, "NoisePoint sample_size (fixed-size sampling)", minimum=1,
                               maximum=n)
            rate = k / n
            if self.sampling_rate is not None and not math.isclose(float(self.sampling_rate), rate, rel_tol=1e-12):
                raise ValueError(f"NoisePoint sampling_rate must be sample_size / population = {k}/{n} for "
                                 f"fixed-size sampling (or None), got {self.sampling_rate!r}")
            set_("population", n)
            set_("sample_size", k)
            set_("sampling_rate", rate)
            return
        if self.population is not None or self.sample_size is not None:
            raise ValueError(f"NoisePoint population / sample_size are for sampling='fixed', got sampling="
                             f"{self.sampling!r} with population={self.population!r}, "
                             f"sample_size={self.sample_size!r}")
        if self.sampling == "poisson":
            set_("sampling_rate", checks.probability(self.sampling_rate, "NoisePoint sampling_rate (poisson)",
                                                     zero=False))
        else:
            rate = 1.0 if self.sampling_rate is None else self.sampling_rate
            if rate != 1.0:
                raise ValueError(f"NoisePoint sampling_rate must be 1 (or None) with sampling='none', got "
                                 f"{self.sampling_rate!r}")
            set_("sampling_rate", 1.0)

    @property
    def sensitivity_factor(self) -> int:
        """1 at layer 1 (the senders are the devices), 2 above (replace-one at the sender level)."""
        return 1 if self.layer == 1 else 2

    def with_noise_multiplier(self, noise_multiplier: float) -> "NoisePoint":
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


@dataclass(frozen=True)
class Analysis:
    """How one aggregation's release of a point is accounted: the library's ``relation``, a function from z to the
    ``DpEvent`` of one aggregation, whether sampling amplifies it, and a one-line description."""

    relation: Any  # dp_accounting.NeighboringRelation
    event: Callable[[float], Any]
    amplified: bool
    description: str


def _check_accountant(accountant: str) -> str:
    return checks.choice(accountant, "accountant", ACCOUNTANTS)


def analyses(point: NoisePoint, accountant: str = "rdp") -> list[Analysis]:
    """The valid analyses of ``point`` with ``accountant`` (module docstring: adjacency and amplification); its
    epsilon is the smallest of theirs."""
    _check_accountant(accountant)
    f = point.sensitivity_factor
    q = point.sampling_rate
    sender = "device" if f == 1 else f"layer-{point.layer - 1} node (replace-one, sensitivity 2C)"

    def plain(desc: str) -> Analysis:
        return Analysis(Relation.ADD_OR_REMOVE_ONE, lambda z: dp_accounting.GaussianDpEvent(z / f), False,
                        f"Gaussian, multiplier z/{f}, per {sender}, no amplification{desc}")

    if point.where == "local" or point.sampling == "none":
        return [plain(" (local noise)" if point.where == "local" else "")]
    if point.sampling == "poisson":
        if f == 1:
            return [Analysis(Relation.ADD_OR_REMOVE_ONE,
                             lambda z: dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                             True, f"Poisson-subsampled Gaussian (rate {q:g}), multiplier z, add/remove one device")]
        if accountant == "pld":
            return [Analysis(Relation.REPLACE_ONE,
                             lambda z: dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                             True, f"Poisson-subsampled Gaussian (rate {q:g}), PLD replace-one (shift 2C), "
                                   f"per {sender}")]
        return [plain(" (the RDP accountant has no replace-one Poisson analysis; use accountant='pld')")]
    # fixed-size sampling without replacement
    n, k = point.population, point.sample_size
    if accountant == "pld":
        return [plain(" (the PLD accountant has no sampling-without-replacement analysis; use accountant='rdp')")]
    wor = Analysis(Relation.REPLACE_ONE,
                   lambda z: dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z / 2)),
                   True, f"sampled without replacement ({k} of {n}), RDP replace-one, multiplier z/2")
    return [wor, plain("")]


def _make_accountant(accountant: str, relation: Any, discretization: float) -> Any:
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    return pld.PLDAccountant(relation, value_discretization_interval=discretization)


def _check_rounds_delta(rounds: object, delta: object) -> tuple[int, float]:
    r = checks.integer(rounds, "rounds", minimum=0)
    d = checks.real(delta, "delta", 0.0, 1.0, low_open=True, high_open=True)
    return r, d


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(point: NoisePoint, rounds: int, delta: float, accountant: str,
                    discretization: float) -> tuple[float, int]:
    z = point.noise_multiplier
    if rounds == 0:
        return 0.0, -1
    if z == 0.0:
        return math.inf, -1
    best, which = math.inf, -1
    for i, a in enumerate(analyses(point, accountant)):
        acc = _make_accountant(accountant, a.relation, discretization)
        acc.compose(dp_accounting.SelfComposedDpEvent(a.event(z), point.events_per_round * rounds))
        eps = float(acc.get_epsilon(delta))
        if eps < best:
            best, which = eps, i
    return best, which


def point_epsilon(point: NoisePoint, rounds: int, delta: float, accountant: str = "rdp",
                  pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """epsilon of ``point`` after ``rounds`` global rounds at ``delta`` (the smallest over :func:`analyses`)."""
    if point.noise_multiplier is None:
        raise ValueError(f"{point!r} has no noise_multiplier: calibrate it first (calibrate_noise_multiplier)")
    r, d = _check_rounds_delta(rounds, delta)
    return _epsilon_cached(point, r, d, _check_accountant(accountant), float(pld_discretization))[0]


class PrivacyAccountant:
    """The device-level guarantee of a list of noise points (module docstring). ``accountant``: ``"rdp"`` (the
    default: fast, and the only one of the library's accountants with fixed-size sampling) or ``"pld"`` (tighter
    and with Poisson amplification above layer 1; slower, more so for large epsilons)."""

    def __init__(self, points: Sequence[NoisePoint], accountant: str = "rdp",
                 pld_discretization: float = PLD_DISCRETIZATION) -> None:
        self.points = tuple(checks.instance(p, "a noise point", NoisePoint) for p in points)
        for p in self.points:
            if p.noise_multiplier is None:
                raise ValueError(f"{p!r} has no noise_multiplier: calibrate it first (calibrate_noise_multiplier)")
        self.accountant = _check_accountant(accountant)
        self.pld_discretization = checks.real(pld_discretization, "pld_discretization", 0.0, low_open=True)

    def point_epsilon(self, point: NoisePoint, rounds: int, delta: float) -> float:
        return point_epsilon(point, rounds, delta, self.accountant, self.pld_discretization)

    def epsilons(self, rounds: int, delta: float) -> list[float]:
        """epsilon of every point, in order."""
        return [self.point_epsilon(p, rounds, delta) for p in self.points]

    def _counts_for(self, point: NoisePoint, observer_layer: int | None) -> bool:
        if observer_layer is None:
            return True
        return point.layer <= observer_layer if point.where == "local" else point.layer < observer_layer

    def epsilon(self, rounds: int, delta: float, observer_layer: int | None = None) -> float:
        """The device-level epsilon after ``rounds`` global rounds at ``delta``: the smallest of the points'
        (module docstring). ``observer_layer=L``: against the nodes of layer L instead of the outside world (only
        the points below them count). inf when no point protects."""
        if observer_layer is not None:
            checks.integer(observer_layer, "observer_layer", minimum=1)
        eps = [self.point_epsilon(p, rounds, delta) for p in self.points if self._counts_for(p, observer_layer)]
        return min(eps, default=math.inf)

    def report(self, rounds: int, delta: float) -> list[dict[str, Any]]:
        """One dict per point: its fields, epsilon and the analysis that gave it."""
        out = []
        for p in self.points:
            r, d = _check_rounds_delta(rounds, delta)
            eps, which = _epsilon_cached(p, r, d, self.accountant, self.pld_discretization)
            how = analyses(p, self.accountant)[which].description if which >= 0 else (
                "no noise" if p.noise_multiplier == 0 else "no release yet")
            out.append({**dataclasses.asdict(p), "epsilon": eps, "delta": d, "rounds": r,
                        "accountant": f"{self.accountant} (dp-accounting {DP_ACCOUNTING_VERSION})",
                        "analysis": how})
        return out

    def __repr__(self) -> str:
        return f"PrivacyAccountant({list(self.points)!r}, accountant={self.accountant!r})"


# ------------------------------------------------------------------------------------------------------ calibration

def _bracket(gap: Callable[[float], float], guess: float) -> tuple[float, float]:
    """[lo, hi] with gap(lo) > 0 >= gap(hi), by doubling / halving from ``guess`` (gap decreases in z)."""
    z = guess
    if gap(z) > 0:
        for _ in range(40):
            z *= 2.0
            if gap(z) <= 0:
                return z / 2.0, z
        raise ValueError(f"no noise multiplier up to {z:g} reaches the target epsilon")
    for _ in range(40):
        z /= 2.0
        if gap(z) > 0:
            return z, 2.0 * z
    raise ValueError(f"the target epsilon is met even with noise multiplier {z:g}: the target is too loose to "
                     f"calibrate")


def calibrate_noise_multiplier(point: NoisePoint, target_epsilon: float, delta: float, rounds: int,
                               accountant: str = "rdp", tol: float = 1e-4,
                               pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """The smallest noise multiplier z (within ``tol``) for which ``point`` (its own noise_multiplier ignored) has
    epsilon <= ``target_epsilon`` after ``rounds`` global rounds at ``delta``, found by the library's
    ``calibrate_dp_mechanism`` (Brent's method, with its guarantee that the returned z meets the target) for every
    analysis of the point; the smallest of their answers."""
    eps_t = checks.real(target_epsilon, "target_epsilon", 0.0, low_open=True)
    r, d = _check_rounds_delta(rounds, delta)
    if r == 0:
        raise ValueError("rounds must be >= 1 to calibrate (no release, no noise needed), got 0")
    acc_kind = _check_accountant(accountant)
    t = checks.real(tol, "tol", 0.0, low_open=True)
    disc = checks.real(pld_discretization, "pld_discretization", 0.0, low_open=True)
    count = point.events_per_round * r
    guess = 1.0
    if acc_kind == "pld":  # a cheap start: the RDP answer (PLD's are no larger for the same release)
        guess = max(calibrate_noise_multiplier(point, eps_t, d, r, "rdp", tol=max(t, 1e-3)), 1e-3)
    best = math.inf
    for a in analyses(point, acc_kind):
        def fresh(a: Analysis = a) -> Any:
            return _make_accountant(acc_kind, a.relation, disc)

        def event(z: float, a: Analysis = a) -> Any:
            return dp_accounting.SelfComposedDpEvent(a.event(z), count)

        def gap(z: float) -> float:
            return fresh().compose(event(z)).get_epsilon(d) - eps_t

        lo, hi = _bracket(gap, guess)
        z = dp_accounting.calibrate_dp_mechanism(
            fresh, event, eps_t, d, bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=t)
        best = min(best, float(z))
    return best


# ---------------------------------------------------------------------------------- noise points of a configuration

def _children_counts(hierarchy: Hierarchy | Sequence[int], num_layers: int) -> list[list[int]]:
    """Per layer n = 1..N, the number of children of each node of layer n."""
    if isinstance(hierarchy, Hierarchy):
        if hierarchy.num_layers != num_layers:
            raise ValueError(f"the hierarchy has N = {hierarchy.num_layers} layers but taus has {num_layers} entries")
        out = []
        for n in range(1, num_layers + 1):
            counts = [0] * hierarchy.nodes_per_layer[n]
            for p in hierarchy.parents[n - 1]:
                counts[p] += 1
            out.append(counts)
        return out
    if isinstance(hierarchy, (str, bytes)) or not isinstance(hierarchy, Sequence):
        raise ValueError(f"hierarchy_nodes_per_layer must be a Hierarchy or the N+1 node counts per layer (devices "
                         f"first, 1 for the cloud), got {hierarchy!r}")
    sizes = [checks.integer(s, f"hierarchy_nodes_per_layer[{i}]", minimum=1) for i, s in enumerate(hierarchy)]
    if len(sizes) != num_layers + 1 or sizes[-1] != 1:
        raise ValueError(f"hierarchy_nodes_per_layer must list N+1 = {num_layers + 1} node counts, devices first and "
                         f"1 (the cloud) last, got {tuple(hierarchy)!r}")
    out = []
    for n in range(1, num_layers + 1):
        if sizes[n - 1] % sizes[n]:
            raise ValueError(f"hierarchy_nodes_per_layer {tuple(hierarchy)!r}: {sizes[n - 1]} nodes of layer {n - 1} "
                             f"do not split evenly over {sizes[n]} nodes of layer {n}; pass the Hierarchy itself "
                             f"for an uneven tree")
        out.append([sizes[n - 1] // sizes[n]] * sizes[n])
    return out


def _sampling(rule: Participation, counts: list[int], layer: int) -> dict[str, Any]:
    """NoisePoint sampling fields of one layer's participation rule (the worst node: the largest rate)."""
    if isinstance(rule, Full):
        return {}
    if isinstance(rule, Bernoulli):
        return {} if rule.p == 1.0 else {"sampling": "poisson", "sampling_rate": rule.p}
    if isinstance(rule, (Fraction, UniformK)):
        if isinstance(rule, UniformK) and rule.k > min(counts):
            raise ValueError(f"{rule!r} at layer {layer}: a node has only {min(counts)} children (k must be <= every "
                             f"node's number of children)")
        worst: tuple[float, int, int] | None = None
        for c in sorted(set(counts)):
            k = int(rule._targets(torch.tensor([c]))[0])  # the rule's own k_p (Fraction: max(1, round(f n_p)))
            drawn = min(c, math.ceil(k * (1 + rule.over_select)))
            if worst is None or drawn / c > worst[0] * (1 + 1e-15):
                worst = (drawn / c, c, drawn)
        assert worst is not None
        _, n, k = worst
        return {} if k == n else {"sampling": "fixed", "population": n, "sample_size": k}
    raise ValueError(f"cannot account for the participation rule {rule!r} at layer {layer}: only Full, Bernoulli, "
                     f"Fraction and UniformK are known")


def noise_points(hierarchy_nodes_per_layer: Hierarchy | Sequence[int], taus: Sequence[int],
                 privacy: Privacy | Sequence[Any], participation: Any = None) -> list[NoisePoint]:
    """The noise points of a configuration, lowest layer first.

    ``hierarchy_nodes_per_layer``: the :class:`~lightning_qmlhfl.hierarchy.Hierarchy`, or its ``nodes_per_layer``
    (N+1 counts, devices first; a balanced tree is assumed); ``taus``: tau_1..tau_N; ``privacy``: one option per
    layer (or one for all; config values are accepted); ``participation``: one rule per layer, one for all, or None
    (Full). Layer n's point has prod_{m > n} tau_m events per round; central noise takes the sampling of layer n's
    rule: Full -> none, Bernoulli(p) -> Poisson with rate p, Fraction / UniformK -> fixed-size at the node with the
    largest rate k_p / n_p (UniformK: the fewest children; with over-selection the ceil(k (1 + o)) children drawn).
    """
    if isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence) or len(taus) == 0:
        raise ValueError(f"taus must be a list of N integers >= 1, got {taus!r}")
    tau = [checks.integer(t, f"taus[{i}]", minimum=1) for i, t in enumerate(taus)]
    N = len(tau)
    counts = _children_counts(hierarchy_nodes_per_layer, N)
    if privacy is None or isinstance(privacy, (Privacy, str)) or hasattr(privacy, "items"):
        privs = [make_privacy(privacy)] * N
    else:
        privs = [make_privacy(p) for p in privacy]
        if len(privs) != N:
            raise ValueError(f"privacy has length {len(privs)} but the hierarchy has N = {N} layers: give one option "
                             f"per layer or one for all")
    rules = validate_participation(participation, N)
    out = []
    for n in range(1, N + 1):
        p = privs[n - 1]
        if p.is_off:
            continue
        if not isinstance(p, GaussianDP):
            raise ValueError(f"cannot account for the privacy option {p!r} at layer {n}")
        extra = _sampling(rules[n - 1], counts[n - 1], n) if p.where == "central" else {}
        out.append(NoisePoint(layer=n, where=p.where, noise_multiplier=p.noise_multiplier,
                              events_per_round=aggregations_per_round(tau, n), **extra))
    return out
