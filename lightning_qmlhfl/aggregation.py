"""Quantize-and-aggregate for a whole layer at once: Eq. 4 (edge layers) and Eq. 6 (cloud).

For every parent p of layer n:   v_p <- v_p + sum_{c child of p} w_c * Q_n(v_c - v_p)

``parent`` is the stacked [M, P] buffer of layer n, ``child`` the stacked [C, P] buffer of layer n-1,
``parent_index[c]`` the parent of child row c and ``weights[c]`` its weight |C(c)| / |C(p)|.

Randomness: each child row draws its own uniforms from a counter-based seed (:func:`row_seeds`) derived from
the run's seed, the global round, the layer, the aggregation event and the node index. Column j of row c uses
word (j mod 4) of Philox4x32-10 (key = the row's seed, counter = (j div 4, 0, 0, 0)) converted like Triton's
``tl.rand``: the same numbers in the Triton kernels, the numba CPU kernel and :func:`row_uniforms`, so a run gives
the same draws on CPU and GPU, whatever the chunking or launch shape, and a resumed run redraws them exactly.

Three implementations with one semantics, checked against each other number for number in the tests:
this module's torch code (any device, any dtype, any :class:`Quantizer`; the reference), the fused numba kernel
(:mod:`lightning_qmlhfl.cpu_kernels`; float32 CPU tensors) and the fused Triton kernels
(:mod:`lightning_qmlhfl.kernels`; CUDA). :func:`aggregate_layer_` dispatches between them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import cpu_kernels
from .hierarchy import check_layer_shapes
from .quantizers import QSGD, Encoded, Quantizer, row_norms

__all__ = ["check_backend", "row_seeds", "row_uniforms", "aggregate_layer_", "aggregate_layer_torch_", "encode_uploads"]

Backend = Literal["auto", "torch", "numba", "triton"]
BACKENDS = ("auto", "torch", "numba", "triton")


def check_backend(backend: object) -> str:
    """The aggregation backend, or a ValueError naming the allowed ones."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'numba' or 'triton', got {backend!r}")
    return backend

_MASK63 = (1 << 63) - 1


