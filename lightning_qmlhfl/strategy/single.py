"""QMLHFLStrategy: trains an unmodified LightningModule as multi-layer hierarchical FL with quantization.

How it maps onto Lightning (the README's compatibility table lists every feature):

- One Trainer step = one local step (Eq. 3) of EVERY simulated device, followed by the aggregations that fall
  due (docs/algorithm.md#schedule). One Lightning epoch = one global round (prod(tau) steps), so validation runs once
  per global round by default, on the cloud model: after each cloud aggregation the LightningModule's own
  parameters hold w_t, and the user's ``validation_step``, torchmetrics, ``ModelCheckpoint``, ``EarlyStopping``
  and ``ReduceLROnPlateau`` work unmodified; so do ``trainer.validate/test/predict`` after fit. ``max_steps``
  counts local steps; ``global_rounds=T`` (or ``max_epochs=T``) stops after T global rounds.
- Data: the dataset of the user's train dataloader (a DataLoader, from a LightningDataModule or the module) is
  materialised once as tensors on the training device and partitioned over the devices; every step gathers one
  mini-batch (the dataloader's batch size) per device by indexing. A device that has used up its data reshuffles
  its own data and continues (per-device epochs); a dataloader without shuffling keeps index order.
- The user's ``training_step(batch, batch_idx)`` runs once per device per step, on that device's weights and
  batch (vmap or loop executor); ``self.log`` inside it is captured per device (:mod:`.device_logging`).
- The optimizer's class and parameter groups come from ``configure_optimizers``; every device runs its own copy
  (per-device state, per-group hyperparameters). Schedulers step as in plain Lightning and their current values
  apply to all devices. Parameters in no group or with ``requires_grad=False`` are frozen: not trained, not sent.
  ``gradient_clip_val`` clips each device's own gradient; ``accumulate_grad_batches=k`` makes one local step of
  k mini-batches; mixed precision autocasts each device's step (with the Trainer's GradScaler for 16-mixed).
- Checkpoints hold the whole simulation (all stacked rows, per-device optimiser state, schedule counters,
  RNG states, the partition) under the key ``"qmlhfl"``; they load with ``torch.load(weights_only=True)``.
  Resume from a checkpoint written at a global-round boundary (ModelCheckpoint's default, at epoch end)
  continues bit-for-bit.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from ..config import SimulationConfig
from .core import QMLHFLCore, simulation_config
from .wiring import QMLHFLWiring

__all__ = ["QMLHFLStrategy"]


class QMLHFLStrategy(QMLHFLWiring, SingleDeviceStrategy):
    """Lightning strategy simulating QMLHFL over a hierarchy of devices in one process (see the module docstring).

    Args:
        config: the simulation's options, a :class:`~lightning_qmlhfl.config.SimulationConfig` (its docstring
            lists every option with its default: the tree, tau, compressors, server optimizers, participation,
            partition, seed, executor, latency model, mobility, ...). Instead of ``config``, give those options as
            keywords, ``QMLHFLStrategy(hierarchy=Hierarchy.balanced([4, 5, 5]), taus=[5, 2, 2],
            compressors=[QSGD(8)] * 3)``: they build it with :meth:`SimulationConfig.build` (config values such as
            an int s for QSGD, names and dicts are accepted; one value for every layer where a list is expected).
        device: the training device (default CUDA if available, else CPU; ``"cuda"`` means ``cuda:0``).
    """

    strategy_name = "qmlhfl"

    def __init__(self, config: SimulationConfig | None = None, device: str | torch.device | None = None,
                 **options: Any) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Lightning's accelerator calls torch.cuda.set_device(root_device), which needs an index; cuda:0 is
            # the current device of a fresh process (as Lightning's own default), without initialising CUDA here
            device = torch.device("cuda", 0)
        super().__init__(device=device)
        self.core = QMLHFLCore(simulation_config(config, options))

StrategyRegistry.register(
    "qmlhfl",
    QMLHFLStrategy,
    description="QMLHFL defaults: Hierarchy.balanced([4, 5, 5]), taus [5, 2, 2], QSGD(8) on every layer, "
    "Dirichlet(alpha=0.5) partition, seed 0",
)
