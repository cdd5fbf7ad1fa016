"""The two searches of the deadline planner (:mod:`.planner`, whose docstring states the problem): the exact search
over the box of per-layer caps and the coordinate-ascent heuristic. A mixin of the planner's problem, which
provides ``N``, ``evaluate(grid)``, ``best_index(grid, objective)``, ``plan_for(taus, method)`` and
``infeasible(method)``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["TauSearch", "TIE"]

TIE = 1e-12  # relative objective difference below which two tau are tied
_CHUNK = 1 << 18  # tau values scored per vectorised batch of the exact search


class TauSearch:
    """``exact`` and ``heuristic`` over tau in [1, cap_1] x ... x [1, cap_N]."""

    N: int

    def exact(self, caps: list[int], limit: int) -> Any:
        size = math.prod(caps)
        if size > limit:
            raise ValueError(
                f"exact search over {' x '.join(map(str, caps))} = {size} tau values exceeds exact_limit={limit}; "
                f"use method='heuristic', a smaller tau_max, or a larger exact_limit"
            )
        best_obj, best_tau = -np.inf, None
        for start in range(0, size, _CHUNK):
            idx = np.arange(start, min(size, start + _CHUNK))
            grid = np.stack(np.unravel_index(idx, caps), axis=1).astype(np.int64) + 1
            ev = self.evaluate(grid)
            i = self.best_index(grid, ev["objective"])
            if i is None:
                continue
            if best_tau is None or self._better(ev["objective"][i], grid[i], best_obj, best_tau):
                best_obj, best_tau = ev["objective"][i], grid[i].copy()
        if best_tau is None:
            return self.infeasible("exact")
        return self.plan_for(best_tau.tolist(), "exact")

    def _better(self, obj: float, tau: np.ndarray, best_obj: float, best_tau: np.ndarray) -> bool:
        """The search order of :meth:`best_index` for two single candidates."""
        grid = np.stack([tau, best_tau])
        return self.best_index(grid, np.array([obj, best_obj])) == 0

    def heuristic(self, caps: list[int]) -> Any:
        N = self.N
        ones = np.ones(N, dtype=np.int64)
        if not self.evaluate(ones[None])["feasible"][0]:
            return self.infeasible("heuristic")
        starts = [ones]
        k_max = min(caps)
        if k_max >= 2:
            uni = np.repeat(np.arange(1, k_max + 1)[:, None], N, axis=1)
            i = self.best_index(uni, self.evaluate(uni)["objective"])
            if i is not None and i > 0:
                starts.append(uni[i])
        for n in range(N):  # the best tau with a single layer above 1
            line = np.ones((caps[n], N), dtype=np.int64)
            line[:, n] = np.arange(1, caps[n] + 1)
            i = self.best_index(line, self.evaluate(line)["objective"])
            if i is not None and i > 0:
                starts.append(line[i])
        best_tau, best_obj = None, -np.inf
        for s in starts:
            tau, obj = self._ascend(s.copy(), caps)
            if best_tau is None or self._better(obj, tau, best_obj, best_tau):
                best_tau, best_obj = tau, obj
        assert best_tau is not None
        return self.plan_for(best_tau.tolist(), "heuristic")

    def _ascend(self, tau: np.ndarray, caps: list[int]) -> tuple[np.ndarray, float]:
        """Coordinate ascent from a feasible tau; each stage runs only when the cheaper ones are stuck."""
        obj = float(self.evaluate(tau[None])["objective"][0])
        stages = (self._line_moves, self._pair_moves, self._cube_moves)
        while True:
            for stage in stages:
                cands = stage(tau, caps)
                if len(cands) == 0:
                    continue
                ev = self.evaluate(cands)["objective"]
                i = self.best_index(cands, ev)
                if i is not None and ev[i] > obj + abs(obj) * TIE:  # strictly better: the loop terminates
                    tau, obj = cands[i].copy(), float(ev[i])
                    break
            else:
                return tau, obj

    @staticmethod
    def _line_moves(tau: np.ndarray, caps: list[int]) -> np.ndarray:
        """(a) Every value of one tau_n, the others fixed."""
        rows = []
        for n in range(len(tau)):
            line = np.repeat(tau[None], caps[n], axis=0)
            line[:, n] = np.arange(1, caps[n] + 1)
            rows.append(line)
        return np.concatenate(rows)

    @staticmethod
    def _values(tau_n: int, cap: int, limit: int) -> np.ndarray:
        """All of 1..cap when there are at most ``limit``, else powers of 2 plus a window around tau_n."""
        if cap <= limit:
            return np.arange(1, cap + 1)
        v = {1, cap} | {2**k for k in range(cap.bit_length()) if 2**k <= cap}
        v |= {t for t in range(tau_n - limit // 4, tau_n + limit // 4 + 1) if 1 <= t <= cap}
        return np.array(sorted(v))

    def _pair_moves(self, tau: np.ndarray, caps: list[int]) -> np.ndarray:
        """(b) Every (tau_i, tau_j) on a grid over [1, cap_i] x [1, cap_j] (thinned beyond 48 values), others fixed."""
        N = len(tau)
        rows = []
        for i in range(N):
            vi = self._values(int(tau[i]), caps[i], 48)
            for j in range(i + 1, N):
                vj = self._values(int(tau[j]), caps[j], 48)
                block = np.repeat(tau[None], len(vi) * len(vj), axis=0)
                block[:, i] = np.repeat(vi, len(vj))
                block[:, j] = np.tile(vj, len(vi))
                rows.append(block)
        return np.concatenate(rows) if rows else np.empty((0, N), dtype=np.int64)

    @staticmethod
    def _cube_moves(tau: np.ndarray, caps: list[int], limit: int = 3**9) -> np.ndarray:
        """(c) tau + delta for every delta in {-1, 0, 1}^N (N <= 9), clipped to the box."""
        N = len(tau)
        if 3**N > limit:
            return np.empty((0, N), dtype=np.int64)
        deltas = np.stack(np.unravel_index(np.arange(3**N), (3,) * N), axis=1) - 1
        cand = tau[None] + deltas
        ok = (cand >= 1).all(axis=1) & (cand <= np.asarray(caps)[None]).all(axis=1)
        return cand[ok]
