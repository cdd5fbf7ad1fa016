"""Adaptive intra-layer counts tau_n (``SimulationConfig.tau_schedule``; docs/algorithm.md#adaptive-tau).

The paper fixes tau; a schedule changes one layer's tau_n between global rounds, from what the run has seen so far.
Two rules, both over one layer n at a time, every ``every`` global rounds, within ``[tau_min, tau_max]`` (bounds
the user sets; the rule's value outside them is reported in ``tau_wanted_layer{n}``, not hidden):

* :class:`LossRatioTau`: the rule of Hier-Local-QSGD's adaptive algorithm (Liu, Zhang, Song, Letaief,
  "Hierarchical Federated Learning with Quantization: Convergence Analysis and System Design", IEEE TWC 2022,
  arXiv:2103.14272; its public code, ``ajust_interval``), itself AdaComm's (Wang & Joshi, "Adaptive Communication
  Strategies to Achieve the Best Error-Runtime Trade-off in Local-Update SGD", MLSys 2019):
  ``tau_n = ceil(tau_n(0) * sqrt(F_t / F_0 * mu_0 / mu_t))``: fewer local steps between aggregations as the loss
  falls (less drift near a stationary point), more when the learning rate decays. F is the training loss; here the
  mean of the training devices' mini-batch losses over the last global round (F_0: over the first), not a separate
  pass over all training data as in their code.
* :class:`Eq15Tau` (**ours**, built on the measured constants of :mod:`.measured`): the largest tau_n for which the
  current learning rate keeps Eq. 15's headroom ``mu*/mu >= 1 / safety`` at the measured L and q_n, the other tau
  as they are: where the adaptive step size (``theory.adapt_lr``) lowers mu to fit Eq. 15, this rule keeps mu and
  shortens (or lengthens) the period instead. It needs ``theory=measure``.

The current tau are checkpointed state (``tau_schedule``) and logged per round (``tau_layer{n}``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .. import checks
from ..hierarchy import Hierarchy
from ..options import ConfigOption, Family, from_spec
from .convergence import lr_condition_bracket

__all__ = ["TauSchedule", "LossRatioTau", "Eq15Tau", "make_tau_schedule", "loss_ratio_tau", "eq15_tau"]


def loss_ratio_tau(tau0: int, loss0: float, loss: float, lr0: float, lr: float) -> int:
    """``ceil(tau0 * sqrt(loss / loss0 * lr0 / lr))`` (module docstring), at least 1."""
    if not (loss0 > 0 and lr > 0 and lr0 > 0) or not math.isfinite(loss):
        raise ValueError(f"loss-ratio rule needs loss0 > 0, lr0 > 0, lr > 0 and a finite loss; got loss0={loss0!r}, "
                         f"loss={loss!r}, lr0={lr0!r}, lr={lr!r}")
    return max(1, math.ceil(tau0 * math.sqrt(max(loss, 0.0) / loss0 * lr0 / lr)))


def eq15_tau(taus: Sequence[int], layer: int, L: float, lr: float, qs: Sequence[float],
             hierarchy: Hierarchy | Sequence[int] | None, safety: float, tau_max: int) -> int:
    """The largest tau_layer in [1, tau_max] with ``L * lr * sqrt(bracket) <= safety`` (the others fixed); 1 when
    even tau_layer = 1 misses it (the bracket grows with every tau_n, so the search is monotone)."""
    best = 1
    t = list(taus)
    for tau in range(1, int(tau_max) + 1):
        t[layer - 1] = tau
        if L * lr * math.sqrt(lr_condition_bracket(t, qs, hierarchy)) > safety:
            break
        best = tau
    return best


class TauSchedule(ConfigOption):
    """A rule that sets one layer's tau between global rounds (module docstring)."""

    needs_measurements = False

    def __init__(self, layer: int = 1, every: int = 1, tau_min: int = 1, tau_max: int = 64) -> None:
        self.layer = checks.integer(layer, "tau_schedule layer (the tau_n it adapts)", 1)
        self.every = checks.integer(every, "tau_schedule every (global rounds between adjustments)", 1)
        self.tau_min = checks.integer(tau_min, "tau_schedule tau_min", 1)
        self.tau_max = checks.integer(tau_max, "tau_schedule tau_max", 1)
        if self.tau_max < self.tau_min:
            raise ValueError(f"tau_schedule tau_max={tau_max} is below tau_min={tau_min}")

    def check(self, num_layers: int) -> None:
        if self.layer > num_layers:
            raise ValueError(f"tau_schedule layer={self.layer}: the hierarchy has N = {num_layers} layers (1..{num_layers})")


class LossRatioTau(TauSchedule):
    """Hier-Local-QSGD's loss-ratio rule (module docstring)."""

    config_name = "loss_ratio"
    config_options = ("layer", "every", "tau_min", "tau_max")


class Eq15Tau(TauSchedule):
    """The largest tau_n that keeps Eq. 15's headroom at the measured constants (module docstring); ``safety`` in
    (0, 1]: the step size stays at most ``safety * mu*``."""

    config_name = "eq15"
    config_options = ("layer", "every", "tau_min", "tau_max", "safety")
    needs_measurements = True

    def __init__(self, layer: int = 1, every: int = 1, tau_min: int = 1, tau_max: int = 64,
                 safety: float = 0.5) -> None:
        super().__init__(layer, every, tau_min, tau_max)
        self.safety = checks.real(safety, "tau_schedule safety", 0.0, 1.0, low_open=True)


_FAMILY = Family(TauSchedule, {"loss_ratio": LossRatioTau, "eq15": Eq15Tau}, "loss_ratio", "tau schedule",
                 "a tau schedule")


def make_tau_schedule(spec: Any) -> TauSchedule | None:
    """``SimulationConfig.tau_schedule`` from a config value: None or "fixed" (the paper's fixed tau), a name
    ("loss_ratio", "eq15"), a dict with a name and options, or a :class:`TauSchedule`."""
    name = spec.get("name") if hasattr(spec, "items") else spec  # type: ignore[union-attr]
    if spec is None or (isinstance(name, str) and name.lower() == "fixed"):
        if hasattr(spec, "items") and set(spec) - {"name"}:  # type: ignore[arg-type]
            raise ValueError(f"tau_schedule {spec!r}: 'fixed' takes no options")
        return None
    if isinstance(spec, (str, TauSchedule)) or hasattr(spec, "items"):
        return from_spec(spec, _FAMILY)
    raise ValueError(f"tau_schedule must be None, 'fixed', 'loss_ratio', 'eq15', a dict with a name and options or a "
                     f"TauSchedule, got {spec!r}")
