"""Modules written against the standalone ``pytorch_lightning`` package (``import pytorch_lightning as pl``), as many
tutorials still write them, for the recipes' ``model._target_`` path: an MNIST classifier that logs accuracy, an
autoencoder that logs only losses, and a user callback of that package. ``LClassifier`` is the classifier's body on
``lightning`` (the reference a ``pytorch_lightning`` run must match). Imported only where ``pytorch_lightning`` is
installed."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class _Classifier:
    """A small MLP on MNIST images (``[B, 1, 28, 28]``); logs ``val_loss`` / ``val_acc``."""

    def __init__(self, hidden: int = 64, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

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
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class PLClassifier(_Classifier, pl.LightningModule):
    """The classifier as a ``pytorch_lightning`` module."""


class LClassifier(_Classifier, L.LightningModule):
    """The same classifier as a ``lightning`` module."""


def pl_classifier_factory(hidden: int = 64) -> PLClassifier:
    """A function (not a class) that builds a ``pytorch_lightning`` module."""
    return PLClassifier(hidden)


class PLAutoEncoder(pl.LightningModule):
    """Not a classifier: reconstructs flattened images; logs ``val_loss`` and ``test_loss`` only."""

    def __init__(self, code: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, code))
        self.decoder = nn.Sequential(nn.Linear(code, 64), nn.ReLU(), nn.Linear(64, 784))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def _error(self, batch) -> torch.Tensor:
        x = batch[0].flatten(1)
        return F.mse_loss(self(x), x)

    def training_step(self, batch, batch_idx):
        return self._error(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._error(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._error(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CountRounds(pl.Callback):
    """A user's ``pytorch_lightning`` callback: counts the epochs (global rounds) it saw end and writes the count
    and the Trainer's package into ``path`` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path, self.rounds = Path(path), 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rounds += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps({"rounds": self.rounds, "trainer": type(trainer).__module__}))
