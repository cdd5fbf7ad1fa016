"""Stacked state: every simulated model of a layer is one row of a flat [rows, P] buffer.

A :class:`ParamLayout` records where each parameter (and each floating-point buffer) of the template module lives
inside a flat row. :class:`StackedState` holds, for every layer n = 0..N, a parameter buffer [M_n, P] and a
buffer buffer [M_n, B] (B = total size of the module's floating-point buffers, e.g. BatchNorm running statistics).

Buffer policy (this project's choice, documented in the README): floating-point buffers are simulated per device
like parameters, travel up with the parameters and are aggregated by the exact weighted mean of Eq. 4 without
quantization (stochastic rounding could make a running variance negative); their uploads are counted at 32 bits.
Integer buffers (BatchNorm's ``num_batches_tracked``) are not simulated per device: the template keeps one copy.
Frozen parameters (``trainable`` leaves them out: no optimizer trains them, or ``requires_grad=False``) are not
stacked either: every device uses the template's copy, and nothing of them is sent or counted.

Storage order (``param_order``): with ``"fast"`` (the default) a parameter may be stored in a row with its
dimensions permuted, in the order the kernels that read it and produce its gradient prefer, and the views handed
to the model permute it back (same shape, other strides; no copies):

- ``nn.Linear`` weights [out, in] are stored as [in, out]. A batched ``F.linear`` under vmap computes the weight
  gradient as a [in, out] matrix, so the gradient then has the parameter's own strides and the optimiser's update
  is a contiguous pass (it was a transposed, cache-hostile one, ~3x slower for stacked MLPs; bench/RESULTS.md).
- ``nn.Conv2d`` / ``nn.Conv3d`` weights [out, in, *k] are stored channels-last, [out, *k, in]: oneDNN then runs
  the convolution, and the activations after it (max pooling included), in channels-last layout, which is
  faster per device step for small CNNs such as the MNIST LeNet (bench/RESULTS.md).

The order is the order of the flat row, so it is what bucketed QSGD groups into buckets and what the seeded
uniforms are indexed by; the model-shaped views are the same in both orders. ``"module"`` keeps every
parameter in its module layout (the flat row then equals ``torch.nn.utils.parameters_to_vector``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..hierarchy import Hierarchy

__all__ = ["ParamLayout", "StackedState", "check_param_order", "fast_orders", "upload_dims"]


ParamOrder = Literal["fast", "module"]


def check_param_order(order: object) -> str:
    """The storage order, or a ValueError naming the allowed ones."""
    if order not in ("fast", "module"):
        raise ValueError(f"param_order must be 'fast' or 'module', got {order!r}")
    return order


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    order: tuple[int, ...]  # storage order of the dimensions: the row holds tensor.permute(order), contiguous

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.order)

    @property
    def back(self) -> tuple[int, ...]:
        """The permutation that turns the stored block back into the tensor's own dimension order."""
        return tuple(sorted(range(len(self.order)), key=self.order.__getitem__))

    @property
    def permuted(self) -> bool:
        return self.order != tuple(range(len(self.order)))


def fast_orders(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The ``"fast"`` storage order of the parameters it changes: Linear weights transposed, Conv2d/Conv3d
    weights channels-last (see the module docstring)."""
    orders: dict[str, tuple[int, ...]] = {}
    for prefix, m in module.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(m, nn.Linear) and w.dim() == 2:
            orders[name] = (1, 0)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):  # (transposed convolutions are other classes)
            orders[name] = (0, *range(2, w.dim()), 1)
    return orders


class ParamLayout:
    """Where each named tensor of a module lives in a flat row. ``size`` = total number of elements.

    ``orders`` maps a name to its storage order (a permutation of its dimensions); others are stored as they are.
    """

    def __init__(self, named: list[tuple[str, Tensor]], orders: dict[str, tuple[int, ...]] | None = None) -> None:
        orders = orders or {}
        slots, off = [], 0
        for name, t in named:
            order = tuple(orders.get(name, range(t.dim())))
            if sorted(order) != list(range(t.dim())):
                raise ValueError(f"storage order {order} of {name!r} is not a permutation of its {t.dim()} dims")
            slots.append(_Slot(name, tuple(t.shape), off, t.numel(), order))
            off += t.numel()
        self.slots: tuple[_Slot, ...] = tuple(slots)
        self.size = off

    @classmethod
    def of_parameters(cls, module: nn.Module, order: ParamOrder = "fast",
                      names: "set[str] | None" = None) -> "ParamLayout":
        """The layout of ``module``'s parameters (only those in ``names``, when given: the trained ones)."""
        named = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
        for name, p in named:
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"parameter {name!r} is not initialised yet (a lazy module): run one forward pass before "
                    f"training (e.g. in the LightningModule's setup) so that every parameter has its shape"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters can be trained and "
                    f"aggregated"
                )
        return cls(named, fast_orders(module) if check_param_order(order) == "fast" else None)

    def describe(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(name, shape, storage order) per slot: what a checkpoint's flat rows mean."""
        return [(s.name, s.shape, s.order) for s in self.slots]

    @classmethod
    def of_float_buffers(cls, module: nn.Module) -> "ParamLayout":
        return cls([(n, b) for n, b in module.named_buffers() if b is not None and b.is_floating_point()])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-name views into ``flat`` [..., size]: shapes [..., *param_shape], sharing memory."""
        lead = flat.shape[:-1]
        k = len(lead)
        out = {}
        for s in self.slots:
            v = flat[..., s.offset : s.offset + s.numel].view(*lead, *s.stored_shape)
            out[s.name] = v.permute(*range(k), *(k + i for i in s.back)) if s.permuted else v
        return out

    def flatten(self, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate named tensors (module-shaped) into one flat [size] row."""
        if not self.slots:
            return torch.zeros(0, dtype=dtype or torch.float32)
        parts = [tensors[s.name].detach().permute(s.order).reshape(-1) for s in self.slots]
        out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)


