"""Convergence theory of QMLHFL: the learning-rate condition of Theorem 1 (Eq. 15) and the rate proxy.

What is the paper's and what is this project's (docs/algorithm.md#eq-15):

* ``q_bound(s, d) = min(d / s^2, sqrt(d) / s)``: the QSGD variance bound (**paper**: E||Q(x)-x||^2 <= q ||x||^2;
  the QSGD constant is the scheme this project uses).
* Eq. 15 reads ``1 - L^2 mu^2 [ bracket ] > 0``. Only the start of the bracket survived (**paper**)::

      tau_1 (tau_1 - 1) / 2                                              drift_1   (paper)
    + sum_{n=2..N} tau_n (tau_n - 1) / 2 * prod_{m<n} tau_m^2            drift_n   (paper)
    + q_1 tau_2 tau_1^2                                                  quant_1   (paper, N >= 2)
    + sum_{n=1..N-2} prod_{m<=n+2} tau_m * max(...) + ...                (truncated)

  The truncated remainder (the quantization noise of layers 2..N, and of layer 1 when N = 1) is **this
  project's completion**, built by repeating the accounting that reproduces the recovered ``q_1 tau_2 tau_1^2``:

  - One upload of layer n is the model difference accumulated over ``P_n = tau_1 ... tau_n`` local steps, so its
    squared norm is at most ``P_n`` times the sum of the squared (scaled) gradients it contains.
  - The quantization error it carries (variance ``q_n ||x||^2``) stays in the subtree's model until the next
    aggregation of layer n+1, i.e. for at most ``tau_{n+1} P_n`` local steps. Summed over the ``tau_{n+1}``
    uploads inside one layer-(n+1) period, each gradient picks up a coefficient ``q_n tau_{n+1} P_n^2``.
    For n = 1 this is exactly the recovered ``q_1 tau_2 tau_1^2``. For layers k = 2..N-1 the term has the form
    ``prod_{m<=k+1} tau_m * X_k``, the shape of the recovered ``sum_{n=1..N-2} prod_{m<=n+2} tau_m * max(...)`` with
    k = n+1; ``X_k = rho_k q_k P_k prod_{m<k}(1 + rho_m q_m)`` (next two points) stands in for the lost ``max(...)``.
  - **Device-count ratio** (ours, n >= 2): a parent averages the independent errors of its children with weights
    ``w_c = |C(c)| / |C(p)|``, so the variance of the averaged error is at most ``max_c w_c`` times the average
    variance. ``rho_n`` = the largest aggregation weight of layer n (``Hierarchy.aggregation_weights(n).max()``).
    The recovered layer-1 term carries no ratio, so ``rho_1 = 1`` (the paper's term is kept exactly as found).
  - **Propagation** (ours, n >= 2): the difference a layer-n node uploads is built from the quantized uploads of
    the layers below it; an unbiased quantizer inflates second moments by ``(1 + rho_m q_m)``, so the layer-n term
    carries ``prod_{m<n} (1 + rho_m q_m)``. This is where lower layers are "multiplied by more inner steps": q_1
    enters the layer-1 term and, through this factor, every term above it, each with the inner steps of its layer,
    while q_N enters only the cloud's term (the seed summary's ``(1+q_1)(1+q_2)...`` accumulation).
  - **The cloud (layer N)** (ours): its error is common to all devices, so it causes no drift between them, but
    it perturbs the next global round's start; it is counted like the others with the convention
    ``tau_{N+1} := 1`` (one cloud aggregation per global round). For N = 1 (FedPAQ) this gives ``q_1 tau_1^2``.

  In full, with ``P_n = prod_{m<=n} tau_m``, ``tau_{N+1} = 1``, ``rho_1 = 1``::

      quant_n = rho_n q_n tau_{n+1} P_n^2 prod_{m<n} (1 + rho_m q_m)

  Reductions: no quantization (all q_n = 0) leaves only the paper's drift terms; N = 1 gives
  ``tau_1 (tau_1 - 1)/2 + q_1 tau_1^2``; N = 2 gives the paper's three terms plus
  ``rho_2 q_2 (1 + q_1) tau_1^2 tau_2^2``.
  Sensitivity, honestly stated: for N = 2 with q_1 = q_2 the bracket's slope in q_1 exceeds its slope in q_2
  exactly when ``rho_2 tau_2 <= 1`` (tau_2 at most the edges' fan-in in a balanced tree), the usual regime.

* ``max_learning_rate``: the bracket does not depend on mu, so the supremum of admissible mu is
  ``1 / (L sqrt(bracket))`` (derived), ``inf`` when the bracket is 0 (all tau_n = 1 and no quantization: Eq. 15 then
  puts no limit on mu, although plain SGD on an L-smooth loss still wants mu < 2/L; the planner caps at 1/L).
* ``rate_proxy = mu T prod tau_n`` (**paper**, Remark 2: the bound decreases as 1 / (mu T prod tau_n)).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Mapping, Sequence, Union

import numpy as np

from ..hierarchy import Hierarchy
from ..compressors import Compressor, make_compressor

__all__ = [
    "LearningRateWarning",
    "TheoryWarning",
    "warn_local_solvers",
    "check_taus",
    "q_bound",
    "quantizer_variances",
    "aggregation_ratios",
    "lr_condition_terms",
    "lr_headroom",
    "term_provenance",
    "lr_condition_bracket",
    "lr_condition_bracket_grid",
    "lr_condition_value",
    "max_learning_rate",
    "check_learning_rate",
    "rate_proxy",
]

QSpec = Union[float, int, Compressor, str, None, Mapping]
"""A layer's quantization: a plain variance bound q_n >= 0, or anything :func:`make_quantizer` accepts."""


