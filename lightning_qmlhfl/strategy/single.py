"""QMLHFLStrategy: trains an unmodified LightningModule as multi-layer hierarchical FL with quantization.

How it maps onto Lightning (read this before using the counters):
- One Trainer step = one local SGD step (Eq. 3) of EVERY simulated device, followed by the aggregations that fall
  due (ALGORITHM.md section 2). One Lightning epoch = one global round (prod(tau) steps), so validation runs once
  per global round by default, on the cloud model: after each cloud aggregation the LightningModule's own
  parameters hold w_t, and the user's ``validation_step``, torchmetrics and ``ModelCheckpoint`` work unmodified.
  ``max_steps`` counts local steps; ``global_rounds=T`` (or ``max_epochs=T``) stops after T global rounds.
- Data: the dataset of the user's train dataloader is materialised once as tensors on the training device and
  partitioned over the devices; every step gathers one mini-batch (the dataloader's batch size) per device by
  indexing. A device that has used up its data reshuffles its own data and continues (per-device epochs).
- The user's ``training_step(batch, batch_idx)`` runs once per device per step, on that device's weights and
  batch (vmap or loop executor); ``self.log`` inside it is captured per device and logged as the device mean.
- mu and the optimiser class come from ``configure_optimizers``; an LR scheduler steps as in plain Lightning and
  its current LR is applied to all devices (one shared schedule). Gradient clipping is not applied.
- Checkpoints hold the whole simulation (all stacked rows, per-device optimiser state, schedule counters,
  RNG states, the partition) under the key ``"qmlhfl"``; they load with ``torch.load(weights_only=True)``.
  Resume from a checkpoint written at a global-round boundary (ModelCheckpoint's default, at epoch end)
  continues bit-for-bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader

from ..data.materialize import extract_labels, materialize_dataset
from ..data.partition import Dirichlet, Partitioner, make_partitioner
from ..data.sampler import DeviceSampler
from ..engine import NonFiniteUpdateError, QMLHFLEngine, gather_batch, validate_quantizers, validate_taus
from ..hierarchy import Hierarchy
from ..kernels import check_backend
from ..quantizers import QSGD, Quantizer
from ..rng import Stream, mix
from ..stacked import check_param_order
from ..theory.latency import LatencyModel, default_uplink_rates

__all__ = ["QMLHFLStrategy"]


class _RoundBatches:
    """The train 'dataloader' the strategy hands to Lightning: one epoch = the rest of the current global round."""

    def __init__(self, strategy: "QMLHFLStrategy") -> None:
        self.strategy = strategy

    def __len__(self) -> int:
        return self.strategy.engine.steps_per_round

    def __iter__(self):
        s = self.strategy
        for _ in range(s.engine.steps_per_round - s.engine.step_in_round):
            yield s._next_batch()


# ----------------------------------------------------------------------------------------------------- strategy
class QMLHFLStrategy(SingleDeviceStrategy):
    """Lightning strategy simulating QMLHFL over a hierarchy of devices (see the module docstring).

    Args:
        hierarchy: the tree (default ``Hierarchy.balanced([4, 5, 5])``: 100 devices, N = 3).
        taus: (tau_1..tau_N) (default ``[5, 2, 2]`` for the default hierarchy, else all 2).
        quantizers: one per layer: Quantizer, int s, or "none" (default QSGD(8) on every layer).
        partition: a Partitioner or config (default ``Dirichlet(alpha=0.5)``).
        seed: seeds the partition, per-device sampling, dropout masks, augmentation and quantization draws.
        executor: "auto", "vmap" or "loop".
        weighting: "devices" (|C(child)|/|C(parent)|, the paper's) or "samples" (by local data size, ours).
        global_rounds: stop after this many global rounds (alternative to ``max_steps``).
        latency: a :class:`LatencyModel` for the simulated time (logged as ``fl/sim_time``). Default: 1 ms per
            local step, uplinks of 100 Mbit/s from the devices and 10x slower per layer up (see :meth:`_default_latency`).
        smoothness: L; when given, the learning-rate condition (Eq. 15) is checked at setup.
        strict_lr: turn the learning-rate warning into an error.
        train_transform: ``f(batch, generator) -> batch`` applied to each stacked per-device batch on the training
            device (e.g. random crop/flip); batch leaves have shape [N_tot, B, ...].
        label_key: where the labels are in each sample (default: element 1 of tuples, or "label"/"y"/... in dicts).
        backend: aggregation backend ("auto": Triton on CUDA, the numba kernel for float32 on CPU, torch
            otherwise; or "torch"/"numba"/"triton"). All give the same numbers.
        device: training device (default CUDA if available, else CPU).
        param_order: "fast" (default) or "module": storage order of the stacked rows (:mod:`.stacked`); it decides
            which entries share a QSGD bucket and which draw each entry gets, not the model or its gradients.
    """

    strategy_name = "qmlhfl"

    def __init__(
        self,
        hierarchy: Hierarchy | None = None,
        taus: Sequence[int] | None = None,
        quantizers: Sequence[Quantizer | int | str | None] | None = None,
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
        backend: str = "auto",
        device: str | torch.device | None = None,
        param_order: str = "fast",
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(device=torch.device(device))
        self.hierarchy = hierarchy if hierarchy is not None else Hierarchy.balanced([4, 5, 5])
        if not isinstance(self.hierarchy, Hierarchy):
            raise TypeError(f"hierarchy must be a Hierarchy, got {type(self.hierarchy).__name__}")
        N = self.hierarchy.num_layers
        if taus is None:
            taus = [5, 2, 2] if self.hierarchy.nodes_per_layer == (100, 20, 4, 1) else [2] * N
        self.taus = validate_taus(taus, N)
        self.quantizers = validate_quantizers(quantizers if quantizers is not None else [QSGD(8)] * N, N)
        self.partitioner = make_partitioner(partition if partition is not None else Dirichlet(alpha=0.5))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if executor not in ("auto", "vmap", "loop"):
            raise ValueError(f"executor must be 'auto', 'vmap' or 'loop', got {executor!r}")
        self.executor = executor
        if weighting not in ("devices", "samples"):
            raise ValueError(f"weighting must be 'devices' or 'samples', got {weighting!r}")
        self.weighting = weighting
        if global_rounds is not None and (isinstance(global_rounds, bool) or not isinstance(global_rounds, int)
                                          or global_rounds < 1):
            raise ValueError(f"global_rounds must be None or an integer >= 1, got {global_rounds!r}")
        self.global_rounds = global_rounds
        if latency is not None and latency.num_layers != N:
            raise ValueError(f"latency model describes {latency.num_layers} layers, the hierarchy has N = {N}")
        self.latency = latency
        if smoothness is not None and not (isinstance(smoothness, (int, float)) and smoothness > 0):
            raise ValueError(f"smoothness L must be a number > 0, got {smoothness!r}")
        self.smoothness = smoothness
        self.strict_lr = bool(strict_lr)
        self.train_transform = train_transform
        self.label_key = label_key
        self.backend = check_backend(backend)
        self.param_order = check_param_order(param_order)
        self.engine: QMLHFLEngine | None = None
        self.sampler: DeviceSampler | None = None
        self.data: Any = None
        self.history: list[dict[str, Any]] = []  # one record per completed global round
        self.sim_time = 0.0
        self._pending_state: dict[str, Any] | None = None
        self._poisoned = False
        self._round_loss_sum = 0.0
        self._round_loss_steps = 0
        self._rng_state: Tensor | None = None
        self._cuda_rng_state: Tensor | None = None
        self._aug_generator: torch.Generator | None = None
        self._batch_idx = 0

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        if not module.automatic_optimization:
            raise ValueError("QMLHFLStrategy needs automatic optimization (the strategy runs the per-device steps)")
        if len(self.optimizers) != 1:
            raise ValueError(f"configure_optimizers must return exactly one optimizer, got {len(self.optimizers)}")
        if self.global_rounds is not None:
            trainer.fit_loop.max_epochs = self.global_rounds

    def _optimizer_spec(self) -> tuple[type, dict[str, Any]]:
        opt = self.optimizers[0]
        opt = getattr(opt, "_optimizer", opt)
        keys = [k for k in opt.defaults if k not in ("params",)]
        groups = opt.param_groups
        hyper = {k: groups[0][k] for k in keys if k in groups[0]}
        for g in groups[1:]:
            diff = [k for k in keys if k in g and g[k] != groups[0][k]]
            if diff:
                raise ValueError(
                    f"parameter groups with different hyperparameters ({diff}) are not supported: every simulated "
                    f"device runs one optimiser over its whole flat parameter vector"
                )
        return type(opt), hyper

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if self.engine is None:
            self._build(dataloader)
        return _RoundBatches(self)

    def _build(self, dataloader: Any) -> None:
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"the train dataloader must be a torch DataLoader, got {type(dataloader).__name__}")
        if dataloader.batch_size is None:
            raise ValueError("the train dataloader needs a batch_size (the per-device mini-batch size)")
        device = self.root_device
        data = materialize_dataset(dataloader.dataset, dataloader.collate_fn)
        labels = extract_labels(data, self.label_key)
        parts = self.partitioner(labels, self.hierarchy, seed=mix(self.seed, Stream.PARTITION))
        self.sampler = DeviceSampler(parts, dataloader.batch_size, seed=mix(self.seed, Stream.SAMPLER))
        self.data = tree_map(lambda t: t.to(device), data)
        mass = torch.tensor([len(p) for p in parts], dtype=torch.float64) if self.weighting == "samples" else None
        cls, hyper = self._optimizer_spec()
        module = self.lightning_module
        self.engine = QMLHFLEngine(
            module, self._device_loss, self.hierarchy, self.taus, self.quantizers, optimizer=cls,
            optimizer_kwargs=hyper, executor=self.executor, seed=self.seed, device_mass=mass,
            backend=self.backend, device=device, param_order=self.param_order,
        )
        self._aug_generator = torch.Generator(device=device).manual_seed(mix(self.seed, Stream.AUGMENT))
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(mix(self.seed, Stream.TORCH_RNG))
            self._rng_state = torch.get_rng_state()
            self._cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        if self._pending_state is not None:
            self.load_qmlhfl_state(self._pending_state)
            self._pending_state = None
        if self.smoothness is not None:
            from ..theory import check_learning_rate

            check_learning_rate(self.engine.optimizer.lr, self.smoothness, self.taus, list(self.quantizers),
                                self.hierarchy, d=self.engine.num_params, strict=self.strict_lr)

    def _cuda_devices(self) -> list[int]:
        d = self.root_device
        return [d.index or 0] if d.type == "cuda" else []

    # ------------------------------------------------------------------ one step
    def _next_batch(self) -> Any:
        assert self.sampler is not None
        idx = self.sampler.next_indices().to(self.root_device)
        batch = tree_map(lambda t: gather_batch(t, idx), self.data)
        if self.train_transform is not None:
            batch = self.train_transform(batch, self._aug_generator)
        return batch

    def _device_loss(self, module: pl.LightningModule, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The user's training_step on one device's weights and batch, with self.log captured."""
        captured: dict[str, Tensor] = {}

        def capture(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._log_kwargs.setdefault(name, kwargs)
            captured[name] = value if isinstance(value, Tensor) else torch.as_tensor(float(value))

        def capture_dict(dictionary: dict, *args: Any, **kwargs: Any) -> None:
            for k, v in dictionary.items():
                capture(k, v, **kwargs)

        module.__dict__["log"] = capture
        module.__dict__["log_dict"] = capture_dict
        try:
            out = module.training_step(batch, self._batch_idx)
        finally:
            module.__dict__.pop("log", None)
            module.__dict__.pop("log_dict", None)
        if out is None:
            raise ValueError("training_step returned None: under QMLHFLStrategy every device step needs a loss")
        if isinstance(out, dict):
            loss = out["loss"]
        else:
            loss = out
        aux = {k: v.detach().to(torch.float32).reshape(()) for k, v in captured.items() if v.numel() == 1}
        return loss, aux

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        assert self.engine is not None
        batch = args[0]
        self._batch_idx = int(args[1]) if len(args) > 1 else 0
        module = self.lightning_module
        opt = self.optimizers[0]
        self.engine.set_lr(float(getattr(opt, "_optimizer", opt).param_groups[0]["lr"]))
        self._log_kwargs: dict[str, dict] = {}
        try:
            with torch.random.fork_rng(devices=self._cuda_devices()):
                torch.set_rng_state(self._rng_state)
                if self._cuda_rng_state is not None:
                    torch.cuda.set_rng_state(self._cuda_rng_state, self.root_device)
                result = self.engine.local_step(batch)
                self._rng_state = torch.get_rng_state()
                if self._cuda_rng_state is not None:
                    self._cuda_rng_state = torch.cuda.get_rng_state(self.root_device)
        except NonFiniteUpdateError:
            self._poisoned = True
            raise
        n_dev = self.hierarchy.num_devices
        mean_loss = result.losses.mean()
        for name, values in result.aux.items():
            kw = {k: v for k, v in self._log_kwargs.get(name, {}).items() if k not in ("batch_size",)}
            module.log(name, values.mean(), batch_size=n_dev, **kw)
        self._round_loss_sum += float(mean_loss)
        self._round_loss_steps += 1
        if result.round_completed:
            self._end_round()
        return mean_loss

    def _end_round(self) -> None:
        e = self.engine
        assert e is not None
        e.load_cloud_into(self.lightning_module)
        upload = [e.upload_bits(n) for n in range(1, e.N + 1)]
        rt = self._latency().round_time(self.taus, upload)
        self.sim_time += rt.total
        rec = {
            "round": e.round,
            "local_steps": e.total_steps,
            "train_loss": self._round_loss_sum / max(1, self._round_loss_steps),
            "sim_time": self.sim_time,
            "bits_total": sum(e.bits_sent),
            "bits_baseline_total": sum(e.baseline_bits),
        }
        for n in range(1, e.N + 1):
            rec[f"bits_layer{n}"] = e.bits_sent[n - 1]
            rec[f"bits_round_layer{n}"] = e.round_bits[n - 1]
            rec[f"bits_baseline_layer{n}"] = e.baseline_bits[n - 1]
        self.history.append(rec)
        module = self.lightning_module
        for k, v in rec.items():
            module.log(f"fl/{k}", float(v), on_step=False, on_epoch=True, batch_size=1,
                       prog_bar=k in ("round", "train_loss"))
        self._round_loss_sum, self._round_loss_steps = 0.0, 0

    def _latency(self) -> LatencyModel:
        if self.latency is None:
            self.latency = self._default_latency()
        return self.latency

    def _default_latency(self) -> LatencyModel:
        """Documented default: 1 ms per local step and :func:`~lightning_qmlhfl.latency.default_uplink_rates`."""
        return LatencyModel(compute_time=1e-3, uplink_rates=default_uplink_rates(self.hierarchy.num_layers))

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """No-op: the engine already computed every device's gradient and update inside ``training_step``."""
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Runs the closure (= the engine step); the user's optimizer itself never steps (it only carries the
        hyperparameters and the scheduler's learning rate)."""
        out = closure()
        # The devices' optimiser did step: tell torch's LR schedulers so (they warn when a scheduler steps before
        # its optimizer ever has).
        getattr(optimizer, "_optimizer", optimizer)._opt_called = True
        return out

    # ------------------------------------------------------------------ checkpointing
    def qmlhfl_state_dict(self) -> dict[str, Any]:
        assert self.engine is not None and self.sampler is not None
        return {
            "engine": self.engine.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self._rng_state.clone(),
            "cuda_rng": None if self._cuda_rng_state is None else self._cuda_rng_state.clone(),
            "aug_rng": self._aug_generator.get_state(),
            "history": [dict(h) for h in self.history],
            "sim_time": self.sim_time,
            "round_loss": [self._round_loss_sum, self._round_loss_steps],
        }

    def load_qmlhfl_state(self, sd: dict[str, Any]) -> None:
        assert self.engine is not None and self.sampler is not None
        self.engine.load_state_dict(sd["engine"])
        self.sampler.load_state_dict(sd["sampler"])
        self._rng_state = sd["rng"].clone()
        self._cuda_rng_state = None if sd["cuda_rng"] is None else sd["cuda_rng"].clone()
        self._aug_generator.set_state(sd["aug_rng"])
        self.history = [dict(h) for h in sd["history"]]
        self.sim_time = float(sd["sim_time"])
        self._round_loss_sum, self._round_loss_steps = float(sd["round_loss"][0]), int(sd["round_loss"][1])
        self.engine.load_cloud_into(self.lightning_module)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._poisoned:
            raise RuntimeError(
                f"refusing to write checkpoint {filepath}: the simulation hit a non-finite update and its state is "
                f"poisoned"
            )
        if self.engine is not None:
            checkpoint["qmlhfl"] = self.qmlhfl_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = ckpt.get("qmlhfl")
        if state is not None:
            if self.engine is not None:
                self.load_qmlhfl_state(state)
            else:
                self._pending_state = state
        return ckpt


StrategyRegistry.register(
    "qmlhfl",
    QMLHFLStrategy,
    description="QMLHFL defaults: Hierarchy.balanced([4, 5, 5]), taus [5, 2, 2], QSGD(8) on every layer, "
    "Dirichlet(alpha=0.5) partition, seed 0",
)
