"""Partial participation: at the start of each of its aggregation periods, every node of layer n draws which of its
children take part (the paper assumes everyone does; the seed's open question 3).

Policies, each with ``weighting``:

- ``Full()``: every available child (the default; the paper's setting).
- ``Fraction(f)``: k_p = max(1, round(f * n_p)) of the n_p children of node p, uniformly without replacement.
- ``UniformK(k)``: k of the children of every node, uniformly without replacement (k <= every node's fan-out).
- ``Bernoulli(p)``: every child independently with probability p.

``over_select=o`` (Fraction, UniformK): ceil(k (1 + o)) children are selected and the k whose uploads are ready
first are kept (see :mod:`lightning_qmlhfl.federation.clock`); the others' work is lost.

Weighting of the uploads that arrive (w_c = |C(c)| / |C(p)| the paper's weight):

- ``"unbiased"``: w_c / pi_c, pi_c the inclusion probability of c, so that the expected aggregate equals the full
  one (Horvitz-Thompson); a node may then move by more or less than its children's average.
- ``"normalized"``: w_c / sum of w over the children that uploaded (FedAvg/Flower style): an average of the
  participants, biased towards them.

Only available children can be drawn (:mod:`lightning_qmlhfl.federation.availability`); inclusion probabilities are computed
among the available ones, so unavailability, dropouts, deadlines and over-selection are *not* corrected for: they
bias the aggregate towards the devices that show up and finish, as in deployed systems.

Draws are counter-based (a generator seeded from the run seed, the round, the layer and the aggregation event),
so a selection does not depend on the executor, the backend or which process holds a row.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..options import Family, from_spec, per_layer

__all__ = ["Participation", "Full", "Fraction", "UniformK", "Bernoulli", "WEIGHTINGS", "make_participation",
           "rank_within_parent",
           "layer_participation", "validate_participation", "participation_weights"]

WEIGHTINGS = ("unbiased", "normalized")


def _check_weighting(value: object) -> str:
    if value not in WEIGHTINGS:
        raise ValueError(f"weighting must be 'unbiased' or 'normalized', got {value!r}")
    return value  # type: ignore[return-value]


def _check_over(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < 0:
        raise ValueError(f"over_select must be a number >= 0 (the extra fraction selected), got {value!r}")
    return float(value)


def _children_counts(parent_index: Tensor, num_parents: int) -> Tensor:
    return torch.bincount(parent_index, minlength=num_parents)


def rank_within_parent(parent_index: Tensor, keys: Tensor, num_parents: int) -> Tensor:
    """int64 [C]: the rank of each child's key among its siblings (0 = smallest), ties by index."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(parent_index[order], stable=True)]  # by parent, then by key
    counts = _children_counts(parent_index, num_parents)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - starts[parent_index[order]]
    return rank


class Participation(ABC):
    """A selection rule for the children of every node of one layer (module docstring)."""

    config_name: str  # the name make_participation takes
    config_options: tuple[str, ...] = ("weighting", "over_select")  # its constructor's options

    def __init__(self, weighting: str = "unbiased", over_select: float = 0.0) -> None:
        self.weighting = _check_weighting(weighting)
        self.over_select = _check_over(over_select)

    def to_config(self) -> dict[str, Any]:
        """Plain data that :func:`make_participation` rebuilds this rule from (what checkpoints store)."""
        return {"name": self.config_name, **{k: getattr(self, k) for k in self.config_options}}

    @property
    def is_full(self) -> bool:
        return False

    def check_tree(self, parent_index: Tensor, num_parents: int, layer: int) -> None:
        """Raise ValueError when the rule cannot apply to this layer's tree (e.g. k larger than a fan-out)."""

    @abstractmethod
    def _targets(self, counts: Tensor) -> Tensor | None:
        """int64 [M]: how many children each parent keeps (None: independent Bernoulli draws)."""

    def select(self, parent_index: Tensor, num_parents: int, available: Tensor, generator: torch.Generator
               ) -> tuple[Tensor, Tensor, Tensor]:
        """One period's draw for all parents of a layer.

        Returns ``selected`` (bool [C]: drawn to train and upload), ``keep`` (int64 [M]: how many uploads each
        parent keeps, the first to finish; equals the number selected unless over-selecting) and ``pi`` (float64
        [C]: the inclusion probability of each available child, used by unbiased weighting)."""
        C = parent_index.numel()
        counts = _children_counts(parent_index, num_parents)
        avail_counts = _children_counts(parent_index[available], num_parents)
        u = torch.rand(C, generator=generator, dtype=torch.float64)
        targets = self._targets(counts)
        if targets is None:  # Bernoulli
            p = float(self.p)  # type: ignore[attr-defined]
            selected = available & (u < p)
            pi = torch.full((C,), p, dtype=torch.float64)
            keep = _children_counts(parent_index[selected], num_parents)
            return selected, keep, pi
        k = torch.minimum(targets, avail_counts)
        drawn = torch.minimum(avail_counts, torch.ceil(k.double() * (1 + self.over_select)).long())
        keys = torch.where(available, u, u + 2.0)  # unavailable children rank after every available one
        rank = rank_within_parent(parent_index, keys, num_parents)
        selected = available & (rank < drawn[parent_index])
        pi = (k.double() / avail_counts.clamp(min=1).double())[parent_index]
        return selected, k, pi

    def _options(self) -> list[str]:
        opts = []
        if self.weighting != "unbiased":
            opts.append(f"weighting={self.weighting!r}")
        if self.over_select:
            opts.append(f"over_select={self.over_select}")
        return opts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._options())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class Full(Participation):
    """Every available child takes part (pi = 1): the paper's setting and the default."""

    config_name = "full"
    config_options = ("weighting",)

    def __init__(self, weighting: str = "unbiased") -> None:
        super().__init__(weighting)

    @property
    def is_full(self) -> bool:
        return True

    def _targets(self, counts: Tensor) -> Tensor:
        return counts


