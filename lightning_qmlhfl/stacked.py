"""Stacked state: every simulated model of a layer is one row of a flat [rows, P] buffer.

A :class:`ParamLayout` records where each parameter (and each floating-point buffer) of the template module lives
inside a flat row. :class:`StackedState` holds, for every layer n = 0..N, a parameter buffer [M_n, P] and a
buffer buffer [M_n, B] (B = total size of the module's floating-point buffers, e.g. BatchNorm running statistics).

Buffer policy (this project's choice, documented in the README): floating-point buffers are simulated per device
like parameters, travel up with the parameters and are aggregated by the exact weighted mean of Eq. 4 without
quantization (stochastic rounding could make a running variance negative); their uploads are counted at 32 bits.
Integer buffers (BatchNorm's ``num_batches_tracked``) are not simulated per device: the template keeps one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hierarchy import Hierarchy

__all__ = ["ParamLayout", "StackedState"]


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class ParamLayout:
    """Where each named tensor of a module lives in a flat row. ``size`` = total number of elements."""

    def __init__(self, named: list[tuple[str, Tensor]]) -> None:
        slots, off = [], 0
        for name, t in named:
            slots.append(_Slot(name, tuple(t.shape), off, t.numel()))
            off += t.numel()
        self.slots: tuple[_Slot, ...] = tuple(slots)
        self.size = off

    @classmethod
    def of_parameters(cls, module: nn.Module) -> "ParamLayout":
        named = list(module.named_parameters())
        for name, p in named:
            if not p.is_floating_point():
                raise TypeError(
                    f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters can be trained and "
                    f"aggregated"
                )
        return cls(named)

    @classmethod
    def of_float_buffers(cls, module: nn.Module) -> "ParamLayout":
        return cls([(n, b) for n, b in module.named_buffers() if b is not None and b.is_floating_point()])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-name views into ``flat`` [..., size]: shapes [..., *param_shape], sharing memory."""
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.offset : s.offset + s.numel].view(*lead, *s.shape) for s in self.slots}

    def flatten(self, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate named tensors (module-shaped) into one flat [size] row."""
        if not self.slots:
            return torch.zeros(0, dtype=dtype or torch.float32)
        parts = [tensors[s.name].detach().reshape(-1) for s in self.slots]
        out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)


class StackedState:
    """Parameter and float-buffer stacks of every layer, all rows initialised to the template's values.

    ``params[n]``: [nodes_per_layer[n], P]; ``buffers[n]``: [nodes_per_layer[n], B]. Layer 0 = devices, N = cloud.
    """

    def __init__(self, module: nn.Module, hierarchy: Hierarchy, device: torch.device | str | None = None) -> None:
        self.hierarchy = hierarchy
        self.param_layout = ParamLayout.of_parameters(module)
        self.buffer_layout = ParamLayout.of_float_buffers(module)
        if self.param_layout.size == 0:
            raise ValueError("the module has no parameters to train")
        dtypes = {p.dtype for _, p in module.named_parameters()}
        if len(dtypes) != 1:
            raise TypeError(f"all parameters must share one dtype to be stacked, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        first = next(module.parameters())
        self.device = torch.device(device) if device is not None else first.device
        w = self.param_layout.flatten(dict(module.named_parameters()), self.dtype).to(self.device)
        b = self.buffer_layout.flatten(dict(module.named_buffers()), self.dtype).to(self.device)
        self.params: list[Tensor] = []
        self.buffers: list[Tensor] = []
        for m in hierarchy.nodes_per_layer:
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
