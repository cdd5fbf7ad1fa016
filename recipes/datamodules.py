"""The recipes' built-in LightningDataModule: MNIST or CIFAR-10 in memory, with a seeded, label-stratified
validation split of the training data.

``python -m recipes.mnist`` builds :class:`ImageDataModule` from the ``dataset`` config group; a user's own
``datamodule._target_=my_package.MyDataModule`` replaces it (any LightningDataModule with a ``train_dataloader``;
``val_dataloader`` serves model selection, ``test_dataloader`` the final test evaluation).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from recipes.datasets import DatasetSplits, get_dataset, normalize, random_crop_flip, resolve_data_dir
from recipes.options import check_fraction, int_option
from recipes.splits import stratified_split

__all__ = ["ImageDataModule", "crop_flip_transform"]


def crop_flip_transform(batch: Any, generator: torch.Generator) -> list[Tensor]:
    """The strategy's ``train_transform`` for CIFAR: random crop (reflect padding 4) and horizontal flip of every
    image of a stacked per-device batch ``([N_tot, B, C, H, W], [N_tot, B])``, drawn from ``generator``."""
    x, y = batch
    return [random_crop_flip(x, padding=4, generator=generator), y]


class ImageDataModule(L.LightningDataModule):
    """MNIST or CIFAR-10 as normalised float tensors, split into train / validation / test.

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        data_dir: data directory (null: ``$QMLHFL_DATA``, else ``./data``; :func:`recipes.datasets.resolve_data_dir`).
        download: fetch missing files into ``data_dir`` (md5-checked, atomic; never into a read-only directory).
        mirror: download location override (:func:`recipes.downloads.mirror_urls`).
        batch_size: the per-device mini-batch size of the train dataloader.
        val_fraction: share of the (subset of the) training split held out for validation, stratified by label,
            in ``[0, 1)``. ``0``: no validation split; the validation dataloader is then the test set (the recipes
            before the validation split), and :attr:`validation_is_test` is True.
        split_seed: seeds which samples of each class are held out (the same split for every run seed).
        train_subset: null, or take the first ``n`` training images before splitting (quick runs).
        test_subset: null, or the first ``n`` test images.
        augment: the CIFAR crop/flip as the strategy's ``train_transform`` (:attr:`train_transform`).
        eval_batch_size: batch size of the validation and test dataloaders.

    After :meth:`setup`: ``train_index`` / ``val_index`` (int64 positions into the full training split),
    ``train`` / ``val`` / ``test`` TensorDatasets of ``(float [C, H, W], int64 label)``.
    """

    def __init__(self, name: str = "mnist", data_dir: str | os.PathLike | None = None, download: bool = True,
                 mirror: Any = None, batch_size: int = 32, val_fraction: float = 0.1, split_seed: int = 0,
                 train_subset: int | None = None, test_subset: int | None = None, augment: bool = False,
                 eval_batch_size: int = 1000) -> None:
        super().__init__()
        self.name = str(name)
        self.data_dir = data_dir
        self.download = bool(download)
        self.mirror = mirror
        self.batch_size = int_option(batch_size, "dataset.batch_size", 1, allow_none=False)
        self.val_fraction = check_fraction(val_fraction, "dataset.val_fraction")
        self.split_seed = int(split_seed)
        self.train_subset = int_option(train_subset, "dataset.train_subset", 1)
        self.test_subset = int_option(test_subset, "dataset.test_subset", 1)
        self.augment = bool(augment)
        self.eval_batch_size = int_option(eval_batch_size, "eval.batch_size", 1, allow_none=False)
        self.train: TensorDataset | None = None
        self.val: TensorDataset | None = None
        self.test: TensorDataset | None = None
        self.train_index: Tensor | None = None
        self.val_index: Tensor | None = None

    @property
    def validation_is_test(self) -> bool:
        """True when there is no validation split (``val_fraction == 0``, or a subset too small to hold one out)
        and validation runs on the test set."""
        return self.val_fraction == 0.0 if self.train is None else self.val is None

    @property
    def train_transform(self) -> Callable[[Any, torch.Generator], Any] | None:
        """The batched augmentation the strategy applies to every stacked training batch (None: none)."""
        return crop_flip_transform if self.augment else None

    def load(self) -> DatasetSplits:
        """Both splits as uint8 images and labels (:func:`~recipes.datasets.get_dataset` from ``data_dir``); a
        subclass reading another source overrides this and keeps the split, normalisation and augmentation."""
        return get_dataset(self.name, resolve_data_dir(self.data_dir), download=self.download, mirror=self.mirror)

    def setup(self, stage: str | None = None) -> None:
        """Load both splits once (downloading if allowed), normalise, split off the validation set."""
        if self.train is not None:
            return
        ds = self.load()
        images, labels = ds.train_images, ds.train_labels
        if self.train_subset is not None:
            images, labels = images[: self.train_subset], labels[: self.train_subset]
        g = torch.Generator().manual_seed(self.split_seed)
        self.train_index, self.val_index = stratified_split(labels, self.val_fraction, g)
        x = normalize(images, ds.mean, ds.std)
        self.train = TensorDataset(x[self.train_index], labels[self.train_index])
        self.val = TensorDataset(x[self.val_index], labels[self.val_index]) if self.val_index.numel() else None
        tx, ty = ds.test_images, ds.test_labels
        if self.test_subset is not None:
            tx, ty = tx[: self.test_subset], ty[: self.test_subset]
        self.test = TensorDataset(normalize(tx, ds.mean, ds.std), ty)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.test if self.val is None else self.val, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.test, batch_size=self.eval_batch_size)

    def sizes(self) -> dict[str, int]:
        """Samples per split: ``{"train": ..., "val": ..., "test": ...}`` (val 0 without a validation split)."""
        self.setup()
        return {"train": len(self.train), "val": 0 if self.val is None else len(self.val), "test": len(self.test)}
