"""Model zoo: exact parameter counts, forward shapes, one training step, logging inside a real Trainer."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from recipes.models import MLP, MODEL_NAMES, CifarCNN3, CifarSmallCNN, LeNet, build_model

# name -> (input shape of one sample, exact parameter count at default settings)
SPECS = {
    "lenet": ((1, 28, 28), 21_840),
    "mlp": ((1, 28, 28), 784 * 200 + 200 + 200 * 10 + 10),
    "cifar_cnn3": ((3, 32, 32), 5_852_170),
    "cifar_small": ((3, 32, 32), 225_034),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODEL_NAMES) == set(SPECS)
    assert isinstance(build_model("lenet"), LeNet) and isinstance(build_model("cifar_small"), CifarSmallCNN)
    with pytest.raises(ValueError, match="unknown model 'resnet18'; allowed: lenet, mlp, cifar_cnn3, cifar_small"):
        build_model("resnet18")


@pytest.mark.parametrize("name", list(SPECS))
def test_parameter_count(name: str) -> None:
    assert n_params(build_model(name)) == SPECS[name][1]


def test_lenet_and_cnn3_match_the_predecessor() -> None:
    assert n_params(LeNet()) == 21_840
    assert abs(n_params(CifarCNN3()) - 5.85e6) / 5.85e6 < 0.01
    bn = [m for m in CifarCNN3().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [m.num_features for m in bn] == [32, 128, 256]


def test_mlp_hidden_sizes_configurable() -> None:
    m = MLP(input_size=3072, hidden_sizes=[64, 32])
    assert n_params(m) == 3072 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert m(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert m.hparams.hidden_sizes == [64, 32]


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_and_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(4, *SPECS[name][0])
    y = torch.tensor([0, 3, 7, 9])
    assert model(x).shape == (4, 10)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached here
        loss = model.training_step((x, y), 0)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; allowed: sgd, adam"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LeNet(**kwargs)


def test_configure_optimizers() -> None:
    sgd = LeNet(lr=0.1, momentum=0.9, weight_decay=1e-4).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == 0.1 and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    adam = build_model("mlp", optimizer="adam", lr=1e-3).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3


def test_logging_in_a_trainer(tmp_path) -> None:
    """train_loss, val_loss/val_acc, test_loss/test_acc reach the Trainer; accuracy is a fraction."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    dl = DataLoader(ds, batch_size=16)
    model = LeNet(lr=0.05)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps).*")
        trainer.fit(model, dl, dl)
        assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
        (res,) = trainer.test(model, dl, verbose=False)
    assert set(res) == {"test_loss", "test_acc"}
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["test_loss"])
    # The logged accuracy equals a direct computation over the whole loader (micro average, epoch level).
    model.eval()
    with torch.no_grad():
        acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean().item()
    assert res["test_acc"] == pytest.approx(acc, abs=1e-6)
