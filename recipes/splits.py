"""Seeded, label-stratified hold-out splits (no Lightning here): the validation split of a training set and every
device's held-out local data.

:func:`stratified_split` holds out ``k = round(fraction * n)`` samples (clipped to ``[min_held, n - min_kept]``) and
allocates them over the classes in proportion to the class counts by the largest-remainder rule, so the held-out part
has exactly ``k`` samples and the class proportions of the whole up to one sample per class. Which samples of a class
are held out is a seeded random draw; both returned index sets are sorted (the dataset's order is kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stratified_split"]


def stratified_split(labels: Tensor | None, fraction: float, generator: torch.Generator, *,
                     num_samples: int | None = None, min_held: int = 0, min_kept: int = 1
                     ) -> tuple[Tensor, Tensor]:
    """Split positions ``0..n-1`` into (kept, held-out), holding out ``round(fraction * n)`` samples stratified by
    label.

    Args:
        labels: int64 ``[n]`` class ids, or None for an unstratified (uniformly random) split of ``num_samples``.
        fraction: share held out, in ``[0, 1)``.
        generator: the seeded draw of which samples of each class are held out.
        num_samples: ``n`` when ``labels`` is None.
        min_held: at least this many held out (if ``n - min_kept`` allows).
        min_kept: at least this many kept.

    Returns:
        ``(kept, held)``: sorted int64 position tensors, disjoint, together ``0..n-1``.
    """
    if labels is None:
        if num_samples is None:
            raise ValueError("stratified_split needs labels or num_samples")
        labels = torch.zeros(int(num_samples), dtype=torch.long)
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    n = labels.numel()
    k = int(round(fraction * n))
    k = max(k, min(min_held, n - min_kept))
    k = max(0, min(k, n - min_kept))
    if k == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * (k / n)
    take = quota.floor().long()
    rest = k - int(take.sum())
    if rest > 0:  # largest remainders first; ties broken by the larger class, then the smaller class id
        remainder = quota - take.double()
        order = sorted(range(len(classes)), key=lambda c: (-float(remainder[c]), -int(counts[c]), int(classes[c])))
        for c in order[:rest]:
            take[c] += 1
    held = []
    for c, t in zip(classes.tolist(), take.tolist()):
        if t == 0:
            continue
        pos = (labels == c).nonzero().flatten()
        held.append(pos[torch.randperm(pos.numel(), generator=generator)[:t]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx
