"""A dynamic hierarchy: devices that move between edge servers, edge servers that fail (the seed's open question 2).

The tree above the edge servers is fixed; what changes is which edge server (layer-1 node) every device is
attached to. Changes happen at the boundaries of one layer's aggregation periods (``every``; default N, the cloud's
rounds): after that layer's aggregation (Eq. 4) and before its re-synchronisation (Eq. 5), so a device that moved
starts its next period from its new edge server's model. Models:

- ``Static()``: no change (the default; the paper's setting).
- ``RandomReassociation(p)``: at every boundary each device moves, with probability p, to a uniformly chosen other
  edge server.
- ``Markov(transition)``: a device at edge server i moves to j with probability ``transition[i][j]`` (rows sum
  to 1); ``Markov.ring(num_edges, p)`` moves to either ring neighbour with probability p / 2 each.
- ``Schedule(parents_by_boundary)``: at boundary t (0-based), if the schedule has an entry for t, every device's
  edge server becomes ``parents_by_boundary[t][i]`` (a list of N_tot indices, or a mapping {t: list}; read from a
  JSON file ``{"boundaries": {"t": [...], ...}}`` by ``Schedule.from_file``).

Options of every model:

- ``mid_period=q``: in every layer-1 period each training device moves during the period with probability q: it
  loses that period's upload (counted as a drop) and is attached to a uniformly chosen other edge server at the
  period's end, before the re-synchronisation.
- ``failures=EdgeFailures(p, mode)``: at every boundary each edge server is down for the next period of the
  boundary layer with probability p (or as a ``schedule`` of failed edge servers per boundary says); its devices
  skip that period (``mode="skip"``), or attach to a live edge server under the same regional server when there is
  one, else any live one, and return home when it is up again (``mode="fallback"``).

Semantics. The aggregation weights |C(c)| / |C(p)| are recomputed after every change; a device keeps its own state
(its row, optimizer state, error-feedback memory) wherever it goes. An edge server left without devices has no
children: it neither changes nor uploads, and its weight above is 0. Every change is a new parent index array
over the stacked rows; draws come from generators keyed by (seed, boundary), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Mobility", "Static", "RandomReassociation", "Markov", "Schedule", "EdgeFailures", "make_mobility"]


def _probability(value: object, what: str, upper_inclusive: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= float(value) <= 1
    if not ok or (not upper_inclusive and float(value) == 1):
        raise ValueError(f"{what} must be a probability in [0, 1{']' if upper_inclusive else ')'}, got {value!r}")
    return float(value)


def _other_parent(old: Tensor, num_parents: int, g: torch.Generator) -> Tensor:
    """A uniformly chosen parent other than ``old`` for every entry (``old`` itself with a single parent)."""
    if num_parents < 2:
        return old.clone()
    r = torch.randint(0, num_parents - 1, old.shape, generator=g)
    return r + (r >= old).long()


def check_parents(parents: Any, num_devices: int, num_edges: int, what: str) -> Tensor:
    """An int64 [num_devices] tensor of edge-server indices in [0, num_edges), or a ValueError naming the problem."""
    t = torch.as_tensor(parents)
    if t.dtype == torch.bool or t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"{what} must be a list of integer edge-server indices, got dtype {t.dtype} shape "
                         f"{tuple(t.shape)}")
    if t.numel() != num_devices:
        raise ValueError(f"{what} has {t.numel()} entries but there are {num_devices} devices (one edge-server index "
                         f"per device: the schedule is of the wrong depth or size)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_edges):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{what} holds the edge server {bad}, outside [0, {num_edges - 1}]")
    return t.long()


class EdgeFailures:
    """Edge servers that are down for one period of the boundary layer (see the module docstring)."""

    def __init__(self, p: float = 0.0, mode: str = "skip", schedule: Mapping[int, Sequence[int]] | None = None
                 ) -> None:
        self.p = _probability(p, "EdgeFailures p", upper_inclusive=False)
        if mode not in ("skip", "fallback"):
            raise ValueError(f"EdgeFailures mode must be 'skip' or 'fallback', got {mode!r}")
        self.mode = mode
        self.schedule = {int(k): [int(e) for e in v] for k, v in (schedule or {}).items()}

    def down(self, boundary: int, num_edges: int, g: torch.Generator) -> Tensor:
        """bool [num_edges]: the edge servers down after ``boundary``."""
        out = torch.rand(num_edges, generator=g, dtype=torch.float64) < self.p if self.p else \
            torch.zeros(num_edges, dtype=torch.bool)
        for e in self.schedule.get(boundary, []):
            if not 0 <= e < num_edges:
                raise ValueError(f"EdgeFailures schedule at boundary {boundary} names edge server {e}, outside "
                                 f"[0, {num_edges - 1}]")
            out[e] = True
        return out

    @property
    def active(self) -> bool:
        return bool(self.p) or bool(self.schedule)

    def __repr__(self) -> str:
        sched = f", schedule=<{len(self.schedule)} boundaries>" if self.schedule else ""
        return f"EdgeFailures(p={self.p}, mode={self.mode!r}{sched})"

    def to_config(self) -> dict[str, Any]:
        return {"p": self.p, "mode": self.mode, "schedule": {str(k): list(v) for k, v in self.schedule.items()}}


class Mobility:
    """Base of the mobility models: ``move(boundary, parents, num_edges, generator) -> new parents``."""

    def __init__(self, every: int | None = None, mid_period: float = 0.0, failures: EdgeFailures | None = None
                 ) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
            raise ValueError(f"every must be None (the cloud's rounds) or a layer n >= 1, got {every!r}")
        self.every = None if every is None else int(every)
        self.mid_period = _probability(mid_period, "mid_period")
        if failures is not None and not isinstance(failures, EdgeFailures):
            raise TypeError(f"failures must be an EdgeFailures, got {type(failures).__name__}")
        self.failures = failures if failures is not None and failures.active else None

    @property
    def is_static(self) -> bool:
        return False

    def check(self, num_devices: int, num_edges: int, num_layers: int) -> None:
        if self.every is not None and self.every > num_layers:
            raise ValueError(f"mobility every={self.every}: the hierarchy has only {num_layers} layers")

    def move(self, boundary: int, parents: Tensor, num_edges: int, g: torch.Generator) -> Tensor:
        return parents

    def __repr__(self) -> str:
        opts = self._options()
        if self.every is not None:
            opts.append(f"every={self.every}")
        if self.mid_period:
            opts.append(f"mid_period={self.mid_period}")
        if self.failures is not None:
            opts.append(f"failures={self.failures!r}")
        return f"{type(self).__name__}({', '.join(opts)})"

    def _options(self) -> list[str]:
        return []

    config_name = "static"  # the ``model`` of make_mobility

    def _model_config(self) -> dict[str, Any]:
        """The model's own options as plain data (the base's are added by :meth:`to_config`)."""
        return {}

    def to_config(self) -> dict[str, Any]:
        """Plain data that :func:`make_mobility` rebuilds this model from (what checkpoints store)."""
        return {"model": self.config_name, **self._model_config(), "every": self.every, "mid_period": self.mid_period,
                "failures": None if self.failures is None else self.failures.to_config()}


class Static(Mobility):
    """No device ever moves (edge-server failures may still be given)."""

    @property
    def is_static(self) -> bool:
        return not self.mid_period and self.failures is None


class RandomReassociation(Mobility):
    """Every device moves to a uniformly chosen other edge server with probability p at every boundary."""

    def __init__(self, p: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.p = _probability(p, "RandomReassociation p")

    @property
    def is_static(self) -> bool:
        return self.p == 0 and not self.mid_period and self.failures is None

    def move(self, boundary: int, parents: Tensor, num_edges: int, g: torch.Generator) -> Tensor:
        if self.p == 0:
            return parents
        movers = torch.rand(parents.shape, generator=g, dtype=torch.float64) < self.p
        return torch.where(movers, _other_parent(parents, num_edges, g), parents)

    config_name = "random"

    def _options(self) -> list[str]:
        return [str(self.p)]

    def _model_config(self) -> dict[str, Any]:
        return {"p": self.p}


class Markov(Mobility):
    """A device at edge server i moves to j with probability ``transition[i][j]`` at every boundary."""

    def __init__(self, transition: Any, **kw: Any) -> None:
        super().__init__(**kw)
        t = torch.as_tensor(transition, dtype=torch.float64)
        if t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"Markov transition must be a square matrix [edges, edges], got shape {tuple(t.shape)}")
        if bool((t < 0).any()) or not torch.allclose(t.sum(1), torch.ones(t.shape[0], dtype=torch.float64),
                                                      atol=1e-9):
            raise ValueError("Markov transition rows must be probabilities that sum to 1")
        self.transition = t
        self._cum = torch.cumsum(t, dim=1)
        self._cum[:, -1] = 1.0

    @classmethod
    def ring(cls, num_edges: int, p: float, **kw: Any) -> "Markov":
        """Move to either ring neighbour (edge server i - 1 or i + 1, cyclically) with probability p / 2 each."""
        p = _probability(p, "Markov.ring p")
        t = torch.zeros(num_edges, num_edges, dtype=torch.float64)
        for i in range(num_edges):
            t[i, i] += 1 - p
            t[i, (i - 1) % num_edges] += p / 2
            t[i, (i + 1) % num_edges] += p / 2
        return cls(t, **kw)

    def check(self, num_devices: int, num_edges: int, num_layers: int) -> None:
        super().check(num_devices, num_edges, num_layers)
        if self.transition.shape[0] != num_edges:
            raise ValueError(f"Markov transition is {tuple(self.transition.shape)} but there are {num_edges} edge "
                             f"servers")

    def move(self, boundary: int, parents: Tensor, num_edges: int, g: torch.Generator) -> Tensor:
        u = torch.rand(parents.shape, generator=g, dtype=torch.float64)
        return torch.searchsorted(self._cum[parents], u[:, None], right=True).squeeze(1).clamp(max=num_edges - 1)

    config_name = "markov"

    def _options(self) -> list[str]:
        return [f"<{self.transition.shape[0]}x{self.transition.shape[0]}>"]

    def _model_config(self) -> dict[str, Any]:
        return {"transition": self.transition.tolist()}


class Schedule(Mobility):
    """The edge server of every device from a schedule of parent arrays, one per boundary (module docstring)."""

    def __init__(self, parents_by_boundary: Sequence[Sequence[int] | None] | Mapping[int, Sequence[int]], **kw: Any
                 ) -> None:
        super().__init__(**kw)
        if isinstance(parents_by_boundary, Mapping):
            self.table = {int(k): v for k, v in parents_by_boundary.items()}
        elif isinstance(parents_by_boundary, Sequence) and not isinstance(parents_by_boundary, (str, bytes)):
            self.table = {t: v for t, v in enumerate(parents_by_boundary) if v is not None}
        else:
            raise ValueError(f"Schedule takes a list of parent arrays (None: no change) or a mapping {{boundary: "
                             f"parents}}, got {type(parents_by_boundary).__name__}")
        for t in self.table:
            if t < 0:
                raise ValueError(f"Schedule boundary {t} < 0")

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> "Schedule":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the mobility schedule {p}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("boundaries"), dict):
            raise ValueError(f'{p}: expected {{"boundaries": {{"0": [edge of every device], ...}}}}')
        return cls({int(k): v for k, v in data["boundaries"].items()}, **kw)

    @property
    def is_static(self) -> bool:
        return not self.table and not self.mid_period and self.failures is None

    def check(self, num_devices: int, num_edges: int, num_layers: int) -> None:
        super().check(num_devices, num_edges, num_layers)
        self.table = {t: check_parents(v, num_devices, num_edges, f"Schedule entry for boundary {t}")
                      for t, v in self.table.items()}

    def move(self, boundary: int, parents: Tensor, num_edges: int, g: torch.Generator) -> Tensor:
        new = self.table.get(boundary)
        return parents if new is None else new.clone()

    config_name = "schedule"

    def _model_config(self) -> dict[str, Any]:
        return {"parents": {str(t): v.tolist() if isinstance(v, Tensor) else list(v) for t, v in self.table.items()}}

    def _options(self) -> list[str]:
        return [f"<{len(self.table)} boundaries>"]


def make_mobility(spec: Any, num_edges: int | None = None) -> Mobility:
    """From a config value: an instance, ``None`` (Static), or a dict ``{"model": "random", "p": 0.1, "every":
    null, "mid_period": 0.0, "failures": {"p": 0.05, "mode": "skip"}}``; ``model`` one of static, random, markov
    (``transition`` or ``ring_p``: ring neighbours, needs ``num_edges``), schedule (``file`` or ``parents``)."""
    if isinstance(spec, Mobility):
        return spec
    if spec is None:
        return Static()
    if not (isinstance(spec, dict) or hasattr(spec, "items")):
        raise ValueError(f"cannot build a mobility model from {spec!r}")
    d = {k: v for k, v in dict(spec).items() if v is not None}
    model = str(d.pop("model", "static")).lower()
    fail = d.pop("failures", None)
    kw: dict[str, Any] = {"every": d.pop("every", None), "mid_period": float(d.pop("mid_period", 0.0))}
    if fail is not None:
        fail = {k: v for k, v in dict(fail).items() if v is not None}
        kw["failures"] = EdgeFailures(**fail) if fail else None
    if model == "static":
        out: Mobility = Static(**kw)
    elif model == "random":
        out = RandomReassociation(d.pop("p", 0.0), **kw)
    elif model == "markov":
        if "transition" in d:
            out = Markov(d.pop("transition"), **kw)
        elif "ring_p" in d:
            if num_edges is None:
                raise ValueError("mobility markov with ring_p needs the number of edge servers")
            out = Markov.ring(num_edges, d.pop("ring_p"), **kw)
        else:
            raise ValueError("mobility model markov needs transition (a matrix) or ring_p")
    elif model == "schedule":
        if "file" in d:
            out = Schedule.from_file(d.pop("file"), **kw)
        elif "parents" in d:
            out = Schedule(d.pop("parents"), **kw)
        else:
            raise ValueError("mobility model schedule needs file (a JSON schedule) or parents")
    else:
        raise ValueError(f"unknown mobility model {model!r}; allowed: static, random, markov, schedule")
    if d:
        raise ValueError(f"mobility model {model!r} does not take the options {sorted(d)}")
    return out
