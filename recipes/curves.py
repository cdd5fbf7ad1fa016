"""Accuracy curves of a setting: every seed's curve against round, simulated time or bits, aligned or interpolated
onto common knots, and their mean with a band over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np

from recipes.runs import Run

__all__ = ["BANDS", "X_AXES", "Curve", "aggregate_curve", "align_rounds", "interpolate_common", "record_x",
           "run_curve"]

X_AXES: tuple[str, ...] = ("round", "sim_time", "bits")
BANDS: tuple[str, ...] = ("std", "minmax")
_BITS_PER_MB = 8e6


@dataclass
class Curve:
    """The mean accuracy curve (fractions) of one setting over its seeds, with its band ``lo``..``hi``."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int


def run_curve(run: Run, x: str) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated points of one run: x (round, simulated s, or cumulative MB sent) and test accuracy, sorted by x.

    Records without ``test_acc`` (or without the x value) are skipped; of several records at the same x the last
    one is kept, so x is strictly increasing.
    """
    if x not in X_AXES:
        raise ValueError(f"x axis must be one of {X_AXES}, got {x!r}")
    points: dict[float, float] = {}
    for rec in run.history:
        if rec.get("test_acc") is None:
            continue
        xv = record_x(rec, x)
        if xv is not None:
            points[xv] = float(rec["test_acc"])
    xs = np.array(sorted(points), dtype=float)
    return xs, np.array([points[v] for v in xs], dtype=float)


def interpolate_common(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Put curves with different x grids onto one grid with linear interpolation (``np.interp``).

    The grid is the union of all curves' x values inside ``[max of the starts, min of the ends]``, the range every
    curve covers, so no curve is extrapolated. Returns ``(grid, ys)`` with ``ys[i]`` curve i on the grid, or None if
    some curve is empty or the ranges do not overlap.
    """
    if not curves or any(len(xs) == 0 for xs, _ in curves):
        return None
    lo = max(float(xs[0]) for xs, _ in curves)
    hi = min(float(xs[-1]) for xs, _ in curves)
    if lo > hi:
        return None
    knots = np.concatenate([np.asarray(xs, dtype=float) for xs, _ in curves] + [np.array([lo, hi])])
    grid = np.unique(knots[(knots >= lo) & (knots <= hi)])
    ys = np.stack([np.interp(grid, xs, y) for xs, y in curves])
    return grid, ys


def align_rounds(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Keep the rounds every curve evaluated: ``(rounds, ys)``, or None if there are none in common."""
    if not curves:
        return None
    common = set(curves[0][0].tolist())
    for xs, _ in curves[1:]:
        common &= set(xs.tolist())
    if not common:
        return None
    grid = np.array(sorted(common), dtype=float)
    ys = np.stack([y[np.searchsorted(xs, grid)] for xs, y in curves])
    return grid, ys


def aggregate_curve(runs: Sequence[Run], x: str, band: str = "std") -> Curve | None:
    """Mean over seeds of the runs' accuracy curves against ``x``, with a ± 1 sample std or min-max band.

    None if the seeds share no evaluated round (``x="round"``) or no x range (``sim_time``, ``bits``).
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    curves = [run_curve(r, x) for r in runs]
    aligned = align_rounds(curves) if x == "round" else interpolate_common(curves)
    if aligned is None:
        return None
    grid, ys = aligned
    mean = ys.mean(axis=0)
    if band == "minmax":
        lo, hi = ys.min(axis=0), ys.max(axis=0)
    elif len(ys) >= 2:
        std = ys.std(axis=0, ddof=1)
        lo, hi = mean - std, mean + std
    else:
        lo, hi = mean.copy(), mean.copy()
    return Curve(x=grid, mean=mean, lo=lo, hi=hi, n=len(ys))


def record_x(rec: Mapping[str, Any], x: str) -> float | None:
    """The x value of a history record (bits in MB); a round-0 record without it sits at 0."""
    if x == "round":
        return float(rec["round"])
    key = "sim_time" if x == "sim_time" else "bits_total"
    value = rec.get(key)
    if value is None:
        return 0.0 if rec["round"] == 0 else None
    return float(value) / _BITS_PER_MB if x == "bits" else float(value)
