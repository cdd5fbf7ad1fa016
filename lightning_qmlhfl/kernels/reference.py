"""The torch reference of one layer's compress-and-aggregate (Eqs. 4 and 6, with error feedback, participation
subsets and the pseudo-gradient output of server optimizers): any device, any dtype, any compressor.

This is the implementation the fused backends (numba on CPU, Triton on CUDA) are tested against number for number.
It processes the children in chunks of ~1 MB so the temporaries stay small for thousands of rows, in two passes:
the upload norms of every participating row first (nothing is written if one is not finite), then the compressed
uploads, memory updates and accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compressors import Compressor, Encoded
from ..hierarchy import check_layer_shapes
from .interface import AggregationRequest, KernelBackend

__all__ = ["aggregate_layer_torch_", "encode_uploads", "TorchBackend"]


def _chunk_rows(num_cols: int, budget_bytes: int = 1 << 20) -> int:
    """Rows per chunk so one fp32 chunk is ~1 MB: the dozen elementwise passes then run in the CPU caches."""
    return max(1, budget_bytes // max(1, 4 * num_cols))


def encode_uploads(
    parent: Tensor, child: Tensor, parent_index: Tensor, quantizer: Compressor, seeds: Tensor
) -> Encoded:
    """The messages of one aggregation event of a QSGD (or identity) layer: norms and level codes."""
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
    quantizer: Compressor,
    seeds: Tensor,
    uniforms: Tensor | None = None,
    *,
    memory: Tensor | None = None,
    rows: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One layer's aggregation in torch (the semantics are :func:`lightning_qmlhfl.kernels.aggregate_layer_`'s);
    returns the per-upload norms [len(rows), buckets] (non-finite if an upload held NaN/Inf; then nothing is
    written). ``uniforms`` [C, P] overrides the seeded draws (tests feed the same draws to a reference this way).
    Arithmetic is fp32 for fp32/fp16/bf16 storage (what the fused kernels do) and fp64 for fp64 storage.
    """
    from . import row_uniforms

    compressor = quantizer
    check_layer_shapes(parent, child, parent_index, weights)
    c_rows, d = child.shape
    device = parent.device
    work = torch.float64 if parent.dtype == torch.float64 else torch.float32
    ef = compressor.error_feedback
    if ef is not None and (memory is None or memory.shape != child.shape):
        raise ValueError(f"{compressor!r} needs its memory [{c_rows}, {d}], got "
                         f"{None if memory is None else tuple(memory.shape)}")
    parent_index = parent_index.to(device)
    rows = torch.arange(c_rows, device=device) if rows is None else rows.to(device=device, dtype=torch.long)
    weights = weights.to(device=device, dtype=work)
    pf = parent.to(work)
    step = _chunk_rows(d)

    def inputs(r: Tensor) -> Tensor:
        x = child[r].to(work) - pf[parent_index[r]]
        if ef == "ef":
            x = x + memory[r].to(work)
        elif ef == "ef21":
            x = x - memory[r].to(work)
        return x

    chunks = [rows[i:i + step] for i in range(0, rows.numel(), step)]
    norms_out = [compressor.norms(inputs(r)) for r in chunks]
    norms = torch.cat(norms_out) if norms_out else torch.zeros(0, 1, device=device)
    if not bool(torch.isfinite(norms).all()):
        return norms
    acc = torch.zeros(parent.shape, dtype=work, device=device)
    for r, n in zip(chunks, norms_out):
        x = inputs(r)
        u = None
        if compressor.uses_uniforms:
            u = uniforms[r] if uniforms is not None else row_uniforms(seeds[r.cpu()], d, device)
        q = compressor.compress_(x.clone() if ef is not None else x, n.to(work), u)
        if ef == "ef":
            memory[r] = (x - q).to(memory.dtype)
            up = q
        elif ef == "ef21":
            up = memory[r].to(work) + q
            memory[r] = up.to(memory.dtype)
        else:
            up = q
        acc.index_add_(0, parent_index[r], up * weights[r][:, None])
    if out is not None:
        out.copy_(acc)
    else:
        parent.copy_(pf.add_(acc))
    return norms


class TorchBackend(KernelBackend):
    """The reference: every request, on any device and dtype."""

    name = "torch"

    def supports(self, request: AggregationRequest) -> bool:
        return True

    def run(self, request: AggregationRequest) -> Tensor:
        r = request
        return aggregate_layer_torch_(r.parent, r.child, r.parent_index, r.weights, r.compressor, r.seeds,
                                      memory=r.memory, rows=r.rows, out=r.out)