def _mix(*values: int) -> int:
    """SplitMix64-style mixing of integers into one 63-bit seed (deterministic, platform-independent)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


def row_seeds(seed: int, round_idx: int, layer: int, event: int, num_rows: int) -> Tensor:
    """int64 [num_rows]: the seed of each child row's uniforms for one aggregation event of one layer.

    ``event`` numbers the aggregations of this layer within the global round (0-based).
    """
    base = _mix(seed, round_idx, layer, event)
    return torch.tensor([_mix(base, i) for i in range(num_rows)], dtype=torch.int64)


def row_uniforms(seeds: Tensor, d: int, device: torch.device | str) -> Tensor:
    """float32 [len(seeds), d] of U[0, 1) draws, row i from the Philox stream of ``seeds[i]`` (module docstring).

    On a CUDA device with Triton: drawn there by the Triton kernels' own generator; otherwise drawn on the CPU by
    the numba kernel (parallel over rows) and moved to ``device``. Same numbers either way (tested)."""
    device = torch.device(device)
    if device.type == "cuda" and _triton_available():
        from .kernels import triton_uniforms

        return triton_uniforms(seeds, d, device)
    return cpu_kernels.philox_uniforms(seeds, d).to(device)


def _chunk_rows(num_cols: int, budget_bytes: int = 1 << 20) -> int:
    """Rows per chunk so one fp32 chunk is ~1 MB: the dozen elementwise passes then run in the CPU caches."""
    return max(1, budget_bytes // max(1, 4 * num_cols))


def _weighted_qsgd_(diff: Tensor, norms: Tensor, uniforms: Tensor, quantizer: QSGD, weights: Tensor) -> Tensor:
    """w_c * Q(diff_c) for the rows of ``diff`` (float32, overwritten), number for number what
    ``quantizer.decode(quantizer.encode(diff, uniforms)) * w`` gives (and what the Triton kernel computes), in a
    few in-place passes instead of ~20 allocating ones. ``norms`` [rows, buckets] are the upload norms."""
    s = float(quantizer.levels)
    nfull = quantizer.expand_norms(norms, diff.shape[1])
    safe = torch.where(nfull > 0, nfull, torch.ones_like(nfull))
    t = diff.abs()
    t.div_(safe).clamp_(max=1.0).mul_(s)  # r = |x| / ||x|| <= 1, scaled = r * s
    level = torch.floor(t)
    t.sub_(level)  # fractional part
    level.add_(uniforms < t)  # stochastic rounding up with probability frac; <= s because r <= 1
    # A zero norm means every entry of its row/bucket is 0, so level is already 0 there (Q(0) = 0 exactly).
    level.copysign_(diff)  # sign(x) * xi (a zero level stays zero, whatever its sign bit)
    level.mul_(nfull / s).mul_(weights[:, None])
    return level


def encode_uploads(
    parent: Tensor, child: Tensor, parent_index: Tensor, quantizer: Quantizer, seeds: Tensor
) -> Encoded:
    """The messages of one aggregation event: Q_n(child_c - parent_{p(c)}) as norms and level codes."""
    diff = child.to(torch.float32) - parent.to(torch.float32)[parent_index.to(parent.device)]
    if quantizer.is_identity:
        return quantizer.encode(diff)
    return quantizer.encode(diff, uniforms=row_uniforms(seeds, diff.shape[1], diff.device))


@torch.no_grad()
def aggregate_layer_torch_(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    weights: Tensor,
    quantizer: Quantizer,
    seeds: Tensor,
    uniforms: Tensor | None = None,
) -> Tensor:
    """Torch implementation of Eq. 4/6 for one layer, in place on ``parent``; returns per-row norms
    float32 [C, buckets] of the uploads (non-finite if an upload held NaN/Inf; then ``parent`` is untouched).

    ``uniforms`` [C, P] overrides the seeded draws (tests feed the same draws to a reference this way).
    Processes children in chunks so the temporaries stay small for 1000s of rows.
    """
    check_layer_shapes(parent, child, parent_index, weights)
    c_rows, d = child.shape
    device = parent.device
    parent_index = parent_index.to(device)
    weights = weights.to(device=device, dtype=torch.float32)
    acc = torch.zeros(parent.shape, dtype=torch.float32, device=device)
    pf = parent.to(torch.float32)
    norms_out = []
    step = _chunk_rows(d)
    for start in range(0, c_rows, step):
        stop = min(c_rows, start + step)
        idx = parent_index[start:stop]
        diff = child[start:stop].to(torch.float32) - pf[idx]
        w = weights[start:stop]
        if quantizer.is_identity:
            norms = row_norms(diff)
            q = diff.mul_(w[:, None])
        else:
            u = uniforms[start:stop] if uniforms is not None else row_uniforms(seeds[start:stop], d, device)
            if isinstance(quantizer, QSGD):
                norms = row_norms(diff, quantizer.bucket_size)
                q = _weighted_qsgd_(diff, norms, u.to(torch.float32), quantizer, w)
            else:  # any other Quantizer: through its public encode/decode
                enc = quantizer.encode(diff, uniforms=u)
                norms = enc.norms
                q = quantizer.decode(enc, d) * w[:, None]
        norms_out.append(norms)
        acc.index_add_(0, idx, q)
    norms = torch.cat(norms_out) if norms_out else torch.zeros(0, 1, device=device)
    if not bool(torch.isfinite(norms).all()):
        return norms
    parent.copy_(pf.add_(acc))
    return norms


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

    ``backend="torch"``, ``"numba"`` or ``"triton"`` forces one. Returns the per-row upload norms (see the torch
    version). All three give the same numbers (module docstring).
    """
    check_backend(backend)
    use_triton = backend == "triton" or (backend == "auto" and parent.is_cuda and _triton_available())
    if use_triton:
        from .kernels import aggregate_layer_triton_

        return aggregate_layer_triton_(parent, child, parent_index, weights, quantizer, seeds)
    if backend == "numba" or (backend == "auto" and cpu_kernels.supports(parent, child, quantizer)):
        return cpu_kernels.aggregate_layer_numba_(parent, child, parent_index, weights, quantizer, seeds)
    return aggregate_layer_torch_(parent, child, parent_index, weights, quantizer, seeds)


def _triton_available() -> bool:
    try:
        from . import kernels  # noqa: F401

        return kernels.TRITON_AVAILABLE
    except Exception:  # pragma: no cover - import problems mean "not available"
        return False
