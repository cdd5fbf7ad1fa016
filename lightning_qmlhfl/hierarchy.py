"""The tree of a multi-layer hierarchical federated system (ALGORITHM.md section 1).

Layer 0 holds the devices, layers 1..N-1 the edge servers, layer N the single cloud. Every node of layer
n < N has exactly one parent in layer n+1; every path from a device to the cloud has exactly N hops.
"""

from __future__ import annotations

import math

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Hierarchy", "TreeState", "aggregations_per_round"]


def aggregations_per_round(taus: "list[int] | tuple[int, ...]", n: int) -> int:
    """How many times layer n (1..N) aggregates in one global round: prod_{m > n} tau_m (one every
    tau_1 ... tau_n local steps of a round of tau_1 ... tau_N steps)."""
    if not 1 <= n <= len(taus):
        raise ValueError(f"layer n must be in [1, {len(taus)}], got {n!r}")
    return math.prod(int(t) for t in taus[n:])


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_layer_shapes(parent: torch.Tensor, child: torch.Tensor, parent_index: torch.Tensor,
                       weights: torch.Tensor) -> None:
    """One layer's aggregation inputs: parent [M, P], child [C, P], parent_index and weights [C]."""
    if parent.dim() != 2 or child.dim() != 2 or parent.shape[1] != child.shape[1]:
        raise ValueError(f"parent [M, P] and child [C, P] must share P; got {tuple(parent.shape)}, {tuple(child.shape)}")
    if parent_index.shape != (child.shape[0],) or weights.shape != (child.shape[0],):
        raise ValueError(
            f"parent_index and weights must have shape ({child.shape[0]},); got "
            f"{tuple(parent_index.shape)}, {tuple(weights.shape)}"
        )


def children_by_parent(parent_index: torch.Tensor, num_parents: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Group child rows by parent for the fused aggregation kernels: ``order`` int64 [C] (children sorted by
    parent, stable, so each parent keeps its children in index order) and ``segments`` int64 [M + 1] (the children
    of p are ``order[segments[p]:segments[p + 1]]``). ``parent_index`` int64 [C]; an index outside [0, M) raises."""
    if parent_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(parent_index))
        if lo < 0 or hi >= num_parents:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{who}: parent_index holds {bad}, outside the {num_parents} parent rows [0, {num_parents - 1}]"
            )
    order = torch.argsort(parent_index, stable=True)
    counts = torch.bincount(parent_index, minlength=num_parents)
    segments = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, segments


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """An N-layer tree: ``parents[n][i]`` is the index in layer n+1 of the parent of node i of layer n.

    Use :meth:`balanced` or :meth:`from_parents` to build one; both validate the tree.

    Attributes (all derived, read-only):
        num_layers: N, the number of aggregation layers (1 = FedAvg, 2 = client-edge-cloud, ...).
        num_devices: N_tot, the number of devices (layer-0 nodes).
        nodes_per_layer: tuple of N+1 ints, layer 0 (devices) first, ``nodes_per_layer[N] == 1`` (cloud).
        device_counts: per layer n, a LongTensor [nodes_per_layer[n]] with |C(i)|, the number of devices below node i.
    """

    parents: tuple[tuple[int, ...], ...]
    nodes_per_layer: tuple[int, ...] = field(init=False)
    device_counts: tuple[torch.Tensor, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parents = self.parents
        if len(parents) < 1:
            raise ValueError("a hierarchy needs at least one aggregation layer (parents has length 0)")
        sizes = [len(parents[0])]
        for n, layer in enumerate(parents):
            if len(layer) == 0:
                raise ValueError(f"layer {n} is empty: every layer needs at least one node")
            if n > 0 and len(layer) != sizes[n]:
                raise ValueError(
                    f"depth mismatch: layer {n} has {len(layer)} parent entries but layer {n - 1} refers to "
                    f"{sizes[n]} nodes in layer {n}"
                )
            for i, p in enumerate(layer):
                if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                    raise ValueError(f"parents[{n}][{i}] must be an integer node index, got {p!r}")
            top = max(layer) + 1
            if min(layer) < 0:
                raise ValueError(f"parent index out of range: parents[{n}] contains {min(layer)} < 0")
            if n == len(parents) - 1:
                if top != 1:
                    raise ValueError(
                        f"parent index out of range: layer {n + 1} is the cloud (a single node, index 0), "
                        f"but parents[{n}] contains {max(layer)}"
                    )
            sizes.append(top)
            missing = sorted(set(range(top)) - set(layer))
            if missing:
                raise ValueError(
                    f"node {missing[0]} of layer {n + 1} has no children (parents[{n}] never refers to it); "
                    f"every node above the devices needs at least one child"
                )
        object.__setattr__(self, "nodes_per_layer", tuple(sizes))
        counts = [torch.ones(sizes[0], dtype=torch.long)]
        for n, layer in enumerate(parents):
            c = torch.zeros(sizes[n + 1], dtype=torch.long)
            c.index_add_(0, torch.tensor(layer, dtype=torch.long), counts[n])
            counts.append(c)
        object.__setattr__(self, "device_counts", tuple(counts))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def balanced(cls, branching: Sequence[int]) -> "Hierarchy":
        """A regular tree. ``branching[0]`` is the cloud's fan-out, ``branching[-1]`` the devices per lowest edge.

        ``[4, 5, 5]``: a cloud with 4 children, each with 5 children, each with 5 devices (100 devices, N = 3).
        ``[10]``: FedAvg with 10 devices (N = 1).
        """
        if isinstance(branching, (str, bytes)) or not isinstance(branching, Sequence):
            raise ValueError(f"branching must be a list of integers >= 1, got {branching!r}")
        if len(branching) == 0:
            raise ValueError("branching must list at least one fan-out (got an empty list)")
        b = [_check_int(x, f"branching[{i}]", 1) for i, x in enumerate(branching)]
        # Build bottom-up: layer 0 (devices) has prod(b) nodes; node i's parent is i // b[-1-n].
        parents: list[tuple[int, ...]] = []
        count = 1
        for x in b:
            count *= x
        for n in range(len(b)):
            fan = b[len(b) - 1 - n]
            parents.append(tuple(i // fan for i in range(count)))
            count //= fan
        return cls(tuple(parents))

    @classmethod
    def from_parents(cls, parents: Sequence[Sequence[int]]) -> "Hierarchy":
        """An arbitrary (irregular) tree; ``parents[n][i]`` = index in layer n+1 of node i's parent, n = 0..N-1."""
        if isinstance(parents, (str, bytes)) or not isinstance(parents, Sequence):
            raise ValueError(f"parents must be a list of lists of integers, got {parents!r}")
        out = []
        for n, layer in enumerate(parents):
            if isinstance(layer, torch.Tensor):
                layer = layer.tolist()
            if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence):
                raise ValueError(f"parents[{n}] must be a list of integers, got {layer!r}")
            out.append(tuple(layer))
        return cls(tuple(out))

    # ------------------------------------------------------------------ derived views
    @property
    def num_layers(self) -> int:
        """N: the number of aggregation layers (the cloud is layer N)."""
        return len(self.parents)

    @property
    def num_devices(self) -> int:
        """N_tot: the number of devices."""
        return self.nodes_per_layer[0]

    def parent_index(self, n: int) -> torch.Tensor:
        """LongTensor [nodes_per_layer[n]]: parent (in layer n+1) of each node of layer n, for 0 <= n < N."""
        self._check_layer(n, upper=self.num_layers - 1)
        return torch.tensor(self.parents[n], dtype=torch.long)

    def ancestor_index(self, lower: int, upper: int) -> torch.Tensor:
        """LongTensor [nodes_per_layer[lower]]: the ancestor in layer ``upper`` of each node of layer ``lower``."""
        self._check_layer(lower)
        self._check_layer(upper)
        if upper < lower:
            raise ValueError(f"upper layer {upper} is below lower layer {lower}")
        idx = torch.arange(self.nodes_per_layer[lower])
        for n in range(lower, upper):
            idx = self.parent_index(n)[idx]
        return idx

    def children(self, n: int, p: int) -> list[int]:
        """Indices (in layer n-1) of the children of node p of layer n, n >= 1."""
        self._check_layer(n, lower=1)
        return [i for i, q in enumerate(self.parents[n - 1]) if q == p]

    def aggregation_weights(self, n: int, device_mass: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 [nodes_per_layer[n-1]]: weight of each child of layer n-1 in its parent's Eq. 4/6 sum.

        Default |C(child)| / |C(parent)| (sums to 1 at every parent). With ``device_mass`` (a float tensor
        [num_devices], e.g. local sample counts) a node's mass is the sum over its devices instead.
        """
        self._check_layer(n, lower=1)
        mass = self.node_mass(n - 1, device_mass)
        parent_mass = self.node_mass(n, device_mass)
        return mass / parent_mass[self.parent_index(n - 1)]

    def node_mass(self, n: int, device_mass: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 [nodes_per_layer[n]]: |C(i)| (or the summed ``device_mass``) of every node of layer n."""
        self._check_layer(n)
        if device_mass is None:
            return self.device_counts[n].to(torch.float64)
        device_mass = torch.as_tensor(device_mass, dtype=torch.float64).cpu()
        if device_mass.shape != (self.num_devices,):
            raise ValueError(f"device_mass must have shape ({self.num_devices},), got {tuple(device_mass.shape)}")
        if not bool((device_mass > 0).all()) or not bool(torch.isfinite(device_mass).all()):
            raise ValueError("device_mass must be finite and > 0 for every device")
        m = device_mass
        for k in range(n):
            nxt = torch.zeros(self.nodes_per_layer[k + 1], dtype=torch.float64)
            nxt.index_add_(0, self.parent_index(k), m)
            m = nxt
        return m

    def _check_layer(self, n: int, lower: int = 0, upper: int | None = None) -> None:
        upper = self.num_layers if upper is None else upper
        if not (lower <= n <= upper):
            raise ValueError(f"layer {n} out of range: allowed {lower}..{upper}")

    def __repr__(self) -> str:
        return f"Hierarchy(layers={self.num_layers}, nodes_per_layer={list(self.nodes_per_layer)})"

    def to_dict(self) -> dict:
        """Plain-python form for checkpoints and logging."""
        return {"parents": [list(p) for p in self.parents]}


class TreeState:
    """The current tree of a run whose devices may move between edge servers (:mod:`lightning_qmlhfl.federation.mobility`):
    the :class:`Hierarchy`'s parent index arrays, with the devices' edge servers replaceable. An edge server may be
    left without devices (then it has no children and its |C| is 0). Offers the Hierarchy's derived views."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.base = hierarchy
        self.num_layers = hierarchy.num_layers
        self.num_devices = hierarchy.num_devices
        self.nodes_per_layer = hierarchy.nodes_per_layer
        self._parents = [hierarchy.parent_index(n) for n in range(self.num_layers)]
        self.version = 0  # incremented at every change of the device layer's parents

    def parent_index(self, n: int) -> torch.Tensor:
        """LongTensor [nodes_per_layer[n]]: the current parent of each node of layer n (0 <= n < N)."""
        return self._parents[n]

    def set_device_parents(self, parents: torch.Tensor) -> None:
        """Attach every device to ``parents[i]`` (int64 [N_tot] indices of layer-1 nodes)."""
        parents = parents.to(torch.long).cpu()
        if parents.shape != (self.num_devices,):
            raise ValueError(f"device parents must have shape ({self.num_devices},), got {tuple(parents.shape)}")
        if parents.numel() and (int(parents.min()) < 0 or int(parents.max()) >= self.nodes_per_layer[1]):
            raise ValueError(f"device parents must lie in [0, {self.nodes_per_layer[1] - 1}]")
        if not torch.equal(parents, self._parents[0]):
            self._parents[0] = parents.clone()
            self.version += 1

    def ancestor_index(self, lower: int, upper: int) -> torch.Tensor:
        idx = torch.arange(self.nodes_per_layer[lower])
        for n in range(lower, upper):
            idx = self._parents[n][idx]
        return idx

    def node_mass(self, n: int, device_mass: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 [nodes_per_layer[n]]: devices (or summed ``device_mass``) below every node of layer n."""
        m = torch.ones(self.num_devices, dtype=torch.float64) if device_mass is None else \
            torch.as_tensor(device_mass, dtype=torch.float64).cpu()
        for k in range(n):
            nxt = torch.zeros(self.nodes_per_layer[k + 1], dtype=torch.float64)
            nxt.index_add_(0, self._parents[k], m)
            m = nxt
        return m

    def device_counts(self, n: int) -> torch.Tensor:
        return self.node_mass(n).round().long()

    def aggregation_weights(self, n: int, device_mass: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 [nodes_per_layer[n-1]]: |C(child)| / |C(parent)| (0 below a parent without devices)."""
        mass = self.node_mass(n - 1, device_mass)
        parent = self.node_mass(n, device_mass)[self._parents[n - 1]]
        return torch.where(parent > 0, mass / parent.clamp(min=torch.finfo(torch.float64).tiny),
                           torch.zeros_like(mass))

    def state_dict(self) -> dict:
        return {"device_parents": self._parents[0].clone(), "version": self.version}

    def load_state_dict(self, sd: dict) -> None:
        self._parents[0] = sd["device_parents"].clone()
        self.version = int(sd["version"])
