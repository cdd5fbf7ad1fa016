"""The aggregation into the layer above a multi-process run's cut: every rank compresses and weights its own
children's uploads, then the ranks exchange them (:mod:`.shard` says who holds which rows).

With the "gather" exchange the weighted uploads of every rank are gathered and summed in global child order on
every rank (the operations of one process, bit for bit); with "all_reduce" every rank sums its own children and the
partial sums are all-reduced (fewer bytes, equal to float tolerance).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..compressors import Compressor
from ..kernels import aggregate_layer_

__all__ = ["aggregate_across_ranks", "ordered_sum"]


def ordered_sum(terms: Tensor, parent_index: Tensor, num_parents: int, uploads: Tensor | None) -> Tensor:
    """acc[p] = sum of ``terms[c]`` over p's children c in increasing index order (only ``uploads``, when given),
    accumulated in that order from 0: the fp operations of the fused kernels and the torch reference."""
    kids = torch.arange(terms.shape[0], device=terms.device) if uploads is None else uploads
    pidx = parent_index[kids]
    order = torch.argsort(pidx, stable=True)
    kids, pidx = kids[order], pidx[order]
    counts = torch.bincount(pidx, minlength=num_parents)
    starts = torch.cumsum(counts, 0) - counts
    acc = torch.zeros((num_parents, terms.shape[1]), dtype=terms.dtype, device=terms.device)
    rank = torch.arange(kids.numel(), device=terms.device) - starts[pidx]
    for k in range(int(counts.max()) if counts.numel() else 0):  # the k-th child of every parent, in order
        sel = rank == k
        acc[pidx[sel]] += terms[kids[sel]]
    return acc


def aggregate_across_ranks(parent: Tensor, child: Tensor, parent_index: Tensor, weights: Tensor,
                           compressor: Compressor, seeds: Tensor, backend: str, memory: Tensor | None,
                           uploads: Tensor | None, uploads_global: Tensor | None, global_parent_index: Tensor,
                           exchange: str, comm: object, check: Callable[[Tensor], None],
                           delta: Tensor | None) -> Tensor:
    """Eq. 4/6 into ``parent`` (replicated on every rank) from this rank's ``child`` rows (see the module
    docstring). ``parent_index``/``weights``/``seeds``/``memory``/``uploads``: this rank's children;
    ``uploads_global``: the uploading children of every rank (None: all) and ``global_parent_index`` their parents.
    ``check(norms)`` is called on this rank's upload norms before any exchange (so that a non-finite upload stops
    every rank before a collective). The aggregate goes into ``delta`` when given, else it is added to ``parent``.
    Returns the norms."""
    C = child.shape[0]
    work = torch.float64 if parent.dtype == torch.float64 else torch.float32
    if exchange == "all_reduce":
        partial = torch.zeros(parent.shape, dtype=work, device=parent.device)
        norms = aggregate_layer_(parent, child, parent_index, weights, compressor, seeds, backend, memory=memory,
                                 rows=uploads, out=partial)
        check(norms)
        acc = comm.all_reduce_sum(partial)
    else:
        # every child its own parent: out[c] = 0 + w_c C(x_c), exactly the term one process adds for it
        own = parent.index_select(0, parent_index)
        mine = torch.zeros((C, parent.shape[1]), dtype=work, device=parent.device)
        norms = aggregate_layer_(own, child, torch.arange(C, device=parent.device), weights, compressor, seeds,
                                 backend, memory=memory, rows=uploads, out=mine)
        check(norms)
        terms = torch.cat(comm.all_gather(mine))  # [senders of every rank], in global order
        acc = ordered_sum(terms, global_parent_index.to(parent.device), parent.shape[0],
                          None if uploads_global is None else uploads_global.to(parent.device))
    if delta is not None:
        delta.copy_(acc)
    else:
        parent.copy_(parent.to(work).add_(acc))
    return norms
