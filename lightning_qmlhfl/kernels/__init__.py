"""Triton kernels for the hot path of every aggregation (Eqs. 4 and 6), with the torch reference's semantics.

For all parents p of one layer at once::

    parent[p] += sum over children c of p of  w_c * Q(child_c - parent_p)

Public API (shapes: ``parent`` [M, P], ``child`` [C, P], ``parent_index`` / ``weights`` / ``seeds`` [C]):

- :func:`aggregate_layer_triton_` -- in place on ``parent``; returns the upload norms float32 [C, buckets]
  exactly like :func:`lightning_qmlhfl.aggregation.aggregate_layer_torch_` (if a norm is NaN/Inf the parent is
  left untouched and the norms are returned so the caller can name the node).
- :func:`row_norms_triton` -- per-row (or per-bucket) L2 norms of ``child - parent[parent_index]`` without
  materialising the difference.
- :func:`encode_uploads_triton` -- the norms and integer level codes that would travel on the wire.
- :func:`triton_uniforms` -- the exact U[0, 1) draws the fused kernel uses for each row, so a test can feed them
  to the torch reference (``aggregate_layer_torch_(..., uniforms=...)``) and compare number for number.
- ``TRITON_AVAILABLE`` -- Triton importable and either CUDA present or ``TRITON_INTERPRET=1`` (CPU interpreter,
  which must be set before this package is imported).

Users do not call these directly: :func:`lightning_qmlhfl.aggregation.aggregate_layer_` dispatches to them for
CUDA tensors. See :mod:`lightning_qmlhfl.kernels.quantize_aggregate` for the algorithm, the random-number scheme
and the choice between a segmented and an atomic layout.
"""

from __future__ import annotations

import os

try:  # Triton is an optional dependency (extra "triton"); without it only the torch path exists.
    import triton  # noqa: F401

    _TRITON_IMPORTABLE = True
    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    _TRITON_IMPORTABLE = False
    _IMPORT_ERROR = exc


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels were built for Triton's CPU interpreter (decided when this package is imported)."""

TRITON_AVAILABLE: bool = _TRITON_IMPORTABLE and (_cuda_available() or INTERPRET)
"""True when the Triton kernels can run here: Triton importable and (CUDA present or TRITON_INTERPRET=1)."""

if _TRITON_IMPORTABLE:
    from .quantize_aggregate import (
        aggregate_layer_triton_,
        encode_uploads_triton,
        row_norms_triton,
        triton_uniforms,
    )
else:  # pragma: no cover - exercised only where triton is missing

    def _missing(*_args, **_kwargs):
        raise RuntimeError(
            "lightning_qmlhfl.kernels needs Triton (pip install 'lightning-qmlhfl[triton]'); "
            f"importing it failed with: {_IMPORT_ERROR!r}. Use backend='torch' instead."
        )

    aggregate_layer_triton_ = encode_uploads_triton = row_norms_triton = triton_uniforms = _missing

__all__ = [
    "TRITON_AVAILABLE",
    "INTERPRET",
    "aggregate_layer_triton_",
    "encode_uploads_triton",
    "row_norms_triton",
    "triton_uniforms",
]