def upload_dims(module: nn.Module) -> tuple[int, int]:
    """(trainable parameter entries, float buffer entries) of ``module``: the d and B of one upload when every
    trainable parameter is in the optimizer (what the recipes and the planner count bits for)."""
    d = sum(p.numel() for p in module.parameters() if p.requires_grad)
    b = sum(t.numel() for t in module.buffers() if t is not None and t.is_floating_point())
    return d, b


class StackedState:
    """Parameter and float-buffer stacks of every layer, all rows initialised to the template's values.

    ``params[n]``: [nodes_per_layer[n], P]; ``buffers[n]``: [nodes_per_layer[n], B]. Layer 0 = devices, N = cloud.
    ``rows_per_layer`` overrides the row counts (a shard of a multi-process run holds only its own rows).
    """

    def __init__(self, module: nn.Module, hierarchy: Hierarchy, device: torch.device | str | None = None,
                 param_order: ParamOrder = "fast", trainable: "set[str] | None" = None,
                 rows_per_layer: "list[int] | None" = None) -> None:
        self.hierarchy = hierarchy
        self.param_layout = ParamLayout.of_parameters(module, param_order, trainable)
        self.buffer_layout = ParamLayout.of_float_buffers(module)
        if self.param_layout.size == 0:
            raise ValueError("the module has no parameters to train (none is trainable and in the optimizer)")
        named = dict(module.named_parameters())
        dtypes = {named[n].dtype for n in self.param_layout.names}
        if len(dtypes) != 1:
            raise TypeError(f"all parameters must share one dtype to be stacked, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        first = named[self.param_layout.names[0]]
        self.device = torch.device(device) if device is not None else first.device
        w = self.param_layout.flatten(named, self.dtype).to(self.device)
        b = self.buffer_layout.flatten(dict(module.named_buffers()), self.dtype).to(self.device)
        self.params: list[Tensor] = []
        self.buffers: list[Tensor] = []
        for m in (rows_per_layer if rows_per_layer is not None else hierarchy.nodes_per_layer):
            self.params.append(w.unsqueeze(0).repeat(m, 1))
            self.buffers.append(b.unsqueeze(0).repeat(m, 1))

    @property
    def num_params(self) -> int:
        return self.param_layout.size

    @property
    def num_buffer_elems(self) -> int:
        return self.buffer_layout.size

    def cloud_params(self) -> Tensor:
        return self.params[-1][0]

    def cloud_buffers(self) -> Tensor:
        return self.buffers[-1][0]

    @torch.no_grad()
    def load_row_into(self, module: nn.Module, layer: int, row: int) -> None:
        """Copy the model of (layer, row) into ``module``'s own parameters and float buffers."""
        for name, t in self.param_layout.views(self.params[layer][row]).items():
            module.get_parameter(name).copy_(t)
        for name, t in self.buffer_layout.views(self.buffers[layer][row]).items():
            module.get_buffer(name).copy_(t)

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {"params": [p.clone() for p in self.params], "buffers": [b.clone() for b in self.buffers]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, list[Tensor]]) -> None:
        for dst, src in zip(self.params + self.buffers, sd["params"] + sd["buffers"], strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"stacked state shape mismatch: checkpoint {tuple(src.shape)} vs {tuple(dst.shape)}")
            dst.copy_(src)
