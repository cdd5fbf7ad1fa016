"""Byzantine-robust aggregators over segments of stacked rows: the robust estimate of the rows of every parent
node at once.

At an aggregation the uploads of a layer are the rows of one [k, P] tensor ``x`` (model differences relative to
the parent) and ``segment[i]`` is the parent of row i (any order, values in [0, S)). ``aggregate`` returns a
:class:`RobustResult` whose ``value`` [S, P] holds each parent's estimate in x's dtype (zeros for a parent with no
row). Rules shared by every aggregator:

- A segment of one row gives that row, bit for bit (there is nobody to be robust against; this also holds for the
  iterative rules, which would otherwise only approach it).
- A segment with no row gives zeros, and ``counts[s] = 0``.
- The rows of a segment are taken in row-index order wherever order matters (Krum's ties).
- Inputs must be finite.

The aggregators (config names in quotes):

- ``Mean()`` "mean": the plain unweighted mean of the rows (the reference, and the default).
- ``CoordinateMedian()`` "median": per coordinate, the median of the segment's values; for an even count the
  mean of the two middle values, as ``numpy.median`` (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).
- ``TrimmedMean(beta=0.1)`` "trimmed_mean": per coordinate, with n rows in the segment, drop the g = int(beta * n)
  smallest and the g largest values and average the rest, as ``scipy.stats.trim_mean(proportiontocut=beta)``
  (Yin et al. 2018); beta in [0, 0.5).
- ``Krum(f=1, m=1)`` "krum": Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017. Row i's score is the sum of its squared Euclidean distances
  to its q nearest other rows of the segment; Krum (m = 1) returns the row of lowest score, Multi-Krum (m > 1)
  the mean of the m rows of lowest scores. With n rows in the segment: q = n - f - 2 when n >= f + 3 (the paper's
  definition), and q = max(1, n - f - 2) = 1 for 2 <= n < f + 3 (a smaller segment, e.g. under partial
  participation, still picks the row closest to another one); the number of rows averaged is min(m, n); a
  segment of one row gives that row. Ties of scores go to the lower row index. ``selected`` marks the rows
  that entered the estimate and ``rejected`` counts the others. :meth:`Krum.check_children` refuses a layer whose
  parents have fewer than f + 3 children or fewer than m + f (the paper's resilience guarantee needs n > 2f + 2,
  which is not enforced: f is the number of Byzantine children the score tolerates, as the user sets it).
- ``GeometricMedian(iters=10, nu=1e-6)`` "geomed": the smoothed Weiszfeld algorithm of RFA (Pillutla, Kakade,
  Harchaoui, "Robust Aggregation for Federated Learning", IEEE Trans. Signal Processing 2022): from the mean,
  ``iters`` times v <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(nu, ||x_i - v||), all segments at once.
- ``CenteredClipping(tau=1.0, iters=3)`` "centered_clip": Karimireddy, He, Jaggi, "Learning from History for
  Byzantine Robust Optimization", ICML 2021: ``iters`` times v <- v + (1/n) sum_i (x_i - v) min(1, tau /
  ||x_i - v||), starting from v = 0 since the rows are model differences relative to the parent; all segments at
  once.

Median and trimmed mean run on the kernels of :mod:`lightning_qmlhfl.kernels.robust` (``backend``: "auto",
"torch", "numba", "triton"); the others are torch code on x's device, where ``backend`` is only validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import checks
from ..kernels.robust import (ROBUST_BACKENDS, check_segments, segment_layout, segment_median,
                              segment_trimmed_mean)
from ..options import ConfigOption, Family, from_spec, per_layer

__all__ = ["RobustResult", "RobustAggregator", "Mean", "CoordinateMedian", "TrimmedMean", "Krum", "GeometricMedian",
           "CenteredClipping", "ROBUST_AGGREGATORS", "ROBUST_FAMILY", "make_robust_aggregator",
           "layer_robust_aggregators"]

_KRUM_CHUNK = 1 << 22  # elements of one fp64 difference tile [n, n, columns] in Krum's distances


@dataclass(frozen=True, eq=False)
class RobustResult:
    """What :meth:`RobustAggregator.aggregate` returns: ``value`` [S, P] (x's dtype; zeros for an empty
    segment), ``counts`` int64 [S] (rows per segment), ``selected`` bool [k] (the rows that entered the estimate;
    Krum only, else None), ``rejected`` (rows left out; Krum only, else 0)."""

    value: Tensor
    counts: Tensor
    selected: Tensor | None = None
    rejected: int = 0


class RobustAggregator(ConfigOption):
    """Interface (module docstring). ``config_name``: the name :func:`make_robust_aggregator` takes;
    ``config_options``: its constructor's options."""

    config_name = ""
    config_options: tuple[str, ...] = ()

    @property
    def is_mean(self) -> bool:
        """True only for :class:`Mean` (the plain average: callers may use their weighted fast path)."""
        return False

    def check_children(self, min_children: int, layer: int) -> None:
        """Raise a ValueError when a layer whose parents have at least ``min_children`` children each cannot use
        this aggregator (the layer is named in the message). Every aggregator but Krum works with any count."""
        checks.integer(min_children, "min_children", minimum=0)
        checks.integer(layer, "layer", minimum=0)

    def aggregate(self, x: Tensor, segment: Tensor, num_segments: int, backend: str = "auto") -> RobustResult:
        """The robust estimate of each segment's rows of ``x`` [k, P] (float32 or float64); ``segment`` int64 [k]
        the segment of each row, values in [0, num_segments). ``backend`` as in
        :mod:`lightning_qmlhfl.kernels.robust`."""
        checks.choice(backend, "backend", ROBUST_BACKENDS)
        x, segment, S = check_segments(x, segment, num_segments, type(self).__name__)
        with torch.no_grad():
            return self._aggregate(x.detach(), segment, S, backend)

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        raise NotImplementedError



