"""The torch reference of one layer's quantize-and-aggregate (Eqs. 4 and 6): any device, any dtype, any quantizer.

This is the implementation the fused backends (numba on CPU, Triton on CUDA) are tested against number for number.
It processes the children in chunks of ~1 MB so the temporaries stay small for thousands of rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..hierarchy import check_layer_shapes
from ..quantizers import QSGD, Encoded, Quantizer, row_norms

__all__ = ["aggregate_layer_torch_", "encode_uploads"]


def _chunk_rows(num_cols: int, budget_bytes: int = 1 << 20) -> int:
    """Rows per chunk so one fp32 chunk is ~1 MB: the dozen elementwise passes then run in the CPU caches."""
    return max(1, budget_bytes // max(1, 4 * num_cols))


def _weighted_qsgd_(diff: Tensor, norms: Tensor, uniforms: Tensor, quantizer: QSGD, weights: Tensor) -> Tensor:
    """w_c * Q(diff_c) for the rows of ``diff`` (float32, overwritten), number for number what
    ``quantizer.decode(quantizer.encode(diff, uniforms)) * w`` gives (and what the fused kernels compute), in a
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
    from . import row_uniforms

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
    Arithmetic is fp32 for fp32/fp16/bf16 storage (what the fused kernels do) and fp64 for fp64 storage.
    """
    from . import row_uniforms

    check_layer_shapes(parent, child, parent_index, weights)
    c_rows, d = child.shape
    device = parent.device
    work = torch.float64 if parent.dtype == torch.float64 else torch.float32
    parent_index = parent_index.to(device)
    weights = weights.to(device=device, dtype=work)
    acc = torch.zeros(parent.shape, dtype=work, device=device)
    pf = parent.to(work)
    norms_out = []
    step = _chunk_rows(d)
    for start in range(0, c_rows, step):
        stop = min(c_rows, start + step)
        idx = parent_index[start:stop]
        diff = child[start:stop].to(work) - pf[idx]
        w = weights[start:stop]
        if quantizer.is_identity:
            norms = row_norms(diff)
            q = diff.mul_(w[:, None])
        else:
            u = uniforms[start:stop] if uniforms is not None else row_uniforms(seeds[start:stop], d, device)
            if isinstance(quantizer, QSGD):
                norms = row_norms(diff, quantizer.bucket_size)
                q = _weighted_qsgd_(diff, norms.to(work), u.to(work), quantizer, w)
            else:  # any other Quantizer: through its public encode/decode
                enc = quantizer.encode(diff, uniforms=u)
                norms = enc.norms
                q = quantizer.decode(enc, d).to(work) * w[:, None]
        norms_out.append(norms)
        acc.index_add_(0, idx, q)
    norms = torch.cat(norms_out) if norms_out else torch.zeros(0, 1, device=device)
    if not bool(torch.isfinite(norms).all()):
        return norms
    parent.copy_(pf.add_(acc))
    return norms
