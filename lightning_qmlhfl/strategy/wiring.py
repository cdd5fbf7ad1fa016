"""The Lightning hooks both QMLHFL strategies share (the single-process one and the DDP one): a mixin placed
before the Lightning strategy class, forwarding to the strategy's :class:`~lightning_qmlhfl.strategy.core.QMLHFLCore`.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from typing_extensions import override

from ..compressors import Compressor
from ..config import SimulationConfig
from ..data.partition import Partitioner
from ..simulation.engine import QMLHFLEngine
from ..hierarchy import Hierarchy
from .core import QMLHFLCore

__all__ = ["QMLHFLWiring"]


class QMLHFLWiring:
    """Wiring of Lightning's strategy hooks to ``self.core`` (see :mod:`.single` for what each means)."""

    core: QMLHFLCore

    # ------------------------------------------------------------------ the simulation's state, for users
    @property
    def engine(self) -> QMLHFLEngine | None:
        """The :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine` (built at the first training dataloader)."""
        return self.core.engine

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per completed global round (bits, simulated time, device train loss, ...)."""
        return self.core.history

    @property
    def sim_time(self) -> float:
        """Simulated seconds so far (the latency model's clock)."""
        return self.core.sim_time

    @property
    def config(self) -> SimulationConfig:
        """The simulation's options (:class:`~lightning_qmlhfl.config.SimulationConfig`)."""
        return self.core.config

    @property
    def hierarchy(self) -> Hierarchy:
        return self.core.config.hierarchy

    @property
    def taus(self) -> tuple[int, ...]:
        return self.core.config.taus

    @property
    def compressors(self) -> tuple[Compressor, ...]:
        return self.core.config.compressors

    @property
    def quantizers(self) -> tuple[Compressor, ...]:
        """The per-layer compressors (the earlier name)."""
        return self.core.config.compressors

    @property
    def server_optimizers(self) -> tuple:
        return self.core.config.server_optimizers

    @property
    def partitioner(self) -> Partitioner:
        return self.core.config.partition

    @property
    def sampler(self) -> Any:
        """The per-device sampler (:class:`~lightning_qmlhfl.data.DeviceSampler`; built with the engine)."""
        return self.core.sampler

    @property
    def train_data(self) -> Any:
        """The materialised training data on the training device (the tensors every step gathers from; built with
        the engine), or None before the first training dataloader."""
        return self.core.data

    @property
    def train_transform(self) -> Any:
        """The batched augmentation applied to every stacked training batch, or None."""
        return self.core.train_transform

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        self.core.setup(self, trainer)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        return self.core.round_batches(self, dataloader)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Every device's ``training_step`` on its own weights and mini-batch (gradients only; the update and the
        aggregations happen at :meth:`optimizer_step`)."""
        batch = args[0] if args else kwargs["batch"]
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        return self.core.training_step(self, batch, batch_idx)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """No-op: the executors already computed every device's gradient inside ``training_step``."""
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Runs the closure (every device's training_step), then every device's update and the aggregations that
        fall due. The user's optimizer itself only carries the hyperparameters (and the schedulers' values): it is
        stepped with no gradients, which changes no parameter and keeps torch's scheduler bookkeeping right."""
        out = closure()
        self.core.optimizer_step(self, optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        optimizer.step()
        return out

    # ------------------------------------------------------------------ checkpointing
    def qmlhfl_state_dict(self) -> dict[str, Any]:
        """The whole simulation's state (what checkpoints hold under ``"qmlhfl"``)."""
        return self.core.state_dict()

    def load_qmlhfl_state(self, sd: dict[str, Any]) -> None:
        self.core.load_state_dict(sd, self.lightning_module)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.core.poisoned:
            raise RuntimeError(
                f"refusing to write checkpoint {filepath}: the simulation hit a non-finite update and its state is "
                f"poisoned"
            )
        if self.core.engine is not None:
            checkpoint["qmlhfl"] = self.core.state_dict(self._engine_checkpoint_state(filepath))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _engine_checkpoint_state(self, filepath: Any) -> dict[str, Any] | None:
        """The engine state a checkpoint stores (None: the engine's own; a multi-process strategy overrides)."""
        return None

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.core.restore(ckpt.get("qmlhfl"), self.lightning_module, checkpoint_path)
        return ckpt