class LearningRateWarning(UserWarning):
    """The learning rate violates the condition of Theorem 1 (Eq. 15) for the given tau, quantizers and tree."""


def warn_local_solvers(local_solvers: Sequence[object] | None) -> None:
    """A :class:`TheoryWarning` when any layer runs a local solver other than local SGD (FedProx, SCAFFOLD, ADMM):
    Eq. 15 and the planner's rate are the paper's, for local SGD."""
    others = [f"layer {n}: {s!r}" for n, s in enumerate(local_solvers or [], start=1)
              if not getattr(s, "is_plain", True)]
    if others:
        warnings.warn(f"local solvers {others}: the paper's theory (Eq. 15, the planner's rate) is for local SGD with "
                      f"unbiased compressors; it is applied here as if every layer ran local SGD (the bits of their "
                      f"uploads are counted as sent)", TheoryWarning, stacklevel=3)


class TheoryWarning(UserWarning):
    """The configuration is outside the paper's assumptions (a biased compressor, error feedback, a server
    optimizer other than Average), so Eq. 15 and the planner's rate are used outside their theory."""


# ----------------------------------------------------------------------------------------------- validation
def _check_positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return v


def check_taus(taus: Sequence[int], num_layers: int | None = None) -> tuple[int, ...]:
    """Validate intra-layer counts: a list of N integers tau_n >= 1 (N = ``num_layers`` when given)."""
    if isinstance(taus, (str, bytes)) or not isinstance(taus, (Sequence, np.ndarray)):
        raise ValueError(f"taus must be a list of integers >= 1 (one per layer), got {taus!r}")
    out = []
    for i, t in enumerate(taus):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"taus[{i}] (tau_{i + 1}) must be an integer >= 1, got {t!r}")
        if int(t) < 1:
            raise ValueError(f"taus[{i}] (tau_{i + 1}) must be an integer >= 1, got {t!r}")
        out.append(int(t))
    if not out:
        raise ValueError("taus must hold one integer >= 1 per layer, got an empty list")
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"taus has {len(out)} entries but the hierarchy has N = {num_layers} layers: {list(out)}")
    return tuple(out)


# ------------------------------------------------------------------------------------------- quantization
def q_bound(s: int | None, d: int) -> float:
    """QSGD variance bound q(s, d) = min(d / s^2, sqrt(d) / s); ``s=None`` (no quantization) gives 0.

    ``s``: levels per sign (integer >= 1); ``d``: dimension of the quantized vector (the bucket size when bucketed).
    """
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"d (the number of quantized entries) must be an integer >= 1, got {d!r}")
    if s is None:
        return 0.0
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
        raise ValueError(f"s (QSGD levels) must be an integer >= 1 or None (no quantization), got {s!r}")
    return min(d / s**2, math.sqrt(d) / s)


