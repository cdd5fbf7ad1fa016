"""The benchmarks' workloads: the models (HierFAVG's MNIST LeNet, a 784-200-10 MLP, the recipes' small CIFAR-10
CNN as a plain ``nn.Module``), the synthetic resident data and its IID partition, the loss, the training constants
(batch 32, SGD lr 0.01, QSGD s = 8) and the FLOPs of one device-step. ``bench/engine.py`` documents the setup;
``bench/fit.py``, ``bench/participation_fit.py``, ``bench/profile_*.py``, ``bench/scaleout.py`` and
``bench/theory_probe.py`` run the same workloads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL = 60_000  # synthetic MNIST-sized training set, resident in memory
CIFAR_POOL = 50_000  # synthetic CIFAR-10-sized training set
BATCH = 32
LR = 0.01
LEVELS = 8  # QSGD s on every layer


# ---------------------------------------------------------------------------------------------------- models
class LeNet(nn.Module):
    """HierFAVG's MNIST LeNet (21,840 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.drop = nn.Dropout()
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = self.drop(x)
        return self.fc2(x)


class MLP(nn.Module):
    """784-200-10 (159,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CifarSmall(nn.Module):
    """The recipes' small CIFAR-10 CNN (``model=cifar_small``, width 32; 225,034 parameters), without Lightning.

    ``[conv 3x3 (pad 1) -> relu -> maxpool 2] x 3`` with 32, 64, 128 channels, then fc 2048 -> 64, relu, fc 64 -> 10.
    Input [B, 3, 32, 32], output logits [B, 10].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 32, 16, 16]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 64, 8, 8]
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # [B, 128, 4, 4]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS = {"lenet": LeNet, "mlp": MLP, "cifar_small": CifarSmall}
# model -> (synthetic pool size, sample shape)
INPUTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "lenet": (POOL, (1, 28, 28)), "mlp": (POOL, (1, 28, 28)), "cifar_small": (CIFAR_POOL, (3, 32, 32)),
}


def ce_loss(module: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def make_data(num_devices: int, seed: int = 0, pool: int = POOL, shape: tuple[int, ...] = (1, 28, 28)):
    """Random images X [pool, *shape] (float32), labels Y [pool] in 0..9 and an IID partition
    part [num_devices, pool // num_devices] of indices into them, all on the CPU, drawn from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(pool, *shape, generator=g)
    Y = torch.randint(0, 10, (pool,), generator=g)
    part = torch.randperm(pool, generator=g)[: (pool // num_devices) * num_devices].view(num_devices, -1)
    return X, Y, part


def count_flops(model_name: str) -> int:
    """FLOPs of one device's forward + backward on one mini-batch of BATCH samples, as counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmul/convolution-type operations and their backward; on the
    CPU, with the global RNG state restored afterwards so that the benchmark's draws are untouched)."""
    # imported here, after the timed rounds: it pulls in sympy and other modules whose memory would otherwise
    # shift the "RSS after imports" baseline of the memory column
    from torch.utils.flop_counter import FlopCounterMode

    pool, shape = INPUTS[model_name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS[model_name]()
        model.train()
        x = torch.randn(BATCH, *shape)
        y = torch.randint(0, 10, (BATCH,))
        counter = FlopCounterMode(display=False)
        with counter:
            F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())
