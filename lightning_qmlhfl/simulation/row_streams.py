"""Every row's random draws from its own generator, in whichever thread the row runs (:class:`RowStream`).

The loop executor's ordered forwards give each row its stream by seeding torch's one global generator before the
row (``device_rng="stream"``). Concurrent rows cannot share that generator, so inside a row's forward a torch
function mode (thread-local, so each worker has its own) hands the row's generator to every draw that takes one
(``torch.rand``, ``Tensor.bernoulli_``, ...) and runs the dropouts, which take none, as the same draws from it:
torch's CPU dropout is ``x * (empty_like(x).bernoulli_(1 - p) / (1 - p))``, with noise of shape [N, C, 1, ...] for
the feature dropouts (aten/src/ATen/native/Dropout.cpp), so a row gets the masks its ordered run gets, bit for
bit (tests/test_concurrent_forwards.py compares them). A draw this does not route (alpha dropout, an op drawing
internally) still reaches the global generator, which the executor then finds changed and refuses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["RowStream"]

# draws that accept ``generator=``: the row's generator is given to those called without one
_TAKES_GENERATOR = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal, torch.multinomial,
    torch.poisson, Tensor.uniform_, Tensor.normal_, Tensor.bernoulli_, Tensor.random_, Tensor.exponential_,
    Tensor.geometric_, Tensor.log_normal_, Tensor.cauchy_, Tensor.bernoulli, Tensor.multinomial,
}


def _dropout(generator: torch.Generator, x: Tensor, p: float, training: bool, inplace: bool,
             feature_dims: int | None) -> Tensor | None:
    """torch's CPU dropout with ``generator``; None where its arguments take another path (left to torch)."""
    if not isinstance(x, Tensor) or not 0.0 <= p <= 1.0:
        return None
    if feature_dims is not None and x.dim() != feature_dims:
        return None  # dropout2d/3d of unbatched or odd shapes: torch reshapes first
    if p == 0.0 or not training or x.numel() == 0:
        return x
    if p == 1.0:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return x.mul_(zero) if inplace else x * zero
    shape = x.shape[:2] + (1,) * (x.dim() - 2) if feature_dims is not None else None
    noise = torch.empty(shape, dtype=x.dtype, device=x.device) if shape else torch.empty_like(x)
    noise.bernoulli_(1.0 - p, generator=generator)
    noise.div_(1.0 - p)
    return x.mul_(noise) if inplace else x * noise


def _dropout_args(func: Any, args: tuple, kwargs: dict) -> tuple[Tensor, float, bool, bool]:
    names = ("input", "p", "training", "inplace")
    defaults = {"p": 0.5, "training": True, "inplace": False}
    values = dict(defaults, **dict(zip(names, args)), **kwargs)
    return values["input"], float(values["p"]), bool(values["training"]), bool(values["inplace"])


_DROPOUTS = {F.dropout: None, F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5}


class RowStream(TorchFunctionMode):
    """Inside it, in this thread, draws come from ``generator`` (module docstring)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _TAKES_GENERATOR:
            if kwargs.get("generator") is None:
                kwargs = dict(kwargs, generator=self.generator)
        elif func in _DROPOUTS:
            out = _dropout(self.generator, *_dropout_args(func, args, kwargs), feature_dims=_DROPOUTS[func])
            if out is not None:
                return out
        return func(*args, **kwargs)
