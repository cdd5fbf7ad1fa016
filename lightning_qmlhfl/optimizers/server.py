"""Server-side optimizers at every aggregation layer (Reddi et al., "Adaptive Federated Optimization", 2020;
Hsu et al., 2019 for FedAvgM; hierarchical use as in HierMo, 2022).

At an aggregation of layer n, node p receives the pseudo-gradient

    Delta_p = sum_c w_c * C_n(v_c - v_p)          (what Eq. 4 adds to v_p today)

and its server optimizer turns it into the update of v_p, with state of its own: one row per aggregating node,
stacked like the models ([M_n, P] per state tensor), checkpointed, never sent. The rules (u is the second moment):

- ``Average()``: v <- v + Delta (Eq. 4/6 as the paper has it; the default, bit for bit the earlier runs).
- ``FedAvgM(lr, momentum)`` (Hsu et al. 2019): m <- beta m + Delta; v <- v + lr m.
- ``FedAdam(lr, betas, tau)``: m <- b1 m + (1 - b1) Delta; u <- b2 u + (1 - b2) Delta^2; v <- v + lr m / (sqrt(u) + tau).
- ``FedYogi(lr, betas, tau)``: as FedAdam with u <- u - (1 - b2) Delta^2 sign(u - Delta^2).
- ``FedAdagrad(lr, betas, tau)``: as FedAdam with u <- u + Delta^2 (b2 unused).

The adaptive rules start from m = 0 and u = tau^2 (Reddi et al.: v_{-1} >= tau^2) and, with
``bias_correction=True``, use m / (1 - b1^t) and u / (1 - b2^t) (Adam's correction; t = the node's number of
updates; FedAdagrad corrects m only).

How the state behaves (the project's choices):

- Re-synchronisation: when an ancestor's aggregation re-synchronises the node (Eq. 5) its model v_p is replaced,
  its optimizer state is kept, as every device keeps its own optimizer state across aggregations: it is the
  node's memory of its past pseudo-gradients. Its own aggregation re-synchronises its subtree after its update.
- No uploads: a node whose children all stayed away (partial participation) does not step: v_p and its state are
  left as they are (a zero pseudo-gradient would still move v_p by the momentum).
- A changing tree: the state belongs to the aggregating node, whichever children it has.
- Float buffers (BatchNorm statistics) are always averaged (Eq. 4 without compression), never optimized.

The paper's convergence theory (Eq. 15) and the planner cover ``Average()`` only.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

from ..options import Family, from_spec, per_layer

__all__ = ["ServerOptimizer", "Average", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "make_server_optimizer",
           "layer_server_optimizers", "validate_server_optimizers", "adaptive_update_"]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _lr(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) <= 0:
        raise ValueError(f"server learning rate lr must be a finite number > 0, got {value!r}")
    return float(value)


def _beta(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


class ServerOptimizer(ABC):
    """Interface: the update of one layer's node models from their pseudo-gradients (module docstring)."""

    state_names: tuple[str, ...] = ()
    config_name: str  # the name make_server_optimizer takes
    config_options: tuple[str, ...] = ()  # its constructor's options

    @property
    def is_average(self) -> bool:
        return False

    def to_config(self) -> dict[str, Any]:
        """Plain data that :func:`make_server_optimizer` rebuilds this optimizer from (what checkpoints store)."""
        return {"name": self.config_name, **{k: _plain(getattr(self, k)) for k in self.config_options}}

    def init_state(self, rows: int, num_params: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """The state of ``rows`` nodes: the tensors of :attr:`state_names` [rows, P] and the update counts ``t``
        (int64 [rows])."""
        state = {name: torch.zeros(rows, num_params, dtype=dtype, device=device) for name in self.state_names}
        state["t"] = torch.zeros(rows, dtype=torch.int64, device=device)
        return state

    @torch.no_grad()
    def step_(self, v: Tensor, delta: Tensor, state: dict[str, Tensor], active: Tensor | None = None) -> None:
        """Update the node models ``v`` [M, P] in place from the pseudo-gradients ``delta`` [M, P]; ``active``
        (bool [M]): the nodes that received at least one upload (default: all); the others are left as they are."""
        if active is None or bool(active.all()):
            state["t"] += 1
            self._update_(v, delta, state, state["t"])
            return
        rows = active.nonzero().flatten()
        if rows.numel() == 0:
            return
        sub = {k: t[rows] for k, t in state.items()}
        sub["t"] += 1
        vr = v[rows]
        self._update_(vr, delta[rows], sub, sub["t"])
        v[rows] = vr
        for k, t in sub.items():
            state[k][rows] = t

    @abstractmethod
    def _update_(self, v: Tensor, delta: Tensor, state: dict[str, Tensor], t: Tensor) -> None:
        """The rule, in place on v and the state (all rows step)."""

    def _options(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._options())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class Average(ServerOptimizer):
    """v <- v + Delta: the paper's Eq. 4/6 (the engine adds the aggregate in its fused kernel)."""

    config_name = "average"

    @property
    def is_average(self) -> bool:
        return True

    def _update_(self, v: Tensor, delta: Tensor, state: dict[str, Tensor], t: Tensor) -> None:
        v.add_(delta)


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): m <- momentum m + Delta; v <- v + lr m."""

    state_names = ("m",)
    config_name = "fedavgm"
    config_options = ("lr", "momentum")

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr = _lr(lr)
        self.momentum = _beta(momentum, "FedAvgM momentum")

    def _update_(self, v: Tensor, delta: Tensor, state: dict[str, Tensor], t: Tensor) -> None:
        m = state["m"]
        m.mul_(self.momentum).add_(delta)
        v.add_(m, alpha=self.lr)

    def _options(self) -> list[str]:
        return [f"lr={self.lr}", f"momentum={self.momentum}"]


def adaptive_update_(v: Tensor, m: Tensor, u: Tensor, delta: Tensor, lr: float, beta1: float, beta2: float,
                     tau: float, rule: str, t: Tensor | None = None, bias_correction: bool = False) -> None:
    """One adaptive server step in place (Reddi et al. 2020, Algorithm 2): ``rule`` "adam", "yogi" or "adagrad";
    m <- b1 m + (1 - b1) Delta, u by the rule, v <- v + lr m^ / (sqrt(u^) + tau), with ``t`` [rows] the update counts
    for the bias correction. A pure function of its arguments (tau = 0 is allowed here, for tests of the rule)."""
    m.mul_(beta1).add_(delta, alpha=1 - beta1)
    sq = delta * delta
    if rule == "adam":
        u.mul_(beta2).add_(sq, alpha=1 - beta2)
    elif rule == "yogi":
        u.sub_(torch.sign(u - sq).mul_(sq), alpha=1 - beta2)
    elif rule == "adagrad":
        u.add_(sq)
    else:
        raise ValueError(f"rule must be 'adam', 'yogi' or 'adagrad', got {rule!r}")
    mh, uh = m, u
    if bias_correction:
        assert t is not None
        tt = t.to(m.dtype).view(-1, *([1] * (m.dim() - 1)))
        mh = m / (1 - beta1**tt)
        if rule != "adagrad":
            uh = u / (1 - beta2**tt)
    v.add_(mh / (uh.sqrt() + tau), alpha=lr)


class _Adaptive(ServerOptimizer):
    state_names = ("m", "u")
    rule = "adam"
    config_options = ("lr", "betas", "tau", "bias_correction")

    def __init__(self, lr: float = 0.01, betas: Sequence[float] = (0.9, 0.99), tau: float = 1e-3,
                 bias_correction: bool = False) -> None:
        self.lr = _lr(lr)
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"{type(self).__name__} betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_beta(betas[0], "beta1"), _beta(betas[1], "beta2"))
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(float(tau)) \
                or float(tau) <= 0:
            raise ValueError(f"{type(self).__name__} tau (the adaptivity floor) must be a number > 0, got {tau!r}")
        self.tau = float(tau)
        self.bias_correction = bool(bias_correction)

    def init_state(self, rows: int, num_params: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        state = super().init_state(rows, num_params, dtype, device)
        state["u"].fill_(self.tau**2)  # Reddi et al.: v_{-1} >= tau^2
        return state

    def _update_(self, v: Tensor, delta: Tensor, state: dict[str, Tensor], t: Tensor) -> None:
        adaptive_update_(v, state["m"], state["u"], delta, self.lr, self.betas[0], self.betas[1], self.tau,
                         self.rule, t, self.bias_correction)

    def _options(self) -> list[str]:
        opts = [f"lr={self.lr}", f"betas={self.betas}", f"tau={self.tau}"]
        return opts + (["bias_correction=True"] if self.bias_correction else [])


class FedAdam(_Adaptive):
    """Adam at the server: u <- b2 u + (1 - b2) Delta^2."""

    rule = "adam"
    config_name = "fedadam"


class FedYogi(_Adaptive):
    """Yogi at the server: u <- u - (1 - b2) Delta^2 sign(u - Delta^2) (never negative from u >= 0)."""

    rule = "yogi"
    config_name = "fedyogi"


class FedAdagrad(_Adaptive):
    """Adagrad at the server: u <- u + Delta^2."""

    rule = "adagrad"
    config_name = "fedadagrad"


SERVER_OPTIMIZERS = {"average": Average, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
                     "fedadagrad": FedAdagrad}


SERVER_FAMILY = Family(ServerOptimizer, SERVER_OPTIMIZERS, "average", "server optimizer", "a server optimizer",
                       convert=lambda d: {**d, "betas": tuple(d["betas"])} if "betas" in d else d)


def make_server_optimizer(spec: object) -> ServerOptimizer:
    """From a config value: an instance, ``None`` (Average), a name, or a dict with ``name`` and options
    (``None`` options take the optimizer's defaults; :func:`lightning_qmlhfl.options.from_spec`)."""
    return from_spec(spec, SERVER_FAMILY)


def layer_server_optimizers(layers: Any, num_layers: int, **options: Any) -> list[ServerOptimizer]:
    """One server optimizer per layer n = 1..N from config values: ``layers`` one name or a list of N; every
    option (``lr``, ``momentum``, ``betas``, ``tau``, ``bias_correction``) one value or a list of N; ``None``
    options take the optimizer's defaults; each layer takes the options its optimizer has."""

    def split(k: str, v: Any) -> list[Any] | None:
        # betas is itself a pair: one pair for every layer, or a list of N pairs
        one_pair = k == "betas" and v is not None and len(v) == 2 and not hasattr(v[0], "__len__")
        return [v] * num_layers if v is None or one_pair else None

    return per_layer(layers, num_layers, SERVER_FAMILY, "server_optim", split=split, **options)


def validate_server_optimizers(spec: Any, num_layers: int) -> tuple[ServerOptimizer, ...]:
    """One per layer, or one for every layer, or ``None`` (Average everywhere)."""
    if spec is None:
        return tuple(Average() for _ in range(num_layers))
    if isinstance(spec, (ServerOptimizer, str)):
        return tuple(make_server_optimizer(spec) for _ in range(num_layers))
    spec = list(spec)
    if len(spec) != num_layers:
        raise ValueError(f"server_optimizers has length {len(spec)} but the hierarchy has N = {num_layers} layers: "
                         f"give one per layer (layer 1 = the edge servers above the devices, layer N = the cloud)")
    return tuple(make_server_optimizer(s) for s in spec)