def quantizer_variances(quantizers: Sequence[QSpec], d: int | None = None) -> list[float]:
    """The q_n of each layer. Entries may be plain floats q_n >= 0 (used as is) or compressor specs
    (a :class:`~lightning_qmlhfl.compressors.Compressor`, an int s, ``None``/"none", a dict), which need ``d`` =
    number of model parameters.

    The paper's theory (Assumption 1) covers unbiased compressors without error feedback, whose q_n is their
    variance bound: QSGD's q(s, d), random-k's d/k - 1, natural compression's 1/8, the identity's 0. For a biased
    compressor (top-k, scaled sign) or one with error feedback a :class:`TheoryWarning` says that the theory does
    not apply, and its error bound (E||C(x) - x||^2 <= omega ||x||^2) stands in for q_n."""
    if isinstance(quantizers, (str, bytes)) or not isinstance(quantizers, Sequence):
        raise ValueError(f"quantizers must be a list with one entry per layer, got {quantizers!r}")
    out = []
    for i, q in enumerate(quantizers):
        if isinstance(q, float) or isinstance(q, np.floating):
            v = float(q)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"q_{i + 1} (variance bound of layer {i + 1}) must be finite and >= 0, got {q!r}")
            out.append(v)
            continue
        try:
            quant = make_compressor(q)
        except ValueError as err:
            raise ValueError(
                f"layer {i + 1}: {err} (integers are QSGD levels s; give a variance bound q_n as a float, e.g. 0.0)"
            ) from None
        if d is None:
            if quant.is_identity:
                out.append(0.0)
                continue
            raise ValueError(
                f"layer {i + 1} has quantizer {quant!r}: pass d (the number of model parameters) to get its q_n, "
                f"or give q_n as a float"
            )
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
            raise ValueError(f"d (the number of model parameters) must be an integer >= 1, got {d!r}")
        if not quant.covered_by_theory:
            why = "is biased" if not quant.unbiased else "uses error feedback"
            warnings.warn(
                f"layer {i + 1}: {quant!r} {why}; the paper's theory (Eq. 15, the planner's rate) assumes unbiased "
                f"compressors without error feedback, so it does not apply here. Its error bound "
                f"omega = {quant.error_bound(int(d)):.4g} (E||C(x) - x||^2 <= omega ||x||^2) is used in place of q_{i + 1}",
                TheoryWarning, stacklevel=2)
        out.append(float(quant.variance_bound(int(d))))
    return out


def aggregation_ratios(hierarchy: Hierarchy | Sequence[int] | None, num_layers: int) -> list[float]:
    """rho_n for n = 1..N (this project's completion): rho_1 = 1 (the paper's q_1 term has no ratio);
    for n >= 2 the largest aggregation weight |C(c)| / |C(p)| of layer n. ``None`` gives all ones
    (the conservative bound w_c <= 1). A list of ints is read as ``Hierarchy.balanced`` branching."""
    if hierarchy is None:
        return [1.0] * num_layers
    if not isinstance(hierarchy, Hierarchy):
        hierarchy = Hierarchy.balanced(hierarchy)
    if hierarchy.num_layers != num_layers:
        raise ValueError(
            f"the hierarchy has N = {hierarchy.num_layers} layers but {num_layers} tau/q values were given"
        )
    ratios = [1.0]
    for n in range(2, num_layers + 1):
        ratios.append(float(hierarchy.aggregation_weights(n).max()))
    return ratios


def _prepare(taus, qs, hierarchy, d) -> tuple[tuple[int, ...], list[float], list[float]]:
    n_layers = hierarchy.num_layers if isinstance(hierarchy, Hierarchy) else None
    t = check_taus(taus, n_layers)
    q = quantizer_variances(qs, d)
    if len(q) != len(t):
        raise ValueError(f"got {len(t)} tau values but {len(q)} quantizers / q values; give one per layer")
    return t, q, aggregation_ratios(hierarchy, len(t))


# ------------------------------------------------------------------------------------------- Eq. 15
def term_provenance(num_layers: int) -> dict[str, str]:
    """Which terms of :func:`lr_condition_terms` are the paper's ("paper") and which this project's ("ours")."""
    out = {"drift_1": "paper"}
    for n in range(2, num_layers + 1):
        out[f"drift_{n}"] = "paper"
    out["quant_1"] = "paper" if num_layers >= 2 else "ours"
    for n in range(2, num_layers + 1):
        out[f"quant_{n}"] = "ours"
    return out


