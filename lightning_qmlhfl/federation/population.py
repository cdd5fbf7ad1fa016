"""Who takes part, when: the per-period state of partial participation, availability, dropouts, stragglers and
the simulated clock, shared by the engine (which trains and aggregates on top of it) and by the latency model's
expected round time (which only runs the clock).

At the start of each aggregation period of layer n (the local step k with (k - 1) mod (tau_1 ... tau_n) = 0, 1-based),
every node of layer n draws its children for the period (:mod:`lightning_qmlhfl.federation.participation`; devices only among
those available, :mod:`lightning_qmlhfl.federation.availability`). A device trains during a layer-1 period when it and each of
its ancestors below the cloud were drawn for their current periods. At the aggregation that closes the period,
the candidates are the drawn children that trained (devices) or received at least one upload (nodes); of these,
late senders (when stragglers are dropped), the over-selected beyond the first k to finish, and devices that drop
out do not upload. The others' uploads are weighted by :func:`participation_weights`. A node without uploads is
left unchanged and does not count as having received anything.

Everything is a mask or an index array over the stacked rows; draws come from generators keyed by (seed, round,
layer, aggregation event), so they do not depend on the executor, backend or process.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .availability import Availability
from .clock import SimulatedClock
from ..hierarchy import Hierarchy
from .participation import Participation, participation_weights, rank_within_parent
from ..rng import Stream, generator

__all__ = ["Population", "estimate_round_time", "simulate_round"]


class Population:
    """The participation state of one run (module docstring)."""

    def __init__(self, hierarchy: Hierarchy, taus: Sequence[int], participation: Sequence[Participation],
                 availability: Availability | None, clock: SimulatedClock, seed: int) -> None:
        self.h, self.N = hierarchy, hierarchy.num_layers
        self.period = [math.prod(taus[:n]) for n in range(1, self.N + 1)]
        self.participation = tuple(participation)
        for n, p in enumerate(self.participation, start=1):
            p.check_tree(hierarchy.parent_index(n - 1), hierarchy.nodes_per_layer[n], n)
        if availability is not None:
            availability.check(hierarchy.num_devices)
        self.availability = availability if availability is not None and not availability.is_always else None
        self.clock, self.seed = clock, int(seed)
        self.trivial = (all(p.is_full for p in self.participation) and self.availability is None
                        and all(d is None for d in clock.deadlines))
        self._version = -1
        self._refresh()
        self.down = torch.zeros(hierarchy.nodes_per_layer[1] if self.N > 1 else 1, dtype=torch.bool)  # failed edges
        self.movers = torch.zeros(hierarchy.num_devices, dtype=torch.bool)  # moved during the last layer-1 period
        self.mid_period = 0.0  # the probability of a mid-period move (set by the engine's mobility model)
        M = hierarchy.nodes_per_layer
        self.selected = [torch.ones(M[m], dtype=torch.bool) for m in range(self.N)]
        self.pi = [torch.ones(M[m], dtype=torch.float64) for m in range(self.N)]
        self.keep = [torch.bincount(self._pidx[m], minlength=M[m + 1]) for m in range(self.N)]
        self.contributed = [torch.zeros(M[m], dtype=torch.bool) for m in range(self.N)]
        self.active: Tensor | None = None  # int64 indices of the training devices; None = all
        self._begun = -1  # the total step whose draws are done
        self.reset_stats()

    def _refresh(self) -> None:
        """Re-derive the index maps when the tree changed (a :class:`~lightning_qmlhfl.hierarchy.TreeState`)."""
        version = getattr(self.h, "version", 0)
        if version != self._version:
            self._pidx = [self.h.parent_index(m) for m in range(self.N)]
            self._anc0 = [self.h.ancestor_index(0, m) for m in range(self.N)]
            self._version = version

    def set_down(self, down: Tensor) -> None:
        """Edge servers down for the next period of the boundary layer (failures, mode "skip")."""
        self.down = down.clone()
        self.trivial = False

    def reset_stats(self) -> None:
        self.uploads = [0] * self.N  # per layer, uploads received in the current round
        self.dropped = [0] * self.N  # per layer, senders that trained but whose upload was lost

    # ------------------------------------------------------------------ periods
    def begin_step(self, round_idx: int, step: int, total_step: int) -> Tensor | None:
        """Draw the periods that start at local step ``step`` (0-based in the round) and return the devices that
        train in it (int64 indices, or None for all). Idempotent for one ``total_step``."""
        if self.trivial or self._begun == total_step:
            return self.active
        self._refresh()
        self._begun = total_step
        for n in range(self.N, 0, -1):
            if step % self.period[n - 1] == 0:
                self._draw(n, round_idx, step // self.period[n - 1])
        if step % self.period[0] == 0:
            a = self.selected[0].clone()
            for m in range(1, self.N):
                a &= self.selected[m][self._anc0[m]]
            if bool(self.down.any()):
                a &= ~self.down[self._anc0[1]]
            self.active = None if bool(a.all()) else torch.nonzero(a).flatten()
        return self.active

    def _draw(self, n: int, round_idx: int, event: int) -> None:
        M = self.h.nodes_per_layer
        available = torch.ones(M[n - 1], dtype=torch.bool)
        if n == 1 and self.availability is not None:
            now = self.clock.node_now(0)
            available = self.availability.available(now, generator(self.seed, Stream.AVAILABILITY, round_idx, event))
        sel, keep, pi = self.participation[n - 1].select(self._pidx[n - 1], M[n], available,
                                                         generator(self.seed, Stream.PARTICIPATION, round_idx, n, event))
        self.selected[n - 1], self.keep[n - 1], self.pi[n - 1] = sel, keep, pi

    def after_step(self) -> None:
        """The training devices ran one local step."""
        self.clock.step(self.active)
        if self.active is None:
            self.contributed[0].fill_(True)
        else:
            self.contributed[0][self.active] = True

    def aggregate(self, n: int, round_idx: int, event: int, base_weights: Tensor
                  ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Close layer n's periods: (the uploading child rows or None for all, their weights [C], the parents
        that received any upload or None for all)."""
        self._refresh()
        M = self.h.nodes_per_layer
        pidx = self._pidx[n - 1]
        if self.trivial:
            self.clock.aggregate(n, torch.ones(M[n - 1], dtype=torch.bool))
            self.uploads[n - 1] += M[n - 1]
            return None, base_weights, None
        cand = self.selected[n - 1] & self.contributed[n - 1]
        if n == 2 and bool(self.down.any()):
            cand &= ~self.down
        ready = self.clock.ready(n)
        lost = torch.zeros_like(cand)
        waited = None
        deadline = self.clock.deadlines[n - 1]
        if deadline is not None:
            late = cand & (ready > deadline)
            lost |= late
            waited = torch.zeros(M[n], dtype=torch.float64)
            waited[pidx[late]] = deadline
        policy = self.participation[n - 1]
        if policy.over_select > 0:  # keep the first k to finish
            live = cand & ~lost
            rank = rank_within_parent(pidx, torch.where(live, ready, torch.full_like(ready, math.inf)), M[n])
            lost |= live & (rank >= self.keep[n - 1][pidx])
        if n == 1 and self.availability is not None:
            start = self.clock.node_now(0) - self.clock.busy[0]
            finish = start + ready
            lost |= cand & self.availability.drops(start, finish,
                                                   generator(self.seed, Stream.DROPOUT, round_idx, event))
        if n == 1 and self.mid_period:  # devices that moved during the period: their upload is lost
            g = generator(self.seed, Stream.MOBILITY, round_idx, event, 1)
            self.movers = cand & (torch.rand(cand.shape, generator=g, dtype=torch.float64) < self.mid_period)
            lost |= self.movers
        uploads = cand & ~lost
        self.uploads[n - 1] += int(uploads.sum())
        self.dropped[n - 1] += int((cand & lost).sum())
        w = participation_weights(policy, base_weights, self.pi[n - 1].to(base_weights.device),
                                  uploads.to(base_weights.device), pidx.to(base_weights.device), M[n])
        self.clock.aggregate(n, uploads, waited)
        has = torch.zeros(M[n], dtype=torch.bool)
        has[pidx[uploads]] = True
        if n < self.N:
            self.contributed[n] |= has
        self.contributed[n - 1].fill_(False)
        return torch.nonzero(uploads).flatten(), w, has

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": [t.clone() for t in self.selected], "pi": [t.clone() for t in self.pi],
            "keep": [t.clone() for t in self.keep], "contributed": [t.clone() for t in self.contributed],
            "active": None if self.active is None else self.active.clone(), "begun": self._begun,
            "uploads": list(self.uploads), "dropped": list(self.dropped), "clock": self.clock.state_dict(),
            "down": self.down.clone(), "trivial": self.trivial,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.selected = [t.clone() for t in sd["selected"]]
        self.pi = [t.clone() for t in sd["pi"]]
        self.keep = [t.clone() for t in sd["keep"]]
        self.contributed = [t.clone() for t in sd["contributed"]]
        self.active = None if sd["active"] is None else sd["active"].clone()
        self._begun = int(sd["begun"])
        self.uploads, self.dropped = list(sd["uploads"]), list(sd["dropped"])
        self.clock.load_state_dict(sd["clock"])
        if "down" in sd:
            self.down = sd["down"].clone()
            self.trivial = bool(sd["trivial"])


