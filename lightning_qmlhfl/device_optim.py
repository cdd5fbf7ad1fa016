"""Per-device optimisers on the stacked device buffer (Eq. 3 and its element-wise extensions).

Plain SGD is the paper's optimiser. Element-wise optimisers (SGD with momentum/Nesterov/weight decay, Adam,
AdamW, RMSprop, Adagrad) treat every coordinate independently, so running one torch optimiser over the whole
stacked tensor [N_tot, P] is exactly running one optimiser per device: the state tensors (momentum buffers,
Adam moments) have shape [N_tot, P] and row i is device i's own state. This project's choice (ALGORITHM.md
section 3): that per-device state is kept by the device across aggregations and is never aggregated or reset.

Optimisers that couple coordinates (LBFGS, Adafactor-like factorised ones, anything unknown) are rejected.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["ELEMENTWISE_OPTIMIZERS", "DeviceOptimizer", "check_optimizer_class"]

ELEMENTWISE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def check_optimizer_class(cls: Any) -> type[torch.optim.Optimizer]:
    """Return the optimiser class if it is one of the supported element-wise ones, else raise ValueError."""
    if isinstance(cls, str):
        key = cls.lower()
        if key not in ELEMENTWISE_OPTIMIZERS:
            raise ValueError(f"optimizer {cls!r} is not supported; allowed: {sorted(ELEMENTWISE_OPTIMIZERS)}")
        return ELEMENTWISE_OPTIMIZERS[key]
    if isinstance(cls, torch.optim.Optimizer):
        cls = type(cls)
    if cls not in ELEMENTWISE_OPTIMIZERS.values():
        allowed = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS.values())
        name = getattr(cls, "__name__", repr(cls))
        raise ValueError(
            f"optimizer {name} is not supported: QMLHFL runs one optimiser per simulated device on stacked "
            f"weights, which is exact only for element-wise optimisers ({allowed})"
        )
    return cls


# Keys of a torch param_group that describe how, not what, to compute; dropped when rebuilding the optimiser.
_FORBIDDEN = {"params", "fused", "capturable", "differentiable", "foreach"}


class DeviceOptimizer:
    """One torch optimiser over the device stack; ``step(grads)`` applies Eq. 3 (or its extension) to all devices.

    ``params`` must be the engine's device parameter stack [N_tot, P] itself (updated in place, identity kept).
    With ``layout`` (the stack's :class:`~lightning_qmlhfl.stacked.ParamLayout`) the optimiser runs over one
    [N_tot, *shape] view per model parameter instead of the whole stack, so ``step`` can take the
    per-parameter gradients as the executor produced them, without concatenating them into [N_tot, P] first
    (one full-size copy and allocation per step less). The arithmetic is the same element by element.
    """

    def __init__(self, params: Tensor, cls: Any = torch.optim.SGD, hyper: dict[str, Any] | None = None,
                 layout: Any = None) -> None:
        self.cls = check_optimizer_class(cls)
        hyper = dict(hyper or {})
        hyper = {k: v for k, v in hyper.items() if k not in _FORBIDDEN}
        if "lr" not in hyper:
            raise ValueError("the optimiser needs a learning rate 'lr' (mu of Eq. 3)")
        lr = hyper["lr"]
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"learning rate must be a number > 0, got {lr!r}")
        self.params = params
        self.hyper = hyper
        self.layout = layout if layout is not None and layout.slots else None
        if self.layout is None:
            self.columns = [params]
        else:
            if sum(s.numel for s in self.layout.slots) != params.shape[1]:
                raise ValueError("the layout does not cover the parameter stack")
            # [N_tot, *shape] views: gradients are used with whatever strides autograd gave them (no reshape copy)
            self.columns = list(self.layout.views(params).values())
        self.optimizer = self.cls(self.columns, **hyper)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def step(self, grads: Tensor | Sequence[Tensor | None]) -> None:
        """``grads``: the [N_tot, P] gradient stack, or one gradient per model parameter ([N_tot, *shape] each,
        in layout order; ``None`` = zero)."""
        if isinstance(grads, Tensor):
            if grads.shape != self.params.shape:
                raise ValueError(f"gradient shape {tuple(grads.shape)} != device stack {tuple(self.params.shape)}")
            parts = [grads] if self.layout is None else list(self.layout.views(grads).values())
        else:
            parts = list(grads)
            if len(parts) != len(self.columns):
                raise ValueError(f"got {len(parts)} gradients for {len(self.columns)} parameters")
        for col, g in zip(self.columns, parts):
            col.grad = torch.zeros_like(col) if g is None else g.to(col.dtype)
        self.optimizer.step()
        for col in self.columns:
            col.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)
