"""QMLHFLStrategy: trains an unmodified LightningModule as multi-layer hierarchical FL with quantization.

How it maps onto Lightning (the README's compatibility table lists every feature):

- One Trainer step = one local step (Eq. 3) of EVERY simulated device, followed by the aggregations that fall
  due (ALGORITHM.md section 2). One Lightning epoch = one global round (prod(tau) steps), so validation runs once
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

from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from torch import Tensor

from ..compressors import Compressor
from ..data.partition import Partitioner
from ..hierarchy import Hierarchy
from ..theory.latency import LatencyModel
from .core import QMLHFLCore
from .wiring import QMLHFLWiring

__all__ = ["QMLHFLStrategy"]


class QMLHFLStrategy(QMLHFLWiring, SingleDeviceStrategy):
    """Lightning strategy simulating QMLHFL over a hierarchy of devices (see the module docstring).

    Args:
        hierarchy: the tree (default ``Hierarchy.balanced([4, 5, 5])``: 100 devices, N = 3).
        taus: (tau_1..tau_N) (default ``[5, 2, 2]`` for the default hierarchy, else all 2).
        compressors: one per layer (:mod:`lightning_qmlhfl.compressors`: QSGD, TopK, RandomK, ScaledSign,
            NaturalCompression, Identity, each with optional error feedback), or config values (int s, "none");
            default QSGD(8) on every layer. ``quantizers=`` is an alias.
        partition: a Partitioner or config (default ``Dirichlet(alpha=0.5)``).
        seed: seeds the partition, per-device sampling, dropout masks, augmentation and quantization draws.
        executor: "auto", "vmap" or "loop" (``auto`` falls back to the loop for steps vmap cannot run).
        weighting: "devices" (|C(child)|/|C(parent)|, the paper's) or "samples" (by local data size, ours).
        global_rounds: stop after this many global rounds (alternative to ``max_steps``).
        latency: a :class:`LatencyModel` for the simulated time (logged as ``fl/sim_time``). Default: 1 ms per
            local step, uplinks of 100 Mbit/s from the devices and 10x slower per layer up.
        smoothness: L; when given, the learning-rate condition (Eq. 15) is checked at setup.
        strict_lr: turn the learning-rate warning into an error.
        train_transform: ``f(batch, generator) -> batch`` applied to each stacked per-device batch on the training
            device (e.g. random crop/flip); batch leaves have shape [N_tot, B, ...].
        label_key: where the labels are in each sample (default: element 1 of tuples, or "label"/"y"/... in dicts).
        label_fn: ``f(data) -> LongTensor[n]``, one class id per sample from the materialised dataset, for
            label-based partitioners when the labels are not plain class ids (e.g. sequence targets).
        backend: aggregation backend ("auto": Triton on CUDA, the numba kernel for float32 on CPU, torch
            otherwise; or "torch"/"numba"/"triton"). All give the same numbers.
        device: training device (default CUDA if available, else CPU; ``"cuda"`` means ``cuda:0``).
        param_order: "fast" (default) or "module": storage order of the stacked rows (:mod:`..stacked`); it decides
            which entries share a QSGD bucket and which draw each entry gets, not the model or its gradients.
        max_dataset_bytes: refuse training sets larger than this as tensors (default: half the free memory of the
            training device).
        server_optimizers: one :mod:`~lightning_qmlhfl.optimizers.server` rule per layer n = 1..N (or one for every
            layer): ``Average()`` (default), ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``.
        participation: one :mod:`~lightning_qmlhfl.federation.participation` rule per layer n = 1..N (or one for every layer):
            ``Full()`` (default), ``Fraction(f)``, ``UniformK(k)``, ``Bernoulli(p)``; logged per round as
            ``fl/participants_layer{n}`` and ``fl/drops_layer{n}``.
        availability: an :class:`~lightning_qmlhfl.federation.availability.Availability` (unavailable devices, dropouts,
            availability traces).
        device_rng: ``"global"`` (default) or ``"stream"``: dropout draws from a per-device counter-based stream
            with the loop executor, so results do not depend on how rows are chunked or placed
            (:class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`); what the multi-process strategy uses.
        mobility: a :mod:`~lightning_qmlhfl.federation.mobility` model (devices moving between edge servers, edge-server
            failures), or its config dict; logged per round as ``fl/moves``, ``fl/edge_failures``,
            ``fl/edge_devices_min`` / ``_max`` (the history holds every edge server's device count).

    The simulated clock (``fl/sim_time``, and its split ``fl/time_compute``, ``fl/time_layer{n}``) follows the
    latency model per node: heterogeneous devices and links, stragglers waited for or dropped at a deadline
    (:mod:`lightning_qmlhfl.federation.clock`).
    """

    strategy_name = "qmlhfl"

    def __init__(
        self,
        hierarchy: Hierarchy | None = None,
        taus: Sequence[int] | None = None,
        compressors: Sequence[Compressor | int | str | None] | None = None,
        partition: Partitioner | dict | str | None = None,
        seed: int = 0,
        executor: str = "auto",
        weighting: str = "devices",
        global_rounds: int | None = None,
        latency: LatencyModel | None = None,
        smoothness: float | None = None,
        strict_lr: bool = False,
        train_transform: Callable[[Any, torch.Generator], Any] | None = None,
        label_key: str | int | None = None,
        label_fn: Callable[[Any], Tensor] | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
        param_order: str = "fast",
        max_dataset_bytes: int | None = None,
        quantizers: Sequence[Compressor | int | str | None] | None = None,
        server_optimizers: Any = None,
        participation: Any = None,
        availability: Any = None,
        mobility: Any = None,
        device_rng: str = "global",
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Lightning's accelerator calls torch.cuda.set_device(root_device), which needs an index; cuda:0 is
            # the current device of a fresh process (as Lightning's own default), without initialising CUDA here
            device = torch.device("cuda", 0)
        super().__init__(device=device)
        self.core = QMLHFLCore(
            hierarchy=hierarchy, taus=taus, compressors=compressors, quantizers=quantizers, partition=partition,
            seed=seed, executor=executor, weighting=weighting, global_rounds=global_rounds, latency=latency,
            smoothness=smoothness, strict_lr=strict_lr, train_transform=train_transform, label_key=label_key,
            label_fn=label_fn, backend=backend, param_order=param_order, max_dataset_bytes=max_dataset_bytes,
            server_optimizers=server_optimizers, participation=participation, availability=availability,
            mobility=mobility, device_rng=device_rng,
        )


StrategyRegistry.register(
    "qmlhfl",
    QMLHFLStrategy,
    description="QMLHFL defaults: Hierarchy.balanced([4, 5, 5]), taus [5, 2, 2], QSGD(8) on every layer, "
    "Dirichlet(alpha=0.5) partition, seed 0",
)