def _terms(t: Sequence[int], q: Sequence[float], rho: Sequence[float]) -> dict[str, float]:
    N = len(t)
    P = [1.0]
    for x in t:
        P.append(P[-1] * x)  # P[n] = tau_1 ... tau_n
    terms: dict[str, float] = {}
    # drift terms (paper)
    terms["drift_1"] = t[0] * (t[0] - 1) / 2.0
    for n in range(2, N + 1):
        terms[f"drift_{n}"] = t[n - 1] * (t[n - 1] - 1) / 2.0 * P[n - 1] ** 2
    # quantization terms: quant_1 = q_1 tau_2 tau_1^2 (paper), the rest ours (module docstring)
    inflation = 1.0
    for n in range(1, N + 1):
        tau_next = t[n] if n < N else 1  # tau_{N+1} := 1
        terms[f"quant_{n}"] = rho[n - 1] * q[n - 1] * tau_next * P[n] ** 2 * inflation
        inflation *= 1.0 + rho[n - 1] * q[n - 1]
    return terms


def lr_condition_terms(
    taus: Sequence[int],
    qs: Sequence[QSpec],
    hierarchy: Hierarchy | Sequence[int] | None = None,
    d: int | None = None,
) -> dict[str, float]:
    """Each term of the bracket of Eq. 15, keyed ``drift_1..drift_N`` then ``quant_1..quant_N``.

    ``drift_n`` (paper): tau_1(tau_1-1)/2 and tau_n(tau_n-1)/2 prod_{m<n} tau_m^2.
    ``quant_1`` (paper for N >= 2): q_1 tau_2 tau_1^2; for N = 1 (ours) q_1 tau_1^2.
    ``quant_n``, n >= 2 (ours): rho_n q_n tau_{n+1} (tau_1...tau_n)^2 prod_{m<n}(1 + rho_m q_m), tau_{N+1} := 1.
    See the module docstring for the reasoning; :func:`term_provenance` gives the labels programmatically.

    ``qs``: per layer, a float q_n or a quantizer spec (then ``d`` = number of parameters is needed).
    ``hierarchy``: supplies the device-count ratios rho_n; ``None`` uses rho_n = 1 (conservative).
    """
    t, q, rho = _prepare(taus, qs, hierarchy, d)
    return _terms(t, q, rho)


def lr_condition_bracket(
    taus: Sequence[int], qs: Sequence[QSpec], hierarchy: Hierarchy | Sequence[int] | None = None, d: int | None = None
) -> float:
    """The sum of :func:`lr_condition_terms` (dimensionless, >= 0)."""
    return float(sum(lr_condition_terms(taus, qs, hierarchy, d).values()))


def lr_condition_bracket_grid(tau_grid: np.ndarray, qs: Sequence[float], rhos: Sequence[float]) -> np.ndarray:
    """Vectorised bracket for many tau at once: ``tau_grid`` int array [K, N] -> float64 [K].

    ``qs`` are plain q_n floats and ``rhos`` the ratios from :func:`aggregation_ratios` (no validation: this is the
    planner's inner loop; :func:`lr_condition_bracket` is the checked scalar reference it is tested against).
    """
    t = np.asarray(tau_grid, dtype=np.float64)
    K, N = t.shape
    P = np.cumprod(t, axis=1)  # P[:, n-1] = tau_1 ... tau_n
    total = t[:, 0] * (t[:, 0] - 1) / 2.0
    for n in range(2, N + 1):
        total = total + t[:, n - 1] * (t[:, n - 1] - 1) / 2.0 * P[:, n - 2] ** 2
    inflation = 1.0
    for n in range(1, N + 1):
        coef = rhos[n - 1] * qs[n - 1] * inflation
        if coef != 0.0:
            tau_next = t[:, n] if n < N else 1.0
            total = total + coef * tau_next * P[:, n - 1] ** 2
        inflation *= 1.0 + rhos[n - 1] * qs[n - 1]
    return total


def lr_condition_value(
    L: float,
    mu: float,
    taus: Sequence[int],
    qs: Sequence[QSpec],
    hierarchy: Hierarchy | Sequence[int] | None = None,
    d: int | None = None,
) -> float:
    """1 - L^2 mu^2 * bracket (Eq. 15); the condition holds when this is > 0.

    ``L``: smoothness constant (> 0); ``mu``: learning rate (> 0).
    """
    L = _check_positive(L, "L (the smoothness constant)")
    mu = _check_positive(mu, "mu (the learning rate)")
    return 1.0 - L * L * mu * mu * lr_condition_bracket(taus, qs, hierarchy, d)