def _counts(segment: Tensor, S: int) -> Tensor:
    return torch.bincount(segment, minlength=S)[:S]


def _sums(x: Tensor, segment: Tensor, S: int) -> Tensor:
    return x.new_zeros(S, x.shape[1]).index_add_(0, segment, x)


def _finish(v: Tensor, sums: Tensor, counts: Tensor) -> Tensor:
    """Segments of one row take that row (its sum, 0 + x = x), empty ones zeros."""
    n = counts.view(-1, 1)
    return torch.where(n == 1, sums, torch.where(n == 0, torch.zeros_like(v), v))


class Mean(RobustAggregator):
    """The plain unweighted mean of each segment's rows (module docstring)."""

    config_name = "mean"

    @property
    def is_mean(self) -> bool:
        return True

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        counts = _counts(segment, S)
        sums = _sums(x, segment, S)
        return RobustResult(sums / counts.clamp(min=1).to(x.dtype).view(-1, 1), counts)


class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median; an even count takes the mean of the two middle values (module docstring)."""

    config_name = "median"

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        return RobustResult(segment_median(x, segment, S, backend), _counts(segment, S))


class TrimmedMean(RobustAggregator):
    """Coordinate-wise trimmed mean, int(beta * n) values cut at each end (module docstring)."""

    config_name = "trimmed_mean"
    config_options = ("beta",)

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = checks.real(beta, "TrimmedMean beta", 0.0, 0.5, high_open=True)

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        return RobustResult(segment_trimmed_mean(x, segment, S, self.beta, backend), _counts(segment, S))


def _squared_distances(rows: Tensor) -> Tensor:
    """fp64 [n, n] squared Euclidean distances between the rows [n, P]: differences and squares in fp64 (exact
    differences for float32 rows), summed over column chunks. Not ``torch.cdist``: it returns the square roots,
    and squaring them again perturbs the last bits, so equal scores (ties) would not stay equal."""
    n, P = rows.shape
    d2 = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
    chunk = max(1, _KRUM_CHUNK // max(1, n * n))
    for c0 in range(0, P, chunk):
        r = rows[:, c0:c0 + chunk].to(torch.float64)
        d2 += (r.unsqueeze(1) - r.unsqueeze(0)).square().sum(-1)
    return d2


class Krum(RobustAggregator):
    """Krum (m = 1) and Multi-Krum (m > 1); the rule for small segments is in the module docstring."""

    config_name = "krum"
    config_options = ("f", "m")

    def __init__(self, f: int = 1, m: int = 1) -> None:
        self.f = checks.integer(f, "Krum f", minimum=0)
        self.m = checks.integer(m, "Krum m", minimum=1)

    def check_children(self, min_children: int, layer: int) -> None:
        super().check_children(min_children, layer)
        n = min_children
        if n < self.f + 3:
            raise ValueError(f"{self!r} at layer {layer} needs at least f + 3 = {self.f + 3} children per parent "
                             f"(the score sums the distances to the n - f - 2 nearest other rows), got a parent "
                             f"with {n}; lower f or use another aggregator")
        if n < self.m + self.f:
            raise ValueError(f"{self!r} at layer {layer} averages m = {self.m} rows, more than n - f = {n - self.f} "
                             f"for a parent with {n} children; lower m to at most {n - self.f}")

    def neighbours(self, n: int) -> int:
        """q, the number of nearest other rows whose squared distances make a score, in a segment of n >= 2 rows:
        n - f - 2, at least 1."""
        return max(1, n - self.f - 2)

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        order, counts, offsets = segment_layout(segment, S)
        value = x.new_zeros(S, x.shape[1])
        selected = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        bounds = offsets.tolist()
        for s in range(S):
            lo, hi = bounds[s], bounds[s + 1]
            n = hi - lo
            if n == 0:
                continue
            idx = order[lo:hi]  # this segment's rows, in row-index order (the sort is stable)
            if n == 1:
                pick = idx
            else:
                d2 = _squared_distances(x[idx])
                d2.fill_diagonal_(float("inf"))
                scores = d2.sort(dim=1).values[:, :self.neighbours(n)].sum(dim=1)
                pick = idx[torch.argsort(scores, stable=True)[:min(self.m, n)]]
            selected[pick] = True
            value[s] = x[pick[0]] if pick.numel() == 1 else x[pick.sort().values].mean(dim=0)
        return RobustResult(value, counts, selected, int(x.shape[0] - int(selected.sum())))


class GeometricMedian(RobustAggregator):
    """The smoothed Weiszfeld iteration of RFA, batched over all segments (module docstring)."""

    config_name = "geomed"
    config_options = ("iters", "nu")

    def __init__(self, iters: int = 10, nu: float = 1e-6) -> None:
        self.iters = checks.integer(iters, "GeometricMedian iters", minimum=1)
        self.nu = checks.real(nu, "GeometricMedian nu", 0.0, low_open=True)

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        counts = _counts(segment, S)
        sums = _sums(x, segment, S)
        v = sums / counts.clamp(min=1).to(x.dtype).view(-1, 1)
        for _ in range(self.iters):
            dist = torch.linalg.vector_norm(x - v[segment], dim=1)
            b = 1.0 / dist.clamp(min=max(self.nu, torch.finfo(x.dtype).tiny))
            num = x.new_zeros(S, x.shape[1]).index_add_(0, segment, x * b.view(-1, 1))
            den = x.new_zeros(S).index_add_(0, segment, b)
            v = num / den.clamp(min=torch.finfo(x.dtype).tiny).view(-1, 1)
        return RobustResult(_finish(v, sums, counts), counts)


class CenteredClipping(RobustAggregator):
    """Centred clipping from v = 0, batched over all segments (module docstring)."""

    config_name = "centered_clip"
    config_options = ("tau", "iters")

    def __init__(self, tau: float = 1.0, iters: int = 3) -> None:
        self.tau = checks.real(tau, "CenteredClipping tau", 0.0, low_open=True)
        self.iters = checks.integer(iters, "CenteredClipping iters", minimum=1)

    def _aggregate(self, x: Tensor, segment: Tensor, S: int, backend: str) -> RobustResult:
        counts = _counts(segment, S)
        sums = _sums(x, segment, S)
        n = counts.clamp(min=1).to(x.dtype).view(-1, 1)
        v = x.new_zeros(S, x.shape[1])
        for _ in range(self.iters):
            d = x - v[segment]
            scale = (self.tau / torch.linalg.vector_norm(d, dim=1)).clamp(max=1.0)  # a zero norm: tau / 0 = inf -> 1
            v = v + x.new_zeros(S, x.shape[1]).index_add_(0, segment, d * scale.view(-1, 1)) / n
        return RobustResult(_finish(v, sums, counts), counts)


ROBUST_AGGREGATORS: dict[str, type[RobustAggregator]] = {
    "mean": Mean, "median": CoordinateMedian, "trimmed_mean": TrimmedMean, "krum": Krum, "geomed": GeometricMedian,
    "centered_clip": CenteredClipping}

ROBUST_FAMILY = Family(RobustAggregator, ROBUST_AGGREGATORS, "mean", "robust aggregator", "a robust aggregator")


def make_robust_aggregator(spec: object) -> RobustAggregator:
    """From a config value: an instance, ``None`` (the mean), a name, or a dict with ``name`` and options
    (:func:`lightning_qmlhfl.options.from_spec`)."""
    return from_spec(spec, ROBUST_FAMILY)


def layer_robust_aggregators(names: Any, num_layers: int, **options: Any) -> list[RobustAggregator]:
    """One robust aggregator per layer n = 1..N from config values (a recipe group ``robust``): ``names`` one
    name or a list of N; every option (``beta``, ``f``, ``m``, ``iters``, ``nu``, ``tau``) one value or a list of
    N; each layer takes the options its aggregator has, ``None`` the aggregator's default."""
    return per_layer(names, num_layers, ROBUST_FAMILY, "robust",
                     split=lambda k, v: [v] * num_layers if v is None or isinstance(v, (str, bool))
                     or not isinstance(v, Sequence) else None, **options)
