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

- ``torch`` (:mod:`.reference`): any device, any dtype, any compressor, error feedback, row subsets; the
  reference.
- ``numba`` (:mod:`.numba_cpu`): fused, float32 CPU tensors; Identity, QSGD, ScaledSign, NaturalCompression,
  with or without error feedback.
- ``triton`` (:mod:`.triton_cuda`): fused, CUDA tensors (or Triton's CPU interpreter with ``TRITON_INTERPRET=1``
  set before the Triton module is first imported); what it implements is its ``supports()``.

Each backend is a :class:`~.interface.KernelBackend` that declares what it implements (:func:`backend_supports`)
for an :class:`~.interface.AggregationRequest`; :func:`aggregate_layer_` dispatches to the first that can run the
request and never hands a backend something it cannot run. What a fused kernel needs of a compressor is its
:class:`~lightning_qmlhfl.compressors.FusedSpec`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType
from typing import Literal

from torch import Tensor
import torch

from ..compressors import Compressor
from .interface import AggregationRequest, KernelBackend
from .reference import TorchBackend, aggregate_layer_torch_, encode_uploads

__all__ = ["Backend", "BACKENDS", "AggregationRequest", "KernelBackend", "numba_backend", "check_backend", "row_uniforms", "aggregate_layer_",
           "aggregate_layer_torch_",
           "encode_uploads", "triton_available", "backend_supports", "choose_backend"]

_NUMBA_CPU: ModuleType | None = None


def numba_backend() -> ModuleType:
    """:mod:`.numba_cpu`, imported on first use. numba reads the size of its thread pool when it is imported:
    unless ``NUMBA_NUM_THREADS`` is set (or numba was imported before), the pool gets torch's intra-op thread
    count at that moment instead of one thread per core, so that a process given fewer threads (one rank of a
    multi-process run, ``QMLHFL_THREADS=1`` sweeps running side by side) does not keep extra pool threads that
    compete with the other processes for the cores (measured in bench/RESULTS.md). Set the torch thread count
    before the first aggregation; numba's kernels then use at most that many threads."""
    global _NUMBA_CPU
    if _NUMBA_CPU is None:
        _NUMBA_CPU = numba_module("numba_cpu")
    return _NUMBA_CPU


def numba_module(name: str) -> ModuleType:
    """This package's numba module ``name`` (``numba_cpu``, ``robust_numba``), imported with numba's thread pool
    sized as :func:`numba_backend` says."""
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, torch.get_num_threads())))
    return importlib.import_module(f"{__name__}.{name}")


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
    return numba_backend().philox_uniforms(seeds, d).to(device)


def _backend(name: str) -> KernelBackend | None:
    """The registered backend ``name`` if it can run in this process (its library importable; Triton also needs
    CUDA or the interpreter), else None. Backends are imported on first use."""
    if name == "torch":
        return TorchBackend()
    if name == "numba":
        return numba_backend().NumbaBackend()
    if name == "triton":
        if not triton_available():
            return None
        from .triton_cuda import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown backend {name!r}; allowed: 'torch', 'numba', 'triton'")


def _request(parent: Tensor, child: Tensor, compressor: Compressor, memory: Tensor | None, rows: Tensor | None,
             out: Tensor | None, parent_index: Tensor | None = None, weights: Tensor | None = None,
             seeds: Tensor | None = None) -> AggregationRequest:
    return AggregationRequest(parent=parent, child=child, parent_index=parent_index, weights=weights,
                              compressor=compressor, seeds=seeds, memory=memory, rows=rows, out=out)


def _supports(name: str, request: AggregationRequest) -> bool:
    backend = _backend(name)
    return backend is not None and backend.supports(request)


def backend_supports(backend: str, parent: Tensor, child: Tensor, compressor: Compressor,
                     memory: Tensor | None = None, rows: Tensor | None = None, out: Tensor | None = None) -> bool:
    """Whether ``backend`` ("torch", "numba", "triton") runs this aggregation: each backend declares the
    compressors, dtypes and devices it implements (:meth:`KernelBackend.supports`); the torch reference runs
    everything."""
    return _supports(backend, _request(parent, child, compressor, memory, rows, out))


def _choose(request: AggregationRequest) -> str:
    first = "triton" if request.parent.is_cuda else "numba"
    return first if _supports(first, request) else "torch"


def choose_backend(parent: Tensor, child: Tensor, compressor: Compressor, memory: Tensor | None = None,
                   rows: Tensor | None = None, out: Tensor | None = None) -> str:
    """``backend="auto"``: Triton for CUDA tensors, numba for CPU tensors, each only for what it supports; the
    torch reference otherwise."""
    return _choose(_request(parent, child, compressor, memory, rows, out))


def aggregate_layer_(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    weights: Tensor,
    quantizer: Compressor,
    seeds: Tensor,
    backend: Backend = "auto",
    *,
    memory: Tensor | None = None,
    rows: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Eq. 4/6 for all parents of one layer with compressor C = ``quantizer``::

        for every child row c in ``rows`` (default: all), p = parent_index[c], x = child[c] - parent[p]:
            no EF: up_c = C(x);   "ef": x += e_c, up_c = C(x), e_c = x - C(x);   "ef21": x -= g_c, g_c += C(x), up_c = g_c
        acc[p] = sum over c of weights[c] * up_c    (children in index order)
        parent[p] += acc[p]   (or, with ``out``, out[p] = acc[p] and the parent is left as it is)

    ``memory`` [C, P]: the error-feedback rows (e or g) of the layer's senders, updated in place (needed when the
    compressor has ``error_feedback``). ``rows``: int64 indices of the child rows that upload (participation);
    the others are not read and their memory is not touched. Returns the per-upload norms float32
    [len(rows), buckets]: if one is not finite, nothing is written and the caller names the node.

    ``backend="auto"`` dispatches by :func:`choose_backend`; ``"torch"``, ``"numba"`` or ``"triton"`` forces one
    and raises ValueError when it does not implement the request. All backends give the same numbers (module
    docstring).
    """
    check_backend(backend)
    request = AggregationRequest(parent=parent, child=child, parent_index=parent_index, weights=weights,
                                 compressor=quantizer, seeds=seeds, memory=memory, rows=rows, out=out)
    name = _choose(request) if backend == "auto" else backend
    if backend != "auto" and not _supports(name, request):
        raise ValueError(
            f"backend {name!r} does not implement {request.describe()}; use backend='auto' (which falls back to "
            f"the torch reference) or 'torch'"
        )
    return _backend(name).run(request)
