"""A user's own LightningModule, LightningDataModule, partitioner and compressor, for the recipes' ``_target_``
options (``model._target_=helpers.user_modules.TinyNet +model.hidden=16``). Synthetic data: no dataset files."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qmlhfl.compressors import QSGD
from lightning_qmlhfl.data import IID, Partitioner


class TinyNet(L.LightningModule):
    """A two-layer MLP on ``[B, features]`` inputs; logs ``val_acc`` / ``val_loss`` like a Lightning user would."""

    def __init__(self, features: int = 8, hidden: int = 32, classes: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictBatchNet(TinyNet):
    """Batches are dicts {"x", "y"}: the recipes' evaluation needs its ``per_sample_metrics``."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["x"]).argmax(1) == batch["y"]).float().mean())

    def per_sample_metrics(self, batch):
        logits = self(batch["x"])
        return {"loss": F.cross_entropy(logits, batch["y"], reduction="none"),
                "acc": (logits.argmax(1) == batch["y"]).float()}


class BlobsDataModule(L.LightningDataModule):
    """Gaussian blobs: ``classes`` clusters in ``features`` dimensions; train / val / test of the given sizes."""

    def __init__(self, n_train: int = 800, n_val: int = 200, n_test: int = 200, features: int = 8, classes: int = 4,
                 batch_size: int = 16, seed: int = 0, dict_batches: bool = False) -> None:
        super().__init__()
        self.sizes_ = (n_train, n_val, n_test)
        self.features, self.classes, self.batch_size, self.seed = features, classes, batch_size, seed
        self.dict_batches = dict_batches
        self.setup_calls: list[str | None] = []

    def setup(self, stage: str | None = None) -> None:
        self.setup_calls.append(stage)
        g = torch.Generator().manual_seed(self.seed)
        centers = 3 * torch.randn(self.classes, self.features, generator=g)
        n = sum(self.sizes_)
        y = torch.randint(0, self.classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, self.features, generator=g)
        a, b, _ = self.sizes_
        self.parts = [(x[:a], y[:a]), (x[a:a + b], y[a:a + b]), (x[a + b:], y[a + b:])]

    def _loader(self, i: int, shuffle: bool, batch_size: int) -> DataLoader:
        x, y = self.parts[i]
        if self.dict_batches:
            ds = [{"x": x[j], "y": y[j]} for j in range(len(y))]
            return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1, False, 100)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2, False, 100)


class FirstHalfIID(Partitioner):
    """A user partitioner: IID over the first ``share`` of the samples only (the rest is never used)."""

    needs_labels = False

    def __init__(self, share: float = 0.5) -> None:
        self.share = share

    def __call__(self, labels, hierarchy, seed=0, num_samples=None):
        n = int(num_samples if labels is None else len(labels))
        return IID()(None, hierarchy, seed=seed, num_samples=int(self.share * n))

    def _split(self, labels, index, parts, g):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"FirstHalfIID(share={self.share})"


def coarse_qsgd(levels: int = 2) -> QSGD:
    """A user compressor factory (any callable returning a Compressor)."""
    return QSGD(levels, bucket_size=None)


class AutoEncoder(L.LightningModule):
    """Not a classifier: an MLP autoencoder on flattened images. ``forward`` takes ``[B, features]`` (a batch of
    images ``[B, 1, 28, 28]`` fed to it directly fails in its first Linear); the loss is the reconstruction error,
    logged as ``train_loss``, ``val_loss`` and ``test_loss`` (no accuracy anywhere)."""

    def __init__(self, features: int = 784, code: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, code))
        self.decoder = nn.Sequential(nn.Linear(code, 64), nn.ReLU(), nn.Linear(64, features))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def reconstruction_error(self, batch) -> torch.Tensor:
        x = batch[0].flatten(1)
        return F.mse_loss(self(x), x)

    def training_step(self, batch, batch_idx):
        loss = self.reconstruction_error(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.reconstruction_error(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.reconstruction_error(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class AutoEncoderWithoutTest(AutoEncoder):
    """The autoencoder without a ``test_step``: nothing to test it with."""

    test_step = L.LightningModule.test_step


class LossOnlyNet(TinyNet):
    """A classifier whose validation logs only ``val_loss`` (no accuracy) and that has no ``test_step``."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


class SilentNet(TinyNet):
    """A classifier that logs nothing in validation."""

    def validation_step(self, batch, batch_idx):
        self(batch[0])


class NaNAt(TinyNet):
    """TinyNet whose loss turns NaN at local step ``nan_step`` (1-based): the strategy stops with
    NonFiniteUpdateError at the next aggregation."""

    def __init__(self, nan_step: int = 3, features: int = 8, hidden: int = 32, classes: int = 4,
                 lr: float = 0.1) -> None:
        super().__init__(features, hidden, classes, lr)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step + 1 == self.nan_step:
            loss = loss * float("nan")
        return loss