def max_learning_rate(
    L: float,
    taus: Sequence[int],
    qs: Sequence[QSpec],
    hierarchy: Hierarchy | Sequence[int] | None = None,
    d: int | None = None,
) -> float:
    """The supremum mu* = 1 / (L sqrt(bracket)) of learning rates satisfying Eq. 15 (every mu < mu* does; mu*
    itself gives exactly 0, so it is not admissible). ``inf`` when the bracket is 0: with all tau_n = 1 and no
    quantization Eq. 15 puts no limit on mu (other limits, e.g. mu < 2/L for SGD, still apply)."""
    L = _check_positive(L, "L (the smoothness constant)")
    b = lr_condition_bracket(taus, qs, hierarchy, d)
    if b <= 0.0:
        return math.inf
    return 1.0 / (L * math.sqrt(b))


def lr_headroom(
    mu: float,
    L: float,
    taus: Sequence[int],
    qs: Sequence[QSpec],
    hierarchy: Hierarchy | Sequence[int] | None = None,
    d: int | None = None,
) -> float:
    """mu* / mu: how far the learning rate ``mu`` is below the largest one Eq. 15 admits (> 1: the condition holds
    with room to spare; < 1: it fails, and mu must shrink by this factor). With measured constants
    (:class:`~lightning_qmlhfl.theory.measured.MeasuredConstants`: its ``L`` and ``qs()``) this is the headroom a
    pilot run reports (docs/algorithm.md#measured-constants)."""
    mu = _check_positive(mu, "mu (the learning rate)")
    return max_learning_rate(L, taus, qs, hierarchy, d) / mu


def check_learning_rate(
    mu: float,
    L: float,
    taus: Sequence[int],
    qs: Sequence[QSpec],
    hierarchy: Hierarchy | Sequence[int] | None = None,
    d: int | None = None,
    strict: bool = False,
    server_optimizers: Sequence[object] | None = None,
    local_solvers: Sequence[object] | None = None,
) -> float:
    """Check mu against Eq. 15. Returns the condition's value; when it is <= 0, warns with
    :class:`LearningRateWarning` (or raises ``ValueError`` when ``strict``) naming the admissible bound.

    The theory covers plain averaging at every layer (``Average()``): with ``server_optimizers`` holding any other
    rule, or ``local_solvers`` other than local SGD, a :class:`TheoryWarning` says that the condition does not
    describe that run."""
    warn_local_solvers(local_solvers)
    others = [repr(o) for o in (server_optimizers or []) if not getattr(o, "is_average", True)]
    if others:
        warnings.warn(
            f"server optimizers {others}: the paper's theory (Eq. 15) covers plain averaging (Average()) only; the "
            f"learning-rate condition is checked as if every layer averaged", TheoryWarning, stacklevel=2)
    value = lr_condition_value(L, mu, taus, qs, hierarchy, d)
    if value > 0.0:
        return value
    bound = max_learning_rate(L, taus, qs, hierarchy, d)
    terms = lr_condition_terms(taus, qs, hierarchy, d)
    worst = max(terms, key=terms.get)
    msg = (
        f"learning rate mu={mu:g} violates the convergence condition of Theorem 1 (Eq. 15) for taus={list(taus)}, "
        f"L={L:g}: 1 - L^2 mu^2 * {sum(terms.values()):.6g} = {value:.6g} <= 0. Admissible: mu < {bound:.6g}. "
        f"Largest term: {worst} = {terms[worst]:.6g} (smaller tau or finer quantization lowers it)."
    )
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, LearningRateWarning, stacklevel=2)
    return value


def rate_proxy(mu: float, T: int | float, taus: Sequence[int]) -> float:
    """mu * T * prod(tau_n) (Remark 2, paper): the convergence bound shrinks as 1 / (mu T prod tau_n).

    ``T``: number of global iterations (>= 0).
    """
    mu = _check_positive(mu, "mu (the learning rate)")
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or T < 0 or not math.isfinite(T):
        raise ValueError(f"T (the number of global iterations) must be a finite number >= 0, got {T!r}")
    return mu * float(T) * float(math.prod(check_taus(taus)))
