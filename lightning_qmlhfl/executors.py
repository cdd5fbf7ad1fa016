"""Executors: compute the Eq. 3 gradient of every device at once, from the stacked device rows.

Both take the stacked device parameters [N_tot, P], float buffers [N_tot, B] and one mini-batch per device
(any pytree of tensors whose leading dimension is N_tot) and return the gradients (``loop``: one [N_tot, P]
tensor; ``vmap``: one [N_tot, *shape] tensor per parameter in layout order, ``None`` for an unused one), the per-device losses [N_tot] and per-device auxiliary scalars {name: [N_tot]}.

- ``vmap``: ``torch.func.functional_call`` under ``torch.func.vmap`` with ``randomness="different"`` (dropout
  masks differ per device), differentiated by ordinary reverse-mode autograd. One vectorised computation.
- ``loop``: walks the rows with ordinary autograd; each row's parameters are views of the stacked buffer
  (no state-dict copies). Faster than vmap for small CNNs on CPU, where vmap turns convolutions into grouped ones.

Floating-point buffers (BatchNorm running statistics) are updated in place in their rows by the forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .stacked import ParamLayout

__all__ = ["Objective", "VmapExecutor", "LoopExecutor", "make_executor", "choose_executor"]

ExecutorName = Literal["auto", "vmap", "loop"]
LossFn = Callable[[nn.Module, Any], Any]


def _normalise_output(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Accept a loss tensor, a dict with "loss" (Lightning style) or a (loss, {name: scalar}) pair."""
    if isinstance(out, Tensor):
        return out, {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError(f"a dict returned by the loss function must contain 'loss'; keys: {sorted(out)}")
        aux = {k: v.detach() for k, v in out.items() if k != "loss" and isinstance(v, Tensor) and v.numel() == 1}
        return out["loss"], aux
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor):
        return out[0], dict(out[1])
    raise TypeError(
        f"the loss function must return a scalar tensor, a dict with 'loss', or (loss, aux_dict); got {type(out)}"
    )


class Objective(nn.Module):
    """Wraps the user's module so that ``functional_call`` can run ``loss_fn(module, batch)`` on swapped weights."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux = _normalise_output(self._loss_fn(self.inner, batch))
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        return loss, aux


class _ExecutorBase:
    name = "base"

    def __init__(self, module: nn.Module, loss_fn: LossFn, param_layout: ParamLayout, buffer_layout: ParamLayout):
        self.objective = Objective(module, loss_fn)
        self.param_layout = param_layout
        self.buffer_layout = buffer_layout
        # Non-float buffers (BatchNorm's num_batches_tracked) are shared, not per device: every device of a step
        # sees the same value, and the template keeps the value after one step (identical for both executors).
        self._int_buffers = {
            n: b for n, b in module.named_buffers() if b is not None and not b.is_floating_point()
        }

    @staticmethod
    def _named(*groups: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ``functional_call`` mapping of the wrapped module: parameters, float buffers, integer buffers."""
        return {"inner." + k: v for group in groups for k, v in group.items()}

    def _int_copies(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._int_buffers.items()}

    @torch.no_grad()
    def _store_ints(self, ints: dict[str, Tensor]) -> None:
        for k, v in ints.items():
            self._int_buffers[k].copy_(v)

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class VmapExecutor(_ExecutorBase):
    name = "vmap"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        def f(pars: dict[str, Tensor], bufs: dict[str, Tensor], ints: dict[str, Tensor], batch: Any):
            return torch.func.functional_call(self.objective, self._named(pars, bufs, ints), (batch,))

        self._fn = torch.func.vmap(f, in_dims=(0, 0, None, 0), randomness="different")

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        # The per-device losses are independent, so d(sum_i loss_i)/d params[i] is device i's own gradient.
        # Reverse-mode autograd through the vmapped forward (instead of vmap(grad(...))) keeps BatchNorm's
        # in-place running-statistics updates, which torch.func.grad transforms silently drop. The float
        # buffers go in as contiguous per-name copies (in-place updates of strided views are lost under vmap)
        # and are written back afterwards.
        ints = self._int_copies()
        views = self.buffer_layout.views(buffers)
        bufs = {k: v.clone() for k, v in views.items()}
        # One autograd leaf per parameter (views of the stack, no copy). Differentiating with respect to the
        # whole [N_tot, P] stack instead would make every per-parameter slice's backward materialise a full
        # [N_tot, P] zero tensor and add into it: measured 64% of an MLP step on a 2-core CPU.
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.param_layout.views(params).items()}
        with torch.enable_grad():
            losses, aux = self._fn(leaves, bufs, ints, batch)
            parts = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
        grads = list(parts)  # per parameter, in layout order: the device optimiser takes them as they are
        with torch.no_grad():
            for k, v in views.items():
                v.copy_(bufs[k])
        self._store_ints(ints)
        return grads, losses.detach(), {k: v.detach() for k, v in aux.items()}


class LoopExecutor(_ExecutorBase):
    name = "loop"

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        rows = params.shape[0]
        grads = torch.empty_like(params)
        losses = torch.empty(rows, dtype=torch.float32, device=params.device)
        aux_rows: dict[str, list[Tensor]] = {}
        ints: dict[str, Tensor] = {}
        for i in range(rows):
            # one leaf per parameter, each a view of row i of the stacked buffer (no copies)
            leaves = {k: v.detach().requires_grad_(True) for k, v in self.param_layout.views(params[i]).items()}
            batch_i = tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
            ints = self._int_copies()
            with torch.enable_grad():
                named = self._named(leaves, self.buffer_layout.views(buffers[i]), ints)
                loss, aux = torch.func.functional_call(self.objective, named, (batch_i,))
                parts = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for g, view in zip(parts, self.param_layout.views(grads[i]).values()):
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
            losses[i] = loss.detach()
            for k, v in aux.items():
                aux_rows.setdefault(k, []).append(v.detach().reshape(()))
        self._store_ints(ints)
        return grads, losses, {k: torch.stack(v) for k, v in aux_rows.items()}


def choose_executor(module: nn.Module, device: torch.device) -> str:
    """The documented automatic rule: ``loop`` for modules with convolutions on CPU, ``vmap`` otherwise.

    Measured on a 2-core CPU (bench/engine.py, 100 devices): vmap is 1.15x the loop's speed for a 784-200-10 MLP,
    but 0.80x for LeNet and 0.37x for the small CIFAR CNN, whose convolutions become grouped convolutions under
    vmap. On CUDA vmap is used throughout.
    """
    if device.type != "cpu":
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return "loop" if has_conv else "vmap"


def make_executor(
    name: str, module: nn.Module, loss_fn: LossFn, param_layout: ParamLayout, buffer_layout: ParamLayout,
    device: torch.device,
) -> _ExecutorBase:
    if name == "auto":
        name = choose_executor(module, device)
    if name == "vmap":
        return VmapExecutor(module, loss_fn, param_layout, buffer_layout)
    if name == "loop":
        return LoopExecutor(module, loss_fn, param_layout, buffer_layout)
    raise ValueError(f"executor must be 'auto', 'vmap' or 'loop', got {name!r}")
