"""A CIFAR-10 excerpt small enough to travel to the GPU machine, and the datamodule that trains on it.

The GPU machine reaches no network and takes at most 64 MiB of working tree plus carried files, so the 178 MB of
CIFAR-10 cannot go with it. :func:`write_excerpt` packs real images instead: the first ``train`` training images
(default 10,000 = the whole ``data_batch_1``) and the first ``test`` test images (default 2,000 of
``test_batch``) into one uncompressed ``.npz`` of uint8 arrays (about 36.9 MB), written here by
``bench/gpu/prepare.py``. :class:`CifarExcerpt` is the recipes' :class:`~recipes.datamodules.ImageDataModule`
reading that file instead of the full dataset: the same validation split, normalisation (CIFAR-10's full-training-set
statistics) and crop/flip augmentation. It is meant for timing the recipe end to end on a GPU, not for accuracy
comparable with full CIFAR-10 runs::

    python -m recipes.cifar datamodule._target_=bench.gpu.cifar_excerpt.CifarExcerpt \\
        +datamodule.path=.gpu/data/cifar10_excerpt.npz +datamodule.augment=true trainer.accelerator=gpu

The file holds plain arrays and is read with ``allow_pickle=False``: it cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.datamodules import ImageDataModule
from recipes.datasets import DatasetError, DatasetSplits, dataset_stats, load_cifar10

__all__ = ["CifarExcerpt", "write_excerpt", "read_excerpt"]

_KEYS = {"train_images": (np.uint8, 4), "train_labels": (np.int64, 1), "test_images": (np.uint8, 4),
         "test_labels": (np.int64, 1)}


def write_excerpt(cifar_root: str | os.PathLike[str], dest: str | os.PathLike[str], train: int = 10_000,
                  test: int = 2_000) -> dict[str, int]:
    """Pack the first ``train`` training and ``test`` test images of the CIFAR-10 copy under ``cifar_root``
    (md5-checked by the loader) into ``dest`` (.npz, uncompressed: CIFAR's pixels barely compress). Returns the
    counts and the file size."""
    if not (1 <= train <= 50_000 and 1 <= test <= 10_000):
        raise ValueError(f"train must be in 1..50000 and test in 1..10000, got train={train}, test={test}")
    tx, ty = load_cifar10(cifar_root, train=True)
    vx, vy = load_cifar10(cifar_root, train=False)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp.npz")
    np.savez(tmp, train_images=tx[:train].numpy(), train_labels=ty[:train].numpy(),
             test_images=vx[:test].numpy(), test_labels=vy[:test].numpy())
    tmp.replace(dest)
    return {"train": train, "test": test, "bytes": dest.stat().st_size}


def read_excerpt(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The four arrays of an excerpt file as tensors, each checked (dtype, rank, 3x32x32 images, labels 0..9)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no CIFAR-10 excerpt there; write one with `python bench/gpu/prepare.py` "
                           f"(it packs the first images of a full CIFAR-10 copy)")
    with np.load(path, allow_pickle=False) as f:
        missing = sorted(set(_KEYS) - set(f.files))
        if missing:
            raise DatasetError(f"{path}: not a CIFAR-10 excerpt: missing arrays {missing} (has {sorted(f.files)})")
        out = {}
        for key, (dtype, ndim) in _KEYS.items():
            try:
                a = f[key]
            except ValueError as e:  # an object array: loading it would unpickle
                raise DatasetError(f"{path}: {key} holds pickled objects, which are never loaded ({e})") from None
            if a.dtype != dtype or a.ndim != ndim:
                raise DatasetError(f"{path}: {key} must be {np.dtype(dtype)} of rank {ndim}, got {a.dtype} {a.shape}")
            out[key] = torch.from_numpy(a.copy())
    for split in ("train", "test"):
        x, y = out[f"{split}_images"], out[f"{split}_labels"]
        if x.shape[1:] != (3, 32, 32) or y.shape != (x.shape[0],):
            raise DatasetError(f"{path}: {split} images must be [n, 3, 32, 32] with n labels, got "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DatasetError(f"{path}: {split} labels out of range 0..9")
    return out


class CifarExcerpt(ImageDataModule):
    """:class:`~recipes.datamodules.ImageDataModule` for CIFAR-10 over an excerpt file (:func:`write_excerpt`).

    Args:
        path: the ``.npz`` written by :func:`write_excerpt`.
        **kwargs: the other arguments of :class:`~recipes.datamodules.ImageDataModule` (``batch_size``,
            ``val_fraction``, ``split_seed``, ``augment``, ``train_subset``, ``test_subset``, ``eval_batch_size``).
    """

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        if "name" in kwargs and kwargs["name"] != "cifar10":
            raise ValueError(f"CifarExcerpt holds CIFAR-10, got name={kwargs['name']!r}")
        kwargs.pop("name", None)
        super().__init__(name="cifar10", download=False, **kwargs)
        self.path = Path(path)

    def load(self) -> DatasetSplits:
        a = read_excerpt(self.path)
        mean, std = dataset_stats("cifar10")
        return DatasetSplits("cifar10", a["train_images"], a["train_labels"], a["test_images"], a["test_labels"],
                             mean, std)
