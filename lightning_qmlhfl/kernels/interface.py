"""The contract between the aggregation layers and the kernel backends.

A backend answers two questions about one :class:`AggregationRequest`: whether it implements it
(:meth:`KernelBackend.supports`) and, if so, runs it (:meth:`KernelBackend.run`), returning the per-upload norms.
What a fused kernel needs to know of the compressor is its :class:`~lightning_qmlhfl.compressors.FusedSpec`
(``request.spec``); a compressor without one (top-k, random-k) is run by the torch reference only.

Adding a backend (say, a Metal or a CPU-SIMD kernel) means writing one subclass and registering it in
:mod:`lightning_qmlhfl.kernels`; nothing outside this folder changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from ..compressors import Compressor, FusedSpec

__all__ = ["AggregationRequest", "KernelBackend"]


@dataclass(frozen=True)
class AggregationRequest:
    """One layer's compress-and-sum (Eqs. 4/6), exactly the arguments of
    :func:`lightning_qmlhfl.kernels.aggregate_layer_` (whose docstring gives the semantics)."""

    parent: Tensor
    child: Tensor
    parent_index: Tensor
    weights: Tensor
    compressor: Compressor
    seeds: Tensor
    memory: Tensor | None = None
    rows: Tensor | None = None
    out: Tensor | None = None

    @property
    def spec(self) -> FusedSpec | None:
        """The compressor's fused description, None when no fused kernel implements it."""
        return self.compressor.fused_spec()

    def describe(self) -> str:
        """One line naming the request, for the error that a forced backend cannot run it."""
        extras = (" with a rows subset" if self.rows is not None else "") + (" with out=" if self.out is not None
                                                                              else "")
        return f"{self.compressor!r} on {self.parent.dtype} {self.parent.device.type} tensors{extras}"


class KernelBackend(ABC):
    """One implementation of :class:`AggregationRequest`; all give the same numbers (the tests compare them)."""

    name: str

    @abstractmethod
    def supports(self, request: AggregationRequest) -> bool:
        """Whether :meth:`run` implements this request (device, dtypes, compressor, options)."""

    @abstractmethod
    def run(self, request: AggregationRequest) -> Tensor:
        """Aggregate in place and return the per-upload norms float32 [uploads, buckets]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
