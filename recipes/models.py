"""Model zoo for the recipes: ordinary LightningModules, written the way a user would write them.

Nothing here knows about federated learning: the QMLHFL strategy trains these unmodified modules. Each
model takes a batch ``(x, y)`` with ``x`` an already normalised float image batch ``[B, C, H, W]`` and
``y`` int64 class labels ``[B]``, and logs ``train_loss``, ``val_loss``/``val_acc`` and
``test_loss``/``test_acc``.

Registry (:func:`build_model`), with parameter counts at default settings:

- ``lenet``: :class:`LeNet`, 21,840. MNIST, the HierFAVG predecessor's LeNet.
- ``mlp``: :class:`MLP`, 159,010. MNIST, 784-200-10 (hidden sizes configurable).
- ``cifar_cnn3``: :class:`CifarCNN3`, 5,852,170. CIFAR-10, the predecessor's 3-block CNN (BatchNorm).
- ``cifar_small``: :class:`CifarSmallCNN`, 225,034. CIFAR-10, small, BatchNorm-free, fast on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "MODEL_NAMES",
    "CifarCNN3",
    "CifarSmallCNN",
    "ImageClassifier",
    "LeNet",
    "MLP",
    "build_model",
    "model_target",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

OptimizerSpec = str | Callable[..., torch.optim.Optimizer]


def _optimizer_label(optimizer: OptimizerSpec) -> str:
    """A short, checkpoint-safe description of an optimizer spec (a name, or the class of a partial)."""
    if isinstance(optimizer, str):
        return optimizer.lower()
    func = getattr(optimizer, "func", optimizer)
    bound = getattr(optimizer, "keywords", {}) or {}
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(bound.items()))
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}({args})"


def _hparams_ignore(optimizer: OptimizerSpec) -> list[str] | None:
    """Keep a callable optimizer out of the saved hyperparameters (checkpoints load with weights_only=True)."""
    return None if isinstance(optimizer, str) else ["optimizer"]


class ImageClassifier(L.LightningModule):
    """Shared training/eval logic: cross-entropy loss, micro-averaged accuracy, SGD or Adam.

    Subclasses build their layers and implement :meth:`forward` (``[B, C, H, W]`` float -> ``[B, 10]`` logits).

    Args:
        lr: learning rate (> 0).
        momentum: SGD momentum in [0, 1); ignored by Adam.
        weight_decay: L2 penalty (>= 0) passed to the optimizer.
        optimizer: ``"sgd"`` or ``"adam"``, or a callable ``f(params, **kw) -> Optimizer`` such as Hydra's
            ``{_target_: torch.optim.AdamW, _partial_: true, weight_decay: 0.01}``
            (``model.optimizer._target_=...`` on the command line). A callable gets ``lr=lr`` unless it binds its
            own ``lr``; ``momentum`` and ``weight_decay`` must then be set on the callable (they must stay 0 here).
            The strategy accepts element-wise optimizers only (SGD, Adam, AdamW, RMSprop, Adagrad).
        num_classes: number of classes (logits per sample).
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSpec = "sgd",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if callable(optimizer) and not isinstance(optimizer, str):
            if momentum or weight_decay:
                raise ValueError(
                    f"momentum={momentum} / weight_decay={weight_decay} apply to the named optimizers only; with a "
                    f"callable optimizer ({_optimizer_label(optimizer)}) set them on it (model.optimizer.momentum=..., "
                    f"model.optimizer.weight_decay=...) and leave model.momentum / model.weight_decay at 0"
                )
            self.optimizer_fn: Callable[..., torch.optim.Optimizer] | None = optimizer
        elif str(optimizer).lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}, or a callable "
                             f"(model.optimizer._target_=torch.optim.AdamW +model.optimizer._partial_=true)")
        else:
            self.optimizer_fn = None
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.optimizer_name = _optimizer_label(optimizer)
        self.num_classes = int(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc(logits, y)
        # sync_dist: under strategy=qmlhfl_ddp every rank validates its part of the set (a no-op in one process)
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_acc", acc, on_epoch=True, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def per_sample_metrics(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Per-sample cross-entropy and correctness (``{"loss": [B], "acc": [B]}``): the recipes' test curve and
        per-device evaluation (:mod:`recipes.evaluation`)."""
        from recipes.evaluation import classification_metrics

        return classification_metrics(self(batch[0]), batch[1])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_fn is not None:
            bound = getattr(self.optimizer_fn, "keywords", {}) or {}
            return self.optimizer_fn(self.parameters(), **({} if "lr" in bound else {"lr": self.lr}))
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class LeNet(ImageClassifier):
    """MNIST LeNet of the HierFAVG predecessor: exactly 21,840 parameters.

    conv(1->10, 5x5) -> maxpool 2 -> relu -> conv(10->20, 5x5) -> dropout2d -> maxpool 2 -> relu
    -> flatten (320) -> fc(320->50) -> relu -> dropout -> fc(50->10).

    Input ``[B, 1, 28, 28]`` normalised float; output logits ``[B, 10]``.
    Parameters: 260 + 5,020 + 16,050 + 510 = 21,840.
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSpec = "sgd",
        dropout: float = 0.5,
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters(ignore=_hparams_ignore(optimizer))
        self.hparams["optimizer"] = self.optimizer_name
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc_drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # [B, 10, 12, 12]
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # [B, 20, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.fc_drop(x))


class MLP(ImageClassifier):
    """Fully connected ReLU network on flattened images; default 784-200-10 (159,010 parameters).

    Args:
        input_size: features per flattened sample (784 for MNIST, 3072 for CIFAR-10).
        hidden_sizes: widths of the hidden layers, each followed by ReLU.
        num_classes: output logits.
        lr, momentum, weight_decay, optimizer: see :class:`ImageClassifier`.

    Input ``[B, ...]`` with ``input_size`` elements per sample; output logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (200,),
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSpec = "sgd",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer, num_classes)
        hidden = [int(h) for h in hidden_sizes]  # also accepts an OmegaConf ListConfig
        if input_size < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"input_size and hidden_sizes must be positive, got {input_size}, {hidden}")
        self.save_hyperparameters({"input_size": int(input_size), "hidden_sizes": hidden,
                                   "num_classes": int(num_classes), "lr": lr, "momentum": momentum,
                                   "weight_decay": weight_decay, "optimizer": self.optimizer_name})
        layers: list[nn.Module] = []
        width = int(input_size)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class CifarCNN3(ImageClassifier):
    """CIFAR-10 three-block CNN of the HierFAVG predecessor (``cifar_cnn_3conv``): 5,852,170 parameters.

    Blocks (3x3 convs, padding 1; each block ends with 2x2 max-pool):
    ``conv 3->32, BN, relu, conv 32->64, relu, pool`` /
    ``conv 64->128, BN, relu, conv 128->128, relu, pool, dropout2d(0.05)`` /
    ``conv 128->256, BN, relu, conv 256->256, relu, pool``; then
    ``dropout(0.1), fc 4096->1024, relu, fc 1024->512, relu, dropout(0.1), fc 512->10``.

    Input ``[B, 3, 32, 32]`` normalised float; output logits ``[B, 10]``.

    BatchNorm: the three BatchNorm layers hold 832 of the parameters (affine weight/bias) and 835 buffer
    values (running mean/var, 832 values, plus 3 ``num_batches_tracked`` counters). The QMLHFL strategy
    averages the BatchNorm running statistics exactly (no quantization), separately from the parameters.
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSpec = "sgd",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters(ignore=_hparams_ignore(optimizer))
        self.hparams["optimizer"] = self.optimizer_name
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 64 x 16 x 16
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 128 x 8 x 8
            nn.Dropout2d(0.05),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 256 x 4 x 4
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.1),
            nn.Linear(4096, 1024),
            nn.ReLU(),
            nn.Linear(1024, 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class CifarSmallCNN(ImageClassifier):
    """Small, normalisation-free CIFAR-10 CNN for CPU runs: 225,034 parameters (default ``width=32``).

    ``[conv 3x3 (pad 1) -> relu -> maxpool 2] x 3`` with ``width, 2*width, 4*width`` channels, then
    ``flatten (4*width*4*4) -> fc(-> 64) -> relu -> fc(64 -> 10)``.
    No BatchNorm (no running statistics to synchronise, cheap under vmap). Its central (not federated)
    accuracy with random crops and flips (:func:`recipes.datasets.random_crop_flip`) is in docs/README.md.

    Args:
        width: channels of the first conv (then doubled twice).
        lr, momentum, weight_decay, optimizer: see :class:`ImageClassifier`.

    Input ``[B, 3, 32, 32]`` normalised float; output logits ``[B, 10]``.
    """

    def __init__(
        self,
        width: int = 32,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: OptimizerSpec = "sgd",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.save_hyperparameters(ignore=_hparams_ignore(optimizer))
        self.hparams["optimizer"] = self.optimizer_name
        w = int(width)
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc1 = nn.Linear(4 * w * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, w, 16, 16]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 2w, 8, 8]
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # [B, 4w, 4, 4]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def model_target(name: str) -> str:
    """The import path of a registered model's class (what its preset's ``_target_`` holds)."""
    cls = _REGISTRY.get(name)
    return "" if cls is None else f"{cls.__module__}.{cls.__qualname__}"


_REGISTRY: dict[str, Callable[..., ImageClassifier]] = {
    "lenet": LeNet,
    "mlp": MLP,
    "cifar_cnn3": CifarCNN3,
    "cifar_small": CifarSmallCNN,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> ImageClassifier:
    """Construct a registered model by name (``lenet``, ``mlp``, ``cifar_cnn3``, ``cifar_small``).

    ``kwargs`` go to the model's constructor (e.g. ``lr``, ``momentum``, ``weight_decay``, ``optimizer``).
    Raises ValueError for an unknown name, listing the allowed ones.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}") from None
    return cls(**kwargs)
