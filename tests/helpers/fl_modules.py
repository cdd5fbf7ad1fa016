"""LightningModules written the ordinary way (no QMLHFL-specific code) and a small real MNIST subset."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from recipes.datasets import load_mnist

DATA = Path(os.environ.get("QMLHFL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


class MnistCNN(L.LightningModule):
    """Conv + linear layers, self.log in training_step, a torchmetrics Accuracy in validation_step."""

    def __init__(self, lr: float = 0.05, dropout: float = 0.0, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, 6, 5, stride=2)  # 28 -> 12
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(6 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(h))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        if self.hparams.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.hparams.lr)
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": sched}


def mnist_subset(n_train: int = 3000, n_val: int = 1000):
    x, y = load_mnist(DATA, train=True)
    xv, yv = load_mnist(DATA, train=False)
    norm = lambda t: (t.float() / 255.0 - 0.1307) / 0.3081  # noqa: E731
    return TensorDataset(norm(x[:n_train]), y[:n_train]), TensorDataset(norm(xv[:n_val]), yv[:n_val])


def loaders(n_train: int = 3000, n_val: int = 1000, batch_size: int = 16):
    tr, va = mnist_subset(n_train, n_val)
    return DataLoader(tr, batch_size=batch_size, shuffle=True), DataLoader(va, batch_size=500)
