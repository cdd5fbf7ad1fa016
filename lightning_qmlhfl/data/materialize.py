"""Read a map-style dataset once into a pytree of tensors (the strategy keeps the training data resident on the
training device and gathers every device's mini-batch by indexing), and find its labels for label-based
partitioners.

Samples may be tensors, numbers, tuples, lists, dicts or any nesting of them, of any dtype; the result has the
structure of one collated batch whose leaves have the dataset's length as leading dimension.

The dataloader's ``collate_fn`` is honoured: it is applied to chunks of consecutive samples when the dataset is
materialised. A ``collate_fn`` whose output shape depends on the batch (padding to the longest sequence of the
batch) makes the chunks disagree in shape; the whole dataset is then collated in one call, i.e. padded to the
longest sequence of the dataset. A ``collate_fn`` that draws random numbers (augmentation) is applied once here,
not per step: per-step augmentation belongs in the strategy's ``train_transform``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, TensorDataset, default_collate

__all__ = ["materialize_dataset", "extract_labels", "map_labels", "num_samples", "DatasetTooLargeError", "available_memory_bytes"]

_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


class DatasetTooLargeError(MemoryError):
    """The training dataset would not fit in memory as tensors."""


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory on ``device`` in bytes: MemAvailable of /proc/meminfo (CPU, Linux; else the physical pages the
    OS reports free), ``torch.cuda.mem_get_info`` (CUDA); ``None`` when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _check_size(dataset: Any, n: int, collate: Callable, max_bytes: int | None, device: torch.device) -> None:
    """Estimate the materialised size from the first sample; raise :class:`DatasetTooLargeError` above the limit
    (default: half the free memory of ``device``)."""
    first = collate([dataset[0]])
    per_sample = sum(torch.as_tensor(x).element_size() * torch.as_tensor(x).numel() for x in tree_flatten(first)[0])
    total = per_sample * n
    if max_bytes is None:
        free = available_memory_bytes(device)
        if free is None:
            return
        limit, why = free // 2, f"half the {_gb(free)} free on {device}"
    else:
        limit, why = int(max_bytes), "max_dataset_bytes"
    if total > limit:
        raise DatasetTooLargeError(
            f"the training dataset needs about {_gb(total)} as tensors ({n:,} samples x {per_sample:,} bytes), more "
            f"than the limit of {_gb(limit)} ({why}): the strategy keeps the whole training set resident on the "
            f"training device. Use a subset, a smaller sample representation, or raise max_dataset_bytes="
        )


def materialize_dataset(dataset: Any, collate_fn: Callable | None = None, chunk: int = 4096,
                        max_bytes: int | None = None, device: torch.device | str = "cpu") -> Any:
    """Read a map-style dataset once into a pytree of tensors with leading dimension len(dataset).

    ``max_bytes``: refuse datasets whose estimated size exceeds it (default: half the free memory of ``device``,
    where the data will live), with a :class:`DatasetTooLargeError` that gives the size.
    """
    try:
        n = len(dataset)
    except TypeError as e:
        raise TypeError(
            f"the train dataloader's dataset ({type(dataset).__name__}) must be map-style (have __len__ and "
            f"__getitem__): iterable-style datasets cannot be partitioned over devices"
        ) from e
    if n == 0:
        raise ValueError("the train dataloader's dataset is empty")
    collate = collate_fn or default_collate
    _check_size(dataset, n, collate, max_bytes, torch.device(device))
    if type(dataset) is TensorDataset and collate is default_collate:
        # its tensors already are the collated whole (default_collate turns a batch of tuples into a list): taken
        # in one go instead of indexed sample by sample (0.4 s for MNIST), the same numbers, structure, dtypes and
        # (contiguous, as collating makes them) layout: a strided tensor would change which kernels later run, so
        # it is copied contiguous. A contiguous one is used as it is, not copied (the strategy only reads its
        # training data; a copy doubled the dataset's memory: MNIST's 188 MB, bench/RESULTS.md)
        return [t.detach() if t.is_contiguous() else t.detach().clone(memory_format=torch.contiguous_format)
                for t in dataset.tensors]
    loader = DataLoader(dataset, batch_size=chunk, shuffle=False, collate_fn=collate)
    parts = []
    spec = None
    for b in loader:
        leaves, this_spec = tree_flatten(b)
        if spec is not None and this_spec != spec:
            raise ValueError(f"collate_fn returned batches of different structures: {spec} and {this_spec}")
        spec = this_spec
        parts.append([torch.as_tensor(x) for x in leaves])
    if len(parts) > 1 and any(len({p[i].shape[1:] for p in parts}) > 1 for i in range(len(parts[0]))):
        # batch-dependent shapes (padding): collate everything at once
        leaves, spec = tree_flatten(collate([dataset[i] for i in range(n)]))
        return tree_unflatten([torch.as_tensor(x) for x in leaves], spec)
    leaves = [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]
    for x in leaves:
        if x.dim() == 0 or x.shape[0] != n:
            raise ValueError(
                f"collate_fn must return batches whose tensors have the batch as leading dimension; got a leaf of "
                f"shape {tuple(x.shape)} for {n} samples"
            )
    return tree_unflatten(leaves, spec)


def extract_labels(data: Any, label_key: str | int | None = None, label_fn: Callable[[Any], Tensor] | None = None
                   ) -> Tensor:
    """One class id per sample, int64 [n], for the label-based partitioners.

    ``label_fn(data) -> Tensor[n]`` derives it from the materialised data (e.g.
    ``lambda data: data["labels"][:, 0]`` for sequence targets); otherwise the labels are element ``label_key``
    (default 1) of tuple samples, or key ``label_key`` (default one of label/labels/y/target/targets) of dicts.
    Raises ValueError saying what was found and how to pass ``label_fn`` when there is no 1-D class id tensor.
    """
    n = num_samples(data)
    hint = ("Label-based partitioners (Dirichlet, Shards) need one class id per sample: pass label_fn=lambda data: "
            "... returning an integer tensor [n] from the materialised data (a pytree like one batch with the "
            "whole dataset), or use IID(), which needs no labels")
    if label_fn is not None:
        y = torch.as_tensor(label_fn(data))
        where = "label_fn(data)"
    elif isinstance(data, dict):
        keys = [label_key] if label_key is not None else [k for k in _LABEL_KEYS if k in data]
        if not keys or keys[0] not in data:
            raise ValueError(
                f"cannot find the labels in dict samples with keys {sorted(data)} (looked for "
                f"{list(_LABEL_KEYS) if label_key is None else label_key!r}; pass label_key=...). {hint}"
            )
        y, where = data[keys[0]], f"samples[{keys[0]!r}]"
    elif isinstance(data, (list, tuple)):
        idx = 1 if label_key is None else int(label_key)
        if len(data) <= idx:
            raise ValueError(f"samples have {len(data)} element(s); labels expected at position {idx}. {hint}")
        y, where = data[idx], f"samples[{idx}]"
    else:
        raise ValueError(f"samples are single tensors, without labels. {hint}")
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"{where} is not one class id per sample: dtype {y.dtype}, shape {tuple(y.shape)} for {n} samples "
            f"(need an integer tensor of shape ({n},)). {hint}"
        )
    return y.long()


def map_labels(batch: Any, fn: Callable[[Tensor], Tensor], label_key: str | int | None = None) -> Any:
    """``batch`` with its labels (found as :func:`extract_labels` finds them, without ``label_fn``) replaced by
    ``fn(labels)``; the other leaves are the same objects. Raises ValueError when the batch has no labels there."""
    if isinstance(batch, dict):
        keys = [label_key] if label_key is not None else [k for k in _LABEL_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            raise ValueError(f"cannot find the labels in dict batches with keys {sorted(batch)} (looked for "
                             f"{list(_LABEL_KEYS) if label_key is None else label_key!r}); pass label_key=...")
        return {**batch, keys[0]: fn(batch[keys[0]])}
    if isinstance(batch, (list, tuple)):
        idx = 1 if label_key is None else int(label_key)
        if len(batch) <= idx:
            raise ValueError(f"batches have {len(batch)} element(s); labels expected at position {idx}")
        out = list(batch)
        out[idx] = fn(batch[idx])
        return type(batch)(out) if isinstance(batch, tuple) else out
    raise ValueError("batches are single tensors, without labels to flip")


def num_samples(data: Any) -> int:
    """Leading dimension of a materialised dataset."""
    leaves = tree_flatten(data)[0]
    if not leaves:
        raise ValueError("the materialised dataset holds no tensors")
    return int(leaves[0].shape[0])

