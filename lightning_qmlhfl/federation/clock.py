"""The simulated clock of the schedule (docs/algorithm.md#clock, generalised to heterogeneous nodes).

Every node keeps the time it has spent in its parent's current aggregation period. A device adds its compute time
per local step it trains. At an aggregation of layer n, child c's upload is ready at

    ready_c = busy_c + bits_n / rate_c                       (its time in the period + its upload time)

and parent p's period lasts

    T_p = max over the uploads c of p of ready_c  (+ the downlink time of layer n when it received any)

where, when stragglers are dropped (``LatencyModel(straggler="drop", deadlines=...)``), a late sender is not waited
for and the parent aggregates at its deadline. Subtrees run in parallel: p's own busy time grows by T_p, and its
children start their next period from zero. A node's absolute time is the round's start plus the busy times of
its ancestors' current periods and its own. The round ends with the cloud's aggregation: the simulated clock
advances by the cloud's T.

With every node identical and everyone taking part this is T_glob(tau) = prod tau t + sum_n prod_{m>n} tau_m t_n
of :mod:`lightning_qmlhfl.theory.latency` (tested). The split of a round's time into computation and each layer's
communication follows its critical path (the slowest sender at every aggregation): it sums to the round time.

:func:`tree_round_times` is the same recursion for everyone-takes-part periods, vectorised over many tau at once
(the planner's grid).

With an energy model on the latency model (``LatencyModel(energy=...)``, docs/algorithm.md#energy) the clock also
counts joules: every device's energy per local step it trains, and ``P_c bits_n / r_c`` for every upload delivered
(a lost upload, late, over-selected or dropped out, is not charged). ``round_energy`` accumulates the current round,
``last_round_energy`` is the last completed round's, ``energy`` the total of the completed rounds.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy, TreeState

__all__ = ["SimulatedClock", "tree_round_times"]


def _segment_max(values: Tensor, index: Tensor, segments: int) -> Tensor:
    """max of ``values`` [..., C] over the C entries of each segment (``index`` [C]); 0 for empty segments."""
    out = torch.zeros(*values.shape[:-1], segments, dtype=values.dtype)
    return out.scatter_reduce(-1, index.expand_as(values), values, reduce="amax", include_self=True)


class SimulatedClock:
    """Per-node busy times and the round clock (module docstring). Times in seconds, float64."""

    def __init__(self, hierarchy: Hierarchy | TreeState, latency: Any, upload_bits: Sequence[int],
                 downlink_bits: Sequence[int] | None = None) -> None:
        self.hierarchy = hierarchy
        N = self.N = hierarchy.num_layers
        if latency.num_layers != N:
            raise ValueError(f"the latency model describes {latency.num_layers} layers, the hierarchy has N = {N}")
        self.compute = latency.device_compute_times(hierarchy.num_devices)
        self.up = [float(upload_bits[n - 1]) / latency.sender_rates(n, hierarchy.nodes_per_layer[n - 1])
                   for n in range(1, N + 1)]
        down = latency.slowest_downlink_rates
        if down is not None and downlink_bits is None:
            raise ValueError("the latency model has downlink rates: give downlink_bits (32 d per download)")
        self.down = [0.0 if down is None else float(downlink_bits[n - 1]) / down[n - 1] for n in range(1, N + 1)]
        self.deadlines = [latency.deadline(n) for n in range(1, N + 1)]
        self.energy_model = getattr(latency, "energy", None)
        if self.energy_model is not None:
            self.step_joules = self.energy_model.device_step_joules(hierarchy.num_devices)
            self.upload_joules = [self.energy_model.sender_powers(n, hierarchy.nodes_per_layer[n - 1]) * self.up[n - 1]
                                  for n in range(1, N + 1)]
        self.energy = self.round_energy = self.last_round_energy = 0.0
        self._version = -1
        self._refresh()
        self.now = 0.0  # absolute simulated time at the start of the current round
        self.reset_round()
        self.last_round_time = 0.0
        self.last_split = torch.zeros(N + 1, dtype=torch.float64)

    def _refresh(self) -> None:
        """Re-derive the ancestor maps when the tree changed (a :class:`~lightning_qmlhfl.hierarchy.TreeState`)."""
        version = getattr(self.hierarchy, "version", 0)
        if version != self._version:
            N = self.N
            self._anc = [[self.hierarchy.ancestor_index(m, j) for j in range(m, N)] for m in range(N)]
            self._version = version

    def reset_round(self) -> None:
        h = self.hierarchy
        self.busy = [torch.zeros(h.nodes_per_layer[m], dtype=torch.float64) for m in range(self.N)]
        self.split = [torch.zeros(h.nodes_per_layer[m], self.N + 1, dtype=torch.float64) for m in range(self.N)]

    # ------------------------------------------------------------------ progress
    def node_now(self, m: int) -> Tensor:
        """float64 [M_m]: the absolute simulated time of every node of layer m (m < N)."""
        self._refresh()
        t = torch.full((self.hierarchy.nodes_per_layer[m],), self.now, dtype=torch.float64)
        for j, anc in zip(range(m, self.N), self._anc[m]):
            t = t + self.busy[j][anc]
        return t

    def step(self, active: Tensor | None) -> None:
        """One local step of the devices ``active`` (int64 indices; None: all)."""
        if active is None:
            self.busy[0] += self.compute
            self.split[0][:, 0] += self.compute
        else:
            self.busy[0][active] += self.compute[active]
            self.split[0][active, 0] += self.compute[active]
        if self.energy_model is not None:
            self.round_energy += float(self.step_joules.sum() if active is None else self.step_joules[active].sum())

    def ready(self, n: int) -> Tensor:
        """float64 [M_{n-1}]: when each sender's upload into layer n would be complete, in its period's time."""
        return self.busy[n - 1] + self.up[n - 1]

    def aggregate(self, n: int, uploads: Tensor, waited: Tensor | None = None) -> Tensor:
        """Close layer n's periods: ``uploads`` (bool [M_{n-1}]) are the senders that uploaded, ``waited``
        (float64 [M_n]) the time each parent waited regardless (its deadline when it dropped a late sender).
        Returns T (float64 [M_n]); advances the parents' busy times, resets the children's."""
        h = self.hierarchy
        M = h.nodes_per_layer[n]
        pidx = h.parent_index(n - 1)
        ready = self.ready(n)
        r = torch.where(uploads, ready, torch.full_like(ready, -math.inf))
        best = _segment_max(r, pidx, M).clamp(min=0.0)
        has = torch.zeros(M, dtype=torch.bool)
        has[pidx[uploads]] = True
        # the critical child of every parent: its first upload that is ready at `best`
        hit = uploads & (ready == best[pidx])
        crit = torch.full((M,), -1, dtype=torch.int64)
        cand = torch.nonzero(hit).flatten().flip(0)
        crit[pidx[cand]] = cand  # the lowest index wins (assigned last)
        T = best.clone()
        if waited is not None:
            T = torch.maximum(T, waited)
        T = T + torch.where(has, torch.full_like(T, self.down[n - 1]), torch.zeros_like(T))
        split = torch.zeros(M, self.N + 1, dtype=torch.float64)
        ok = crit >= 0
        split[ok] = self.split[n - 1][crit[ok]]
        base = torch.where(ok, self.busy[n - 1][crit.clamp(min=0)], torch.zeros_like(T))
        split[:, n] += T - base  # the critical child's upload, waiting, and the download: layer n's links
        if self.energy_model is not None:
            self.round_energy += float(self.upload_joules[n - 1][uploads].sum())
        if n < self.N:
            self.busy[n] += T
            self.split[n] += split
        else:
            self.last_round_time = float(T[0])
            self.last_split = split[0]
            self.now += self.last_round_time
            if self.energy_model is not None:
                self.last_round_energy, self.round_energy = self.round_energy, 0.0
                self.energy += self.last_round_energy
        self.busy[n - 1].zero_()
        self.split[n - 1].zero_()
        return T

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, "busy": [b.clone() for b in self.busy], "split": [s.clone() for s in self.split],
                "last_round_time": self.last_round_time, "last_split": self.last_split.clone(),
                **({} if self.energy_model is None else {"energy": [self.energy, self.round_energy,
                                                                    self.last_round_energy]})}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.now = float(sd["now"])
        self.busy = [b.clone() for b in sd["busy"]]
        self.split = [s.clone() for s in sd["split"]]
        self.last_round_time = float(sd["last_round_time"])
        self.last_split = sd["last_split"].clone()
        if "energy" in sd:
            self.energy, self.round_energy, self.last_round_energy = (float(x) for x in sd["energy"])


def tree_round_times(hierarchy: Hierarchy, tau_grid: np.ndarray, compute: Tensor, up: Sequence[Tensor],
                     down: Sequence[float], deadlines: Sequence[float | None] | None = None,
                     chunk: int = 4096) -> np.ndarray:
    """T_glob for many tau at once when every node takes part: float64 [K] for ``tau_grid`` int [K, N].

    ``compute`` [N_tot]: seconds per step of every device; ``up[n-1]`` [M_{n-1}]: upload seconds of every sender
    of layer n-1; ``down[n-1]``: the downlink seconds of layer n; ``deadlines``: per layer, a drop deadline or None.
    The recursion is T_p = max_c (tau_n T_c + up_c) (or the deadline, when a sender is later) + down_n, with the
    device's T = its compute time per step (the :class:`SimulatedClock`'s, for periods where everyone uploads)."""
    grid = np.asarray(tau_grid, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != hierarchy.num_layers:
        raise ValueError(f"tau_grid must have shape [K, {hierarchy.num_layers}], got {grid.shape}")
    out = np.empty(grid.shape[0], dtype=np.float64)
    for lo in range(0, grid.shape[0], chunk):
        taus = torch.as_tensor(grid[lo:lo + chunk], dtype=torch.float64)
        T = compute.to(torch.float64).expand(taus.shape[0], -1)
        for n in range(1, hierarchy.num_layers + 1):
            ready = taus[:, n - 1:n] * T + up[n - 1][None, :]
            M = hierarchy.nodes_per_layer[n]
            best = _segment_max(ready, hierarchy.parent_index(n - 1), M)
            d = None if deadlines is None else deadlines[n - 1]
            if d is not None:
                best = torch.clamp(best, max=d)
            T = best + down[n - 1]
        out[lo:lo + chunk] = T[:, 0].numpy()
    return out
