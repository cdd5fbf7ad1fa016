"""The constants of Theorem 1, measured on the run instead of assumed (docs/algorithm.md#measured-constants).

Eq. 15 and the rate need the smoothness L (Assumption 2), the variance sigma^2 of a device's mini-batch gradient
(Assumption 3) and the quantizers' variance bounds q_n (Assumption 1); nobody knows them for a neural network.
These estimators read them off gradients the simulation can compute cheaply for a few sampled devices, all at one
point (the cloud model w at the start of a round), each device on its own mini-batch xi_i of B examples split into
two halves a and b:

* **sigma^2** (the mini-batch gradient's variance, as Assumption 3 states it): for a loss that averages over the
  batch and i.i.d. examples, ``g_i = (g_a + g_b) / 2`` and ``E ||g_a - g_b||^2 = 4 E ||g_i - grad F_i(w)||^2``, so
  ``||g_a - g_b||^2 / 4`` is an unbiased estimate per device; averaged over the sampled devices.
* **L along the path**: ``||g_i(w') - g_i(w)|| / ||w' - w||`` on the same batch, with ``w' = w - lr g_i(w)`` the point
  the device's next SGD step reaches. A local, directional estimate: it is a lower bound of the global L of
  Assumption 2, which is a supremum over all pairs of points; the largest value over the sampled devices and over
  the rounds so far is what the tools use.
* **heterogeneity zeta^2** (the spread of the devices' full gradients at one point,
  ``(1/K) sum_i ||grad F_i(w) - grad F(w)||^2``): the sample spread ``S = (1/k) sum_i ||g_i - mean g||^2`` of k
  sampled devices has expectation ``(k - 1)/k (zeta^2 + sigma^2)`` under uniform sampling, so
  ``k/(k-1) S - sigma^2`` is unbiased (it can come out slightly below 0 when the devices barely differ). ``spread`` is
  S itself.
* **q_n realised**: ``||C(x) - x||^2 / ||x||^2`` of layer n's uploads
  (:class:`~lightning_qmlhfl.simulation.stages.MeasureCompression`), against the compressor's bound.

All of this is **ours** (the paper assumes the constants). :class:`MeasuredConstants` is what a run reports (in
``summary.json``) and what the tools take (:func:`lightning_qmlhfl.theory.convergence.lr_headroom`,
``python -m recipes.plan calibrate_from=RUN_DIR``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .. import checks
from ..options import ConfigOption, Family, from_spec

__all__ = ["MeasureConstants", "MeasuredConstants", "make_measure_constants", "minibatch_variance",
           "path_smoothness", "heterogeneity", "relative_error", "summarize"]


class MeasureConstants(ConfigOption):
    """Measure the constants of Theorem 1 during training (``SimulationConfig.theory``).

    ``rows``: how many devices are sampled at each measurement (>= 2; the heterogeneity needs two); ``every``:
    measure at the first local step of every ``every``-th global round; ``warn``: a
    :class:`~lightning_qmlhfl.theory.LearningRateWarning` (once) when the learning rate violates Eq. 15 with the
    measured L and q_n; ``adapt_lr``: None, or a safety factor s in (0, 1]: every local step uses
    ``min(lr, s * mu*)`` with mu* the largest learning rate Eq. 15 admits at the measured constants (the adaptive
    step size; the optimizer's own schedule stays the upper bound)."""

    config_name = "measure"
    config_options = ("rows", "every", "warn", "adapt_lr")

    def __init__(self, rows: int = 8, every: int = 1, warn: bool = True, adapt_lr: float | None = None) -> None:
        self.rows = checks.integer(rows, "theory rows (devices sampled per measurement)", 2)
        self.every = checks.integer(every, "theory every (rounds between measurements)", 1)
        self.warn = checks.instance(warn, "theory warn", bool)
        self.adapt_lr = checks.real(adapt_lr, "theory adapt_lr (safety factor of the adaptive step size)", 0.0, 1.0,
                                    low_open=True, allow_none=True)


_FAMILY = Family(MeasureConstants, {"measure": MeasureConstants}, "measure", "theory option",
                 "the constants' measurement")


def make_measure_constants(spec: Any) -> MeasureConstants | None:
    """``SimulationConfig.theory`` from a config value: None or "none" (do not measure), "measure", a dict
    ``{"name": "measure", "rows": ..., ...}`` or a :class:`MeasureConstants`."""
    name = spec.get("name") if hasattr(spec, "items") else spec  # type: ignore[union-attr]
    if spec is None or (isinstance(name, str) and name.lower() == "none"):
        if hasattr(spec, "items") and set(spec) - {"name"}:  # type: ignore[arg-type]
            raise ValueError(f"theory {spec!r}: 'none' takes no options")
        return None
    if isinstance(spec, (dict, str, MeasureConstants)) or hasattr(spec, "items"):
        return from_spec(spec, _FAMILY)
    raise ValueError(f"theory must be None, 'none', 'measure', a dict of MeasureConstants' options or a "
                     f"MeasureConstants, got {spec!r}")


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def minibatch_variance(g_a: Tensor, g_b: Tensor) -> Tensor:
    """Per row, ``||g_a - g_b||^2 / 4``: the unbiased estimate of the variance of the mean of the two half-batch
    gradients (module docstring). ``g_a``, ``g_b``: [rows, P]."""
    return (_flat(g_a) - _flat(g_b)).pow(2).sum(1) / 4.0


def path_smoothness(g0: Tensor, g1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """Per row, ``||g1 - g0|| / ||w1 - w0||`` (NaN where the points coincide)."""
    dw = (_flat(w1) - _flat(w0)).norm(dim=1)
    dg = (_flat(g1) - _flat(g0)).norm(dim=1)
    return torch.where(dw > 0, dg / dw, torch.full_like(dw, math.nan))


def heterogeneity(g: Tensor, sigma2: float) -> tuple[float, float]:
    """(spread S, unbiased zeta^2 = k/(k-1) S - sigma^2) of the rows of ``g`` [k, P], k >= 2 (module docstring)."""
    g = _flat(g)
    k = g.shape[0]
    if k < 2:
        raise ValueError(f"the heterogeneity needs at least 2 devices' gradients, got {k}")
    spread = float((g - g.mean(0, keepdim=True)).pow(2).sum(1).mean())
    return spread, k / (k - 1) * spread - float(sigma2)


def relative_error(x: Tensor, cx: Tensor) -> Tensor:
    """Per row, ``||C(x) - x||^2 / ||x||^2`` (rows with x = 0 are NaN)."""
    x64 = _flat(x)
    energy = x64.pow(2).sum(1)
    err = (_flat(cx) - x64).pow(2).sum(1)
    return torch.where(energy > 0, err / energy, torch.full_like(energy, math.nan))


@dataclass(frozen=True)
class MeasuredConstants:
    """The constants a run measured (``summary.json``'s ``theory`` block).

    ``L``: the largest path smoothness over the sampled devices and rounds; ``L_median``: the median over rounds of
    each round's largest; ``sigma2``, ``heterogeneity``, ``spread``: medians over rounds; ``q``: per layer the median
    realised compression error (None: no upload of that layer was measured); ``q_bound``: the compressors' bounds;
    ``upload_norm``: per layer the median norm of the uploads; ``rounds``: how many rounds were measured."""

    L: float
    L_median: float
    sigma2: float
    heterogeneity: float
    spread: float
    q: tuple[float | None, ...]
    q_bound: tuple[float, ...]
    upload_norm: tuple[float | None, ...]
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (NaN, a constant never measured, as None)."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return None if isinstance(v, float) and math.isnan(v) else v
        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeasuredConstants":
        missing = [f for f in ("L", "L_median", "sigma2", "heterogeneity", "spread", "q", "q_bound", "upload_norm",
                               "rounds") if f not in d]
        if missing:
            raise ValueError(f"measured constants lack {missing}: was the run made with theory=measure?")
        def num(v: Any) -> float:
            return math.nan if v is None else float(v)
        return cls(num(d["L"]), num(d["L_median"]), num(d["sigma2"]), num(d["heterogeneity"]), num(d["spread"]), tuple(None if v is None else float(v) for v in d["q"]),
                   tuple(float(v) for v in d["q_bound"]),
                   tuple(None if v is None else float(v) for v in d["upload_norm"]), int(d["rounds"]))

    @classmethod
    def from_run(cls, run: str | Path) -> "MeasuredConstants":
        """From a run directory (or its ``summary.json``): the pilot run of ``recipes.plan calibrate_from=``."""
        path = Path(run)
        if path.is_dir():
            path = path / "summary.json"
        if not path.is_file():
            raise ValueError(f"calibrate_from={str(run)!r}: no summary.json there (give a run directory of "
                             f"python -m recipes.mnist ... theory=measure)")
        summary = json.loads(path.read_text())
        block = summary.get("theory")
        if not block:
            raise ValueError(f"{path} has no measured constants: run the pilot with theory=measure")
        return cls.from_dict(block)

    def qs(self) -> list[float]:
        """q_n per layer for Eq. 15: the measured value, or the bound where a layer was not measured."""
        return [b if q is None else q for q, b in zip(self.q, self.q_bound)]


def summarize(records: Sequence[Mapping[str, float]], q_bound: Sequence[float]) -> MeasuredConstants | None:
    """:class:`MeasuredConstants` from the per-round measurements (``theory/*`` values without the prefix), or None
    when nothing was measured."""
    rows = [r for r in records if "L_max" in r and math.isfinite(r["L_max"])]
    if not rows:
        return None

    def median(key: str) -> float | None:
        vals = sorted(float(r[key]) for r in records if key in r and math.isfinite(float(r[key])))
        return None if not vals else float(torch.tensor(vals, dtype=torch.float64).median())

    def value(key: str) -> float:  # NaN: never measured (e.g. batches of one example have no variance estimate)
        v = median(key)
        return math.nan if v is None else v

    N = len(q_bound)
    return MeasuredConstants(
        L=max(float(r["L_max"]) for r in rows), L_median=value("L_max"),
        sigma2=value("sigma2"), heterogeneity=value("heterogeneity"), spread=value("spread"),
        q=tuple(median(f"compression_error_layer{n}") for n in range(1, N + 1)), q_bound=tuple(map(float, q_bound)),
        upload_norm=tuple(median(f"upload_norm_layer{n}") for n in range(1, N + 1)), rounds=len(rows))
