"""The identity: the upload is sent as 32-bit floats, C(x) = x (``NoQuantization`` is its earlier name)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Encoded, _as_rows, row_norms

__all__ = ["Identity", "NoQuantization"]


class Identity(Compressor):
    """C(x) = x; bits per upload 32 d. With ``error_feedback="ef"`` the memory stays exactly 0 (x - C(x) = 0)."""

    config_name = "identity"

    unbiased = True

    def compress_(self, x: Tensor, norms: Tensor, uniforms: Tensor | None) -> Tensor:
        return x

    def encode(self, x: Tensor, uniforms: Tensor | None = None, generator: torch.Generator | None = None) -> Encoded:
        x = _as_rows(x)
        return Encoded(norms=row_norms(x), levels=None, values=x.to(torch.float32))

    def decode(self, enc: Encoded, d: int) -> Tensor:
        assert enc.values is not None
        return enc.values

    def error_bound(self, d: int) -> float:
        return 0.0

    def bits(self, d: int) -> int:
        return 32 * int(d)

    @property
    def is_identity(self) -> bool:
        return True


NoQuantization = Identity
