"""QMLHFLDDPStrategy: one QMLHFL simulation spread over W processes (or GPUs) with Lightning's DDP launcher.

Every rank owns whole subtrees (a contiguous block of one cut layer's nodes and every row below them,
:mod:`lightning_qmlhfl.distribution.shard`); the layers above the cut are small and replicated. Each rank trains its own devices
on its own rows; the uploads into the layer above the cut are exchanged with ``torch.distributed`` (gloo on CPU,
NCCL on GPU): gathered and summed in global child order on every rank, so the run is bit-identical to one process
with the same seed and ``device_rng="stream"`` (given the same per-device kernels: the same executor and the same
number of intra-op threads per device computation, since oneDNN and MKL may split reductions by thread count), or,
with ``exchange="all_reduce"``, partial sums are all-reduced (faster, equal to float tolerance). The model is not
wrapped in DistributedDataParallel: there is no gradient to average.

What the ranks share, by construction: the data (every rank reads the whole training set; every rank's sampler
draws every device's batch and keeps its own), the participation draws, the clock, the layers above the cut and
the logged numbers (means over all devices, gathered in device order; bits per layer; the stages' per-sender
counts such as the drift and the clipped uploads, added over the ranks once per round). Validation runs on the
cloud model, which every rank holds, with Lightning's distributed sampler, so the validation set is covered once
per round (log metrics with ``sync_dist=True`` or torchmetrics to see the global value). Dropout under the loop
executor draws from per-device streams (``device_rng="stream"``, the default here); under vmap the masks depend
on which rows a rank holds, so use ``executor="loop"`` for models with dropout when bit-identity matters.

Checkpoints: ``checkpoint="full"`` (default) gathers every rank's rows to rank 0, a file the single-process
:class:`~lightning_qmlhfl.strategy.QMLHFLStrategy` (or any world size) loads; ``checkpoint="sharded"`` writes every
rank's rows with ``torch.distributed.checkpoint`` beside the file (:mod:`.checkpoints`), resumable at any world
size too. A non-finite upload on any rank stops every rank with the same
:class:`~lightning_qmlhfl.simulation.engine.NonFiniteUpdateError`; collectives time out after ``timeout``, so a dead rank
fails the run instead of hanging it. Mobility is not supported here (a device moving to another rank's edge
server would have to move its rows between processes).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from typing_extensions import override

from ..config import SimulationConfig
from ..distribution.comm import TorchComm
from ..distribution.shard import EXCHANGES, Shard
from .base import QMLHFLStrategyBase
from .core import QMLHFLCore, simulation_config
from .flavor import LightningAPI, lightning_api

__all__ = ["QMLHFLDDPStrategy", "ddp_strategy"]

CHECKPOINTS = ("full", "sharded")


def ddp_strategy(api: LightningAPI, module: str) -> type:
    """The multi-process strategy class for the Lightning package of ``api``, named as if defined in ``module``
    (so that pickle, and so Lightning's spawn launcher, finds it there)."""

    class QMLHFLDDPStrategy(QMLHFLStrategyBase, api.DDPStrategy):
        """The multi-process QMLHFL strategy (module docstring).

        Takes the simulation of :class:`~lightning_qmlhfl.strategy.QMLHFLStrategy`: ``config`` (a
        :class:`~lightning_qmlhfl.config.SimulationConfig`) or its options as keywords (``hierarchy``, ``taus``,
        ``compressors``, ``partition``, ``seed``, ...; ``device_rng`` defaults to ``"stream"`` here), plus:

        Args:
            cut_layer: the layer whose nodes are split over the ranks (default: chosen for balanced device counts,
                :func:`lightning_qmlhfl.distribution.shard.choose_cut`).
            exchange: ``"gather"`` (bit-identical to one process) or ``"all_reduce"`` (faster; float tolerance).
            checkpoint: ``"full"`` (gathered to rank 0) or ``"sharded"`` (``torch.distributed.checkpoint``).
            timeout: of every collective (default 10 minutes).
            start_method: Lightning's ``"popen"`` (scripts), ``"spawn"`` or ``"fork"`` (notebooks and tests).
            process_group_backend, accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin:
                as for Lightning's DDPStrategy.
        """

        strategy_name = "qmlhfl_ddp"
        lightning = api

        def __init__(self, config: SimulationConfig | None = None, *, cut_layer: int | None = None,
                     exchange: str = "gather", checkpoint: str = "full", timeout: timedelta = timedelta(minutes=10),
                     start_method: str = "popen", process_group_backend: str | None = None, accelerator: Any = None,
                     parallel_devices: Any = None, cluster_environment: Any = None, checkpoint_io: Any = None,
                     precision_plugin: Any = None, **options: Any) -> None:
            if exchange not in EXCHANGES:
                raise ValueError(f"exchange must be 'gather' (bit-identical) or 'all_reduce' (faster, float tolerance), "
                                 f"got {exchange!r}")
            if checkpoint not in CHECKPOINTS:
                raise ValueError(f"checkpoint must be 'full' or 'sharded', got {checkpoint!r}")
            if cut_layer is not None and (isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or cut_layer < 0):
                raise ValueError(f"cut_layer must be None or a layer index >= 0, got {cut_layer!r}")
            super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                             cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                             precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                             timeout=timeout, start_method=start_method)
            self.core = QMLHFLCore(simulation_config(config, options, device_rng="stream"))
            if not self.core.config.mobility.is_static:
                raise ValueError("QMLHFLDDPStrategy does not support mobility (a device moving to another rank's edge "
                                 "server would have to move its rows between processes); use QMLHFLStrategy")
            self.cut_layer, self.exchange, self.checkpoint_mode = cut_layer, exchange, checkpoint

        @override
        def configure_ddp(self) -> None:
            """No DistributedDataParallel wrapper: every rank computes its own devices' gradients and the simulation
            exchanges uploads, not gradients."""

        @override
        def setup(self, trainer: Any) -> None:
            super().setup(trainer)
            self.core.shard = Shard.build(self.core.config.hierarchy, self.world_size, self.global_rank, self.cut_layer,
                                          self.exchange)
            self.core.comm = TorchComm()

        @property
        def shard(self) -> Shard | None:
            """This rank's rows (after setup)."""
            return self.core.shard

        @override
        def remove_checkpoint(self, filepath: Any) -> None:
            """Remove a checkpoint file and, for a sharded one, its tensors beside it."""
            super().remove_checkpoint(filepath)
            if self.is_global_zero:
                import shutil

                from .checkpoints import shard_dir

                shutil.rmtree(shard_dir(filepath), ignore_errors=True)

        def _engine_checkpoint_state(self, filepath: Any) -> dict[str, Any] | None:
            engine = self.core.engine
            if self.checkpoint_mode == "sharded":
                from .checkpoints import save_sharded

                return save_sharded(engine, filepath)
            return engine.global_state_dict()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            for name, method in (("qmlhfl_ddp", "popen"), ("qmlhfl_ddp_spawn", "spawn"),
                                 ("qmlhfl_ddp_notebook", "fork")):
                strategy_registry.register(name, cls, description=f"QMLHFL over DDP processes (start method "
                                           f"'{method}'); default simulation", start_method=method)

    QMLHFLDDPStrategy.__module__, QMLHFLDDPStrategy.__qualname__ = module, "QMLHFLDDPStrategy"
    return QMLHFLDDPStrategy


QMLHFLDDPStrategy = ddp_strategy(lightning_api("lightning.pytorch"), __name__)
