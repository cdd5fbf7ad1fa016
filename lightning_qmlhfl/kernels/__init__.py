"""Quantize-and-aggregate for a whole layer at once: Eq. 4 (edge layers) and Eq. 6 (cloud), three backends.

For every parent p of layer n:   v_p <- v_p + sum_{c child of p} w_c * Q_n(v_c - v_p)

``parent`` is the stacked [M, P] buffer of layer n, ``child`` the stacked [C, P] buffer of layer n-1,
``parent_index[c]`` the parent of child row c and ``weights[c]`` its weight |C(c)| / |C(p)|.

Randomness: each child row draws its own uniforms from a counter-based seed (:func:`lightning_qmlhfl.rng.row_seeds`)
derived from the run's seed, the global round, the layer, the aggregation event and the node index. Column j of
row c uses word (j mod 4) of Philox4x32-10 (key = the row's seed, counter = (j div 4, 0, 0, 0)) converted like
Triton's ``tl.rand``: the same numbers in the Triton kernels, the numba CPU kernel and :func:`row_uniforms`, so a
run gives the same draws on CPU and GPU, whatever the chunking or launch shape, and a resumed run redraws them.

Backends, one semantics, checked against each other number for number in the tests:

- ``torch`` (:mod:`.reference`): any device, any dtype, any :class:`Quantizer`; the reference.
- ``numba`` (:mod:`.numba_cpu`): fused, float32 CPU tensors.
- ``triton`` (:mod:`.triton_cuda`): fused, CUDA tensors (or Triton's CPU interpreter with ``TRITON_INTERPRET=1``
  set before the Triton module is first imported).

:func:`aggregate_layer_` dispatches between them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

from torch import Tensor
import torch

from ..quantizers import Quantizer
from . import numba_cpu
from .reference import aggregate_layer_torch_, encode_uploads

__all__ = ["Backend", "BACKENDS", "check_backend", "row_uniforms", "aggregate_layer_", "aggregate_layer_torch_",
           "encode_uploads", "triton_available"]

Backend = Literal["auto", "torch", "numba", "triton"]
BACKENDS = ("auto", "torch", "numba", "triton")


def check_backend(backend: object) -> str:
    """The aggregation backend, or a ValueError naming the allowed ones."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'numba' or 'triton', got {backend!r}")
    return backend


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton importable and either CUDA present or ``TRITON_INTERPRET=1`` (decided once per process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return bool(torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1"


def row_uniforms(seeds: Tensor, d: int, device: torch.device | str) -> Tensor:
    """float32 [len(seeds), d] of U[0, 1) draws, row i from the Philox stream of ``seeds[i]`` (module docstring).

    On a CUDA device with Triton: drawn there by the Triton kernels' own generator; otherwise drawn on the CPU by
    the numba kernel (parallel over rows) and moved to ``device``. Same numbers either way (tested)."""
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        from .triton_cuda import triton_uniforms

        return triton_uniforms(seeds, d, device)
    return numba_cpu.philox_uniforms(seeds, d).to(device)


def aggregate_layer_(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    weights: Tensor,
    quantizer: Quantizer,
    seeds: Tensor,
    backend: Backend = "auto",
) -> Tensor:
    """Eq. 4/6 for all parents of one layer, dispatched: Triton for CUDA tensors, the numba kernel for float32
    CPU tensors with QSGD or no quantization, the torch code otherwise.

    ``backend="torch"``, ``"numba"`` or ``"triton"`` forces one. Returns the per-row upload norms float32
    [C, buckets] (non-finite if an upload held NaN/Inf; then ``parent`` is untouched). All three give the same
    numbers (module docstring).
    """
    check_backend(backend)
    use_triton = backend == "triton" or (backend == "auto" and parent.is_cuda and triton_available())
    if use_triton:
        from .triton_cuda import aggregate_layer_triton_

        return aggregate_layer_triton_(parent, child, parent_index, weights, quantizer, seeds)
    if backend == "numba" or (backend == "auto" and numba_cpu.supports(parent, child, quantizer)):
        return numba_cpu.aggregate_layer_numba_(parent, child, parent_index, weights, quantizer, seeds)
    return aggregate_layer_torch_(parent, child, parent_index, weights, quantizer, seeds)
