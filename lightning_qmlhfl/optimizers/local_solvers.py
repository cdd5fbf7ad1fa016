"""Local solvers beyond local SGD, at any aggregation layer: FedProx, SCAFFOLD and ADMM (docs/algorithm.md#local-solvers).

A local solver at layer n acts between the children (layer n-1: devices when n = 1) and their parent (layer n): it
corrects how a child moves away from its parent's model during the layer-n period, and what it uploads. What each
one is (the equations with their multi-layer form are in the algorithm page):

- ``LocalSGD()``: nothing added, the paper's algorithm (the default; ``LocalSGD(drift=True)`` only measures the
  drift).
- ``FedProx(mu)`` (Li et al., MLSys 2020): the proximal term (mu/2)||w - a||^2 towards the anchor a, the parent's
  model during the child's period; its gradient mu (w - a) joins every local step of every device below the child
  (the child itself at layer 1). ``FedProx(0)`` is local SGD bit for bit.
- ``Scaffold(variates="compressed" | "full")`` (Karimireddy et al., ICML 2020, option II of their Algorithm 1):
  control variates c per child and per parent; the steps below a child are corrected by c_parent - c_child; at the
  layer-n aggregation the child's new variate is c_child - c_parent + (a - y) / S (S: the sum of the learning
  rates over its period) and the parent's variate moves by the weighted sum of the deltas. The deltas are uploaded
  beside the model difference, compressed with the layer's compressor (``"compressed"``, the default) or as
  32-bit floats (``"full"``): the bits of every upload count them.
- ``ADMM(rho)`` (FedADMM: Gong, Li and Freris, "FedADMM: A Robust Federated Deep Learning Framework with
  Adaptivity to System Heterogeneity", ICDE 2022): a dual variable lambda per child; the child minimises the
  augmented Lagrangian f(w) + <lambda, w - a> + (rho/2)||w - a||^2; at the aggregation lambda <- lambda +
  rho (y - a) and the child uploads the change of its augmented model u = y + lambda / rho since its last upload;
  the parent adds the weighted sum of those changes (children that stay away keep their duals and their share).
  ADMM above ADMM is the multi-block form: the lower layer's node models are updated in closed form.

These classes are the options and their bookkeeping (what state rows a layer keeps, how many extra values an
upload carries); the arithmetic on the stacked rows is in :mod:`lightning_qmlhfl.simulation.solver_stages`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from .. import checks
from ..options import Family, from_spec, per_layer

__all__ = ["LocalSolver", "LocalSGD", "FedProx", "Scaffold", "ADMM", "LOCAL_SOLVERS", "make_local_solver",
           "layer_local_solvers"]


class LocalSolver:
    """Interface (module docstring). ``config_name``: the name :func:`make_local_solver` takes;
    ``config_options``: its constructor's options."""

    config_name = ""
    config_options: tuple[str, ...] = ()

    @property
    def is_plain(self) -> bool:
        """True when the solver changes nothing the run computes (local SGD, FedProx with mu = 0)."""
        return False

    @property
    def measures_drift(self) -> bool:
        """Whether the mean ||y_c - a_c|| of the layer's uploads is measured and logged (``drift_layer{n}``)."""
        return True

    def upload_values_factor(self, compressed: bool) -> int:
        """Extra uploads per sender, in units of one model upload: ``compressed`` asks for those sent with the
        layer's compressor, else those sent as 32-bit floats (SCAFFOLD's variate deltas)."""
        return 0

    def to_config(self) -> dict[str, Any]:
        """Plain data that :func:`make_local_solver` rebuilds this solver from (what checkpoints store)."""
        return {"name": self.config_name, **{k: getattr(self, k) for k in self.config_options}}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.config_options)
        return f"{type(self).__name__}({opts})"


def _nonneg(value: object, what: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < 0 or (positive and float(value) == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class LocalSGD(LocalSolver):
    """The paper's local SGD: nothing added. ``drift=True`` measures and logs the drift all the same (to compare
    with the other solvers)."""

    config_name = "fedavg"
    config_options = ("drift",)

    def __init__(self, drift: bool = False) -> None:
        self.drift = bool(checks.instance(drift, "LocalSGD drift", bool))

    @property
    def is_plain(self) -> bool:
        return True

    @property
    def measures_drift(self) -> bool:
        return self.drift


class FedProx(LocalSolver):
    """The proximal term (mu/2)||w - a||^2 (module docstring)."""

    config_name = "fedprox"
    config_options = ("mu",)

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = _nonneg(mu, "FedProx mu")

    @property
    def is_plain(self) -> bool:
        return self.mu == 0.0


VARIATES = ("compressed", "full")


class Scaffold(LocalSolver):
    """SCAFFOLD's control variates, option II (module docstring)."""

    config_name = "scaffold"
    config_options = ("variates",)

    def __init__(self, variates: str = "compressed") -> None:
        self.variates = checks.choice(variates, "Scaffold variates", VARIATES)

    def upload_values_factor(self, compressed: bool) -> int:
        return int(compressed == (self.variates == "compressed"))


class ADMM(LocalSolver):
    """FedADMM's duals and augmented models (module docstring)."""

    config_name = "admm"
    config_options = ("rho",)

    def __init__(self, rho: float = 0.1) -> None:
        self.rho = _nonneg(rho, "ADMM rho", positive=True)


LOCAL_SOLVERS: dict[str, type[LocalSolver]] = {"fedavg": LocalSGD, "localsgd": LocalSGD, "fedprox": FedProx,
                                               "scaffold": Scaffold, "admm": ADMM}


SOLVER_FAMILY = Family(LocalSolver, LOCAL_SOLVERS, "fedavg", "local solver", "a local solver")


def make_local_solver(spec: object) -> LocalSolver:
    """From a config value: an instance, ``None`` (local SGD), a name, or a dict with ``name`` and options
    (:func:`lightning_qmlhfl.options.from_spec`)."""
    return from_spec(spec, SOLVER_FAMILY)


def layer_local_solvers(names: Any, num_layers: int, **options: Any) -> list[LocalSolver]:
    """One local solver per layer n = 1..N from config values (the recipes' ``local_solver`` group): ``names`` one
    name or a list of N; every option (``mu``, ``rho``, ``variates``, ``drift``) one value or a list of N; each
    layer takes the options its solver has, ``None`` the solver's default."""
    return per_layer(names, num_layers, SOLVER_FAMILY, "local_solver",
                     split=lambda k, v: [v] * num_layers if v is None or isinstance(v, (str, bool))
                     or not isinstance(v, Sequence) else None, **options)