def _run_rounds(hierarchy: Hierarchy, taus: Sequence[int], latency: Any, upload_bits: Sequence[int],
                participation: Sequence[Participation], availability: Availability | None,
                downlink_bits: Sequence[int] | None, rounds: int, seed: int) -> list[tuple[float, Tensor]]:
    """The engine's population and clock for ``rounds`` rounds, without training: (time, split) per round."""
    clock = SimulatedClock(hierarchy, latency, upload_bits, downlink_bits)
    pop = Population(hierarchy, taus, participation, availability, clock, seed)
    steps = math.prod(taus)
    period = [math.prod(taus[:n]) for n in range(1, hierarchy.num_layers + 1)]
    base = [hierarchy.aggregation_weights(n) for n in range(1, hierarchy.num_layers + 1)]
    out, total = [], 0
    for r in range(rounds):
        events = [0] * hierarchy.num_layers
        for k in range(steps):
            pop.begin_step(r, k, total)
            pop.after_step()
            total += 1
            for n in range(1, hierarchy.num_layers + 1):
                if (k + 1) % period[n - 1]:
                    break
                pop.aggregate(n, r, events[n - 1], base[n - 1])
                events[n - 1] += 1
        out.append((clock.last_round_time, clock.last_split.clone()))
    return out


def simulate_round(hierarchy: Hierarchy, taus: Sequence[int], latency: Any, upload_bits: Sequence[int],
                   participation: Sequence[Participation], availability: Availability | None = None,
                   downlink_bits: Sequence[int] | None = None, seed: int = 0) -> tuple[float, Tensor]:
    """One global round of the engine's clock: (seconds, split [N + 1]: computation, each layer's links)."""
    return _run_rounds(hierarchy, taus, latency, upload_bits, participation, availability, downlink_bits, 1,
                       seed)[0]


def estimate_round_time(hierarchy: Hierarchy, taus: Sequence[int], latency: Any, upload_bits: Sequence[int],
                        participation: Sequence[Participation], availability: Availability | None = None,
                        downlink_bits: Sequence[int] | None = None, rounds: int = 16, seed: int = 0
                        ) -> tuple[float, float]:
    """The expected simulated time of one global round under participation, availability and heterogeneity,
    by running the engine's own population and clock (no training) for ``rounds`` rounds: (mean, sample std)."""
    times = torch.tensor([t for t, _ in _run_rounds(hierarchy, taus, latency, upload_bits, participation,
                                                    availability, downlink_bits, rounds, seed)], dtype=torch.float64)
    return float(times.mean()), float(times.std()) if rounds > 1 else 0.0
