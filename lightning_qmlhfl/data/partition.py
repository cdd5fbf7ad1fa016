"""Partitioners: split a labelled dataset over the devices of a hierarchy (the non-IID settings of the experiments, docs/README.md).

Every partitioner returns one LongTensor of dataset indices per device. Each is a pure function of the labels,
the hierarchy and a seed. A device left without data is an error, never a silent empty device.

``group_by_edge`` (all partitioners with label skew): when True the skew is drawn per lowest-layer edge server
and the devices under one edge split that edge's data IID, so devices under one edge share classes. When False
(default) the skew is drawn per device.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy

__all__ = ["Partitioner", "IID", "Dirichlet", "Shards", "EmptyPartitionError", "make_partitioner"]


class EmptyPartitionError(ValueError):
    """A partition would leave some device without any sample."""


class Partitioner(ABC):
    group_by_edge: bool = False
    needs_labels: bool = True
    """Whether the split depends on the labels (IID does not: it works for any dataset, labels or not)."""

    def __call__(self, labels: Tensor | None, hierarchy: Hierarchy, seed: int = 0,
                 num_samples: int | None = None) -> list[Tensor]:
        """Per-device LongTensors of indices into the dataset. ``labels``: int [n] class ids, or ``None`` for a
        partitioner that needs none (then give ``num_samples``)."""
        if labels is None:
            if self.needs_labels:
                raise ValueError(f"{self!r} splits by label and needs one class id per sample; got labels=None")
            if num_samples is None:
                raise ValueError("without labels, give num_samples (the dataset's length)")
            labels = torch.zeros(int(num_samples), dtype=torch.long)  # placeholder: never read by IID
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.numel() == 0:
            raise EmptyPartitionError("the training dataset is empty")
        g = torch.Generator().manual_seed(int(seed))
        if self.group_by_edge and hierarchy.num_layers >= 1:
            edge_of = hierarchy.parent_index(0)
            groups = self._split(labels, torch.arange(labels.numel()), hierarchy.nodes_per_layer[1], g)
            parts: list[Tensor] = [torch.empty(0, dtype=torch.long)] * hierarchy.num_devices
            for e, idx in enumerate(groups):
                devs = (edge_of == e).nonzero().flatten().tolist()
                perm = idx[torch.randperm(idx.numel(), generator=g)]
                for j, chunk in enumerate(torch.tensor_split(perm, len(devs))):
                    parts[devs[j]] = chunk
        else:
            parts = self._split(labels, torch.arange(labels.numel()), hierarchy.num_devices, g)
        parts = [p.sort().values for p in parts]
        empty = [i for i, p in enumerate(parts) if p.numel() == 0]
        if empty:
            raise EmptyPartitionError(
                f"{self!r} leaves {len(empty)} of {hierarchy.num_devices} devices without data (first: device "
                f"{empty[0]}); {labels.numel()} samples are too few for this split. Use fewer devices, more data, "
                f"a larger alpha or min_samples, or more classes per device"
            )
        return parts

    @abstractmethod
    def _split(self, labels: Tensor, index: Tensor, parts: int, g: torch.Generator) -> list[Tensor]:
        """Split ``index`` (positions into ``labels``) into ``parts`` groups."""


class IID(Partitioner):
    """Uniformly random, equal-sized shares (sizes differ by at most one). Needs no labels."""

    needs_labels = False

    def _split(self, labels: Tensor, index: Tensor, parts: int, g: torch.Generator) -> list[Tensor]:
        perm = index[torch.randperm(index.numel(), generator=g)]
        return list(torch.tensor_split(perm, parts))

    def __repr__(self) -> str:
        return "IID()"


class Dirichlet(Partitioner):
    """Label skew: for every class, its samples are split over the parts in proportions ~ Dir(alpha).

    Smaller ``alpha`` = more skew. Redraws (up to ``max_tries``) until every part holds at least ``min_samples``.
    """

    def __init__(self, alpha: float = 0.5, min_samples: int = 10, group_by_edge: bool = False,
                 max_tries: int = 100) -> None:
        if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0
                or not math.isfinite(float(alpha))):
            raise ValueError(f"Dirichlet alpha must be a finite number > 0 (large values approach an IID split; use "
                             f"IID() for one), got {alpha!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, numbers.Integral) or min_samples < 1:
            raise ValueError(f"min_samples must be an integer >= 1, got {min_samples!r}")
        self.alpha, self.min_samples, self.group_by_edge = float(alpha), int(min_samples), bool(group_by_edge)
        self.max_tries = int(max_tries)

    def _split(self, labels: Tensor, index: Tensor, parts: int, g: torch.Generator) -> list[Tensor]:
        if self.min_samples * parts > index.numel():
            raise EmptyPartitionError(
                f"min_samples={self.min_samples} for {parts} parts needs {self.min_samples * parts} samples, "
                f"but only {index.numel()} are available"
            )
        sub = labels[index]
        classes = sub.unique().tolist()
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
        out: list[Tensor] = []
        for _ in range(self.max_tries):
            buckets: list[list[Tensor]] = [[] for _ in range(parts)]
            for c in classes:
                idx = index[sub == c]
                idx = idx[torch.randperm(idx.numel(), generator=g)]
                props = rng.dirichlet(np.full(parts, self.alpha))
                cuts = np.minimum(np.round(np.cumsum(props) * idx.numel()).astype(np.int64), idx.numel())
                start = 0
                for p, stop in enumerate(cuts.tolist()):
                    buckets[p].append(idx[start:stop])
                    start = stop
            out = [torch.cat(b) for b in buckets]
            if min(o.numel() for o in out) >= self.min_samples:
                return out
        smallest = min(o.numel() for o in out)
        raise EmptyPartitionError(
            f"{self!r}: after {self.max_tries} draws some of the {parts} parts still hold fewer than "
            f"min_samples={self.min_samples} samples (smallest: {smallest}); lower min_samples, raise alpha, "
            f"or use fewer devices"
        )

    def __repr__(self) -> str:
        return f"Dirichlet(alpha={self.alpha}, min_samples={self.min_samples}, group_by_edge={self.group_by_edge})"


class Shards(Partitioner):
    """Pathological label skew: sort by label, cut into ``parts * classes_per_device`` shards, deal each part
    ``classes_per_device`` random shards (so each holds about that many classes)."""

    def __init__(self, classes_per_device: int = 2, group_by_edge: bool = False) -> None:
        if isinstance(classes_per_device, bool) or not isinstance(classes_per_device, numbers.Integral) \
                or classes_per_device < 1:
            raise ValueError(f"classes_per_device must be an integer >= 1, got {classes_per_device!r}")
        self.classes_per_device, self.group_by_edge = int(classes_per_device), bool(group_by_edge)

    def _split(self, labels: Tensor, index: Tensor, parts: int, g: torch.Generator) -> list[Tensor]:
        order = index[torch.argsort(labels[index] * index.numel() + torch.arange(index.numel()))]
        shards = torch.tensor_split(order, parts * self.classes_per_device)
        deal = torch.randperm(len(shards), generator=g).view(parts, self.classes_per_device)
        return [torch.cat([shards[j] for j in row.tolist()]) for row in deal]

    def __repr__(self) -> str:
        return f"Shards(classes_per_device={self.classes_per_device}, group_by_edge={self.group_by_edge})"


def make_partitioner(spec: object) -> Partitioner:
    """From a config value: an instance, "iid", or a dict ``{"name": "dirichlet", "alpha": 0.5, ...}``."""
    if isinstance(spec, Partitioner):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if hasattr(spec, "items"):
        d = dict(spec)
        name = str(d.pop("name", "")).lower()
        table = {"iid": IID, "dirichlet": Dirichlet, "shards": Shards}
        if name not in table:
            raise ValueError(f"unknown partition {name!r}; allowed: {sorted(table)}")
        if name == "iid":
            d.pop("group_by_edge", None)
            if d:
                raise ValueError(f"IID takes no options, got {sorted(d)}")
            return IID()
        return table[name](**d)
    raise ValueError(f"cannot build a partitioner from {spec!r}")