class Fraction(Participation):
    """k_p = max(1, round(f n_p)) children of each node p, uniformly without replacement."""

    config_name = "fraction"
    config_options = ("f", "weighting", "over_select")

    def __init__(self, f: float, weighting: str = "unbiased", over_select: float = 0.0) -> None:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < float(f) <= 1:
            raise ValueError(f"Fraction f must be a number in (0, 1], got {f!r}")
        self.f = float(f)
        super().__init__(weighting, over_select)

    def _targets(self, counts: Tensor) -> Tensor:
        return torch.clamp(torch.round(counts.double() * self.f).long(), min=1)

    def _options(self) -> list[str]:
        return [str(self.f)] + super()._options()


class UniformK(Participation):
    """k children of every node, uniformly without replacement."""

    config_name = "uniformk"
    config_options = ("k", "weighting", "over_select")

    def __init__(self, k: int, weighting: str = "unbiased", over_select: float = 0.0) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"UniformK k must be an integer >= 1, got {k!r}")
        self.k = int(k)
        super().__init__(weighting, over_select)

    def check_tree(self, parent_index: Tensor, num_parents: int, layer: int) -> None:
        counts = _children_counts(parent_index, num_parents)
        smallest = int(counts.min())
        if self.k > smallest:
            p = int(torch.argmin(counts))
            raise ValueError(
                f"{self!r} at layer {layer}: node {p} has only {smallest} children (k must be <= every node's number "
                f"of children); use Fraction(f) for uneven trees"
            )

    def _targets(self, counts: Tensor) -> Tensor:
        return torch.full_like(counts, self.k)

    def _options(self) -> list[str]:
        return [str(self.k)] + super()._options()


class Bernoulli(Participation):
    """Every child independently with probability p (pi = p)."""

    config_name = "bernoulli"
    config_options = ("p", "weighting")

    def __init__(self, p: float, weighting: str = "unbiased") -> None:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < float(p) <= 1:
            raise ValueError(f"Bernoulli p must be a number in (0, 1], got {p!r}")
        self.p = float(p)
        super().__init__(weighting)

    def _targets(self, counts: Tensor) -> None:
        return None

    def _options(self) -> list[str]:
        return [str(self.p)] + super()._options()


def participation_weights(policy: Participation, base: Tensor, pi: Tensor, uploads: Tensor, parent_index: Tensor,
                          num_parents: int) -> Tensor:
    """The weights [C] of the uploads (``uploads`` bool [C]) of one aggregation: ``base`` = w_c = |C(c)|/|C(p)|;
    unbiased w_c / pi_c; normalized w_c / (sum of w over p's uploads). Entries of non-uploads are 0."""
    if policy.weighting == "unbiased":
        w = base / pi.to(base.dtype)
    else:
        total = torch.zeros(num_parents, dtype=base.dtype, device=base.device)
        total.index_add_(0, parent_index, torch.where(uploads, base, torch.zeros_like(base)))
        w = base / total[parent_index].clamp(min=torch.finfo(base.dtype).tiny)
    return torch.where(uploads, w, torch.zeros_like(w))


PARTICIPATIONS = {"full": Full, "fraction": Fraction, "uniformk": UniformK, "bernoulli": Bernoulli}


PARTICIPATION_FAMILY = Family(Participation, PARTICIPATIONS, "full", "participation", "a participation rule")


def make_participation(spec: object) -> Participation:
    """From a config value: an instance, ``None`` (Full), a name, or a dict with ``name`` and options (``None``
    options take the defaults; :func:`lightning_qmlhfl.options.from_spec`)."""
    return from_spec(spec, PARTICIPATION_FAMILY)


def layer_participation(layers: Any, num_layers: int, **options: Any) -> list[Participation]:
    """One rule per layer n = 1..N (the children drawn are layer n-1's nodes: devices for n = 1) from config
    values; every option one value or a list of N; each layer takes the options its rule has."""
    return per_layer(layers, num_layers, PARTICIPATION_FAMILY, "participation", **options)


def validate_participation(spec: Any, num_layers: int) -> tuple[Participation, ...]:
    """One rule per layer, one for every layer, or ``None`` (Full everywhere)."""
    if spec is None:
        return tuple(Full() for _ in range(num_layers))
    if isinstance(spec, (Participation, str)):
        return tuple(make_participation(spec) for _ in range(num_layers))
    spec = list(spec)
    if len(spec) != num_layers:
        raise ValueError(f"participation has length {len(spec)} but the hierarchy has N = {num_layers} layers: give "
                         f"one per layer (layer 1 draws devices, layer n draws layer n-1's nodes) or one for all")
    return tuple(make_participation(s) for s in spec)

