"""The strategy's core: everything QMLHFL does inside a Lightning run, written once for the single-process strategy
and its multi-process variant. A strategy owns one :class:`QMLHFLCore` and forwards its hooks to it.

The core builds, from the user's train dataloader, LightningModule and optimizer, the resident data, the partition,
the per-device sampler and the :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`; runs every device's
``training_step`` (with ``self.log`` captured per device, :mod:`.device_logging`); applies the update and the
aggregations at the optimizer step; keeps the per-round history and simulated clock; and holds the checkpoint
state. It never touches private Lightning or torch APIs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .. import checks
from ..config import SimulationConfig
from ..data.materialize import extract_labels, map_labels, materialize_dataset, num_samples
from ..data.sampler import DeviceSampler
from ..rng import Stream, mix
from ..robust import LabelFlip
from ..simulation.engine import NonFiniteUpdateError, QMLHFLEngine, gather_batch
from .device_logging import LOG_KEY, OUT_KEY, DeviceLogCapture

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

__all__ = ["QMLHFLCore", "RoundBatches"]


def simulation_config(config: SimulationConfig | None, options: dict[str, Any], **defaults: Any
                      ) -> SimulationConfig:
    """The strategies' simulation: ``config``, or one built from the keyword ``options`` (with ``defaults`` for
    those not given), not both."""
    if config is not None:
        if options:
            raise ValueError(f"give config= or the simulation options {sorted(options)}, not both")
        return checks.instance(config, "config", SimulationConfig)
    return SimulationConfig.build(**{**defaults, **options})


class RoundBatches:
    """The train 'dataloader' the strategy hands to Lightning: one epoch = the rest of the current global round,
    ``accumulate`` mini-batches per local step."""

    def __init__(self, core: "QMLHFLCore", accumulate: int) -> None:
        self.core, self.accumulate = core, accumulate

    def __len__(self) -> int:
        # Lightning reads the length once per fit; under an adaptive tau a round may grow, so this is the longest
        # round the schedule allows, and the iterator ends the epoch where the round ends
        e = self.core.engine
        steps = e.steps_per_round if e.tau_schedule is None else e.tau_schedule.max_steps_per_round()
        return steps * self.accumulate

    def __iter__(self):
        e = self.core.engine
        for _ in range((e.steps_per_round - e.step_in_round) * self.accumulate):
            yield self.core.next_batch()


class QMLHFLCore:
    """QMLHFL inside a Lightning run (see the module docstring); the options are the strategy's."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = checks.instance(config, "config", SimulationConfig)
        self.shard: Any = None  # set by the multi-process strategy: this rank's rows ...
        self.comm: Any = None  # ... and its collectives
        self.engine: QMLHFLEngine | None = None
        self.sampler: DeviceSampler | None = None
        self.data: Any = None
        self.history: list[dict[str, Any]] = []  # one record per completed global round
        self.logs = DeviceLogCapture()
        self._pending_state: dict[str, Any] | None = None
        self._poisoned = False
        self._round_loss_sum = 0.0
        self._round_loss_steps = 0
        self._rng_state: Tensor | None = None
        self._cuda_rng_state: Tensor | None = None
        self._aug_generator: torch.Generator | None = None
        self._flipped: Tensor | None = None
        self._batch_idx = 0
        self._accumulate = 1
        self._group_sizes: list[int] = []
        self._device: torch.device = torch.device("cpu")
        self._checkpoint_path: Any = None

    # ------------------------------------------------------------------ setup: what Lightning features mean here
    def setup(self, strategy: "Strategy", trainer: Any) -> None:
        """Refuse, at setup, what the simulation cannot honour; remember what it must apply itself."""
        module = strategy.lightning_module
        if not module.automatic_optimization:
            raise ValueError(
                "QMLHFLStrategy needs automatic optimization: the strategy runs every device's optimizer step "
                "itself. Set self.automatic_optimization = True (manual optimization is not supported)"
            )
        if len(strategy.optimizers) != 1:
            raise ValueError(
                f"configure_optimizers must return exactly one optimizer, got {len(strategy.optimizers)}: every "
                f"simulated device runs one optimizer (use parameter groups for per-parameter settings)"
            )
        if strategy.lightning.is_overridden("configure_gradient_clipping", module):
            raise ValueError(
                "the LightningModule overrides configure_gradient_clipping, which acts on one model's .grad: "
                "under QMLHFLStrategy every device clips its own gradients. Use Trainer(gradient_clip_val=..., "
                "gradient_clip_algorithm='norm' | 'value') instead"
            )
        precision = strategy.precision_plugin
        if not strategy.lightning.supported_precision(precision):
            raise ValueError(
                f"precision plugin {type(precision).__name__} is not supported by QMLHFLStrategy; use "
                f"precision='32-true', '64-true', '16-true', 'bf16-true', '16-mixed' or 'bf16-mixed'"
            )
        if trainer.overfit_batches:
            raise ValueError("overfit_batches is not supported: the devices draw their own batches from their data")
        if not trainer.fast_dev_run and trainer.limit_train_batches != 1.0:
            raise ValueError(
                f"limit_train_batches={trainer.limit_train_batches!r} would cut global rounds short (one epoch is "
                f"one global round of prod(tau) steps): limit the run with global_rounds, max_epochs or max_steps"
            )
        self._accumulate = int(trainer.accumulate_grad_batches)
        self._clip = None
        if trainer.gradient_clip_val:
            algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
            self._clip = (algorithm, float(trainer.gradient_clip_val))
        if self.config.global_rounds is not None:
            trainer.fit_loop.max_epochs = self.config.global_rounds

    # ------------------------------------------------------------------ building the simulation from the data
    def round_batches(self, strategy: "Strategy", dataloader: Any) -> RoundBatches:
        if self.engine is None:
            self.build(strategy, dataloader)
        elif getattr(dataloader, "dataset", None) is not self._dataset:
            raise ValueError(
                "QMLHFLStrategy trains on exactly one train dataset: its simulation was built from another one (a "
                "second train dataloader, or a new fit with new data). Use one train dataloader, and a new "
                "QMLHFLStrategy for new data"
            )
        return RoundBatches(self, self._accumulate)

    def build(self, strategy: "Strategy", dataloader: Any) -> None:
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"the train dataloader must be a torch DataLoader, got {type(dataloader).__name__}")
        if dataloader.batch_size is None:
            raise ValueError(
                "the train dataloader needs a batch_size (the per-device mini-batch size); a custom batch_sampler "
                "cannot be split over devices"
            )
        sampler = dataloader.sampler
        shuffle = bool(sampler.shuffle) if isinstance(sampler, DistributedSampler) else \
            not isinstance(sampler, SequentialSampler)
        if not isinstance(sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
            warnings.warn(
                f"the train dataloader's sampler {type(dataloader.sampler).__name__} is replaced by per-device "
                f"shuffling of each device's own partition", UserWarning, stacklevel=2)
        self._dataset = dataloader.dataset
        device = self._device = strategy.root_device
        data = materialize_dataset(dataloader.dataset, dataloader.collate_fn, max_bytes=self.config.max_dataset_bytes,
                                   device=device)
        n = num_samples(data)
        labels = extract_labels(data, self.config.label_key, self.config.label_fn) if self.config.partition.needs_labels else None
        parts = self.config.partition(labels, self.config.hierarchy, seed=mix(self.config.seed, Stream.PARTITION), num_samples=n)
        self.sampler = DeviceSampler(parts, dataloader.batch_size, seed=mix(self.config.seed, Stream.SAMPLER),
                                     shuffle=shuffle)
        self.data = tree_map(lambda t: t.to(device), data)
        mass = torch.tensor([len(p) for p in parts], dtype=torch.float64) if self.config.weighting == "samples" else None
        module = strategy.lightning_module
        cls, groups = self._optimizer_spec(module, strategy.optimizers[0])
        self.engine = QMLHFLEngine(module, self._device_loss, config=self.config, optimizer=cls, device_mass=mass,
                                   device=device, param_groups=groups, grad_clip=self._clip, shard=self.shard,
                                   comm=self.comm)
        self._aug_generator = torch.Generator(device=device).manual_seed(mix(self.config.seed, Stream.AUGMENT))
        attack = self.config.layers[0].attack
        self._flipped = None  # bool per device: trains on flipped labels (a label-flipping attack at layer 1)
        if isinstance(attack, LabelFlip) and attack.fraction > 0:
            self._flipped = attack.byzantine(self.config.hierarchy.num_devices, self.config.seed, 1).to(device)
            map_labels(tree_map(lambda t: t[:1], data), lambda y: y, self.config.label_key)  # labels found?
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(mix(self.config.seed, Stream.TORCH_RNG))
            self._rng_state = torch.get_rng_state()
            self._cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state, module)
            self._pending_state = None
        cfg = self.config
        if cfg.smoothness is not None:
            from ..theory import check_learning_rate

            check_learning_rate(self.engine.optimizer.lr, cfg.smoothness, cfg.taus, list(cfg.compressors),
                                cfg.hierarchy, d=self.engine.num_params, strict=cfg.strict_lr,
                                server_optimizers=cfg.server_optimizers, local_solvers=cfg.local_solvers)

    @staticmethod
    def _optimizer_spec(module: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> tuple[type, list[dict[str, Any]]]:
        """The optimizer class and its parameter groups by parameter name (the user's optimizer may be built from
        ``self.parameters()``, ``self.trainer.model.parameters()`` or a submodule's)."""
        names = {id(p): n for n, p in module.named_parameters()}
        groups = []
        for i, g in enumerate(optimizer.param_groups):
            missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
            if missing:
                raise ValueError(
                    f"parameter group {i} of the optimizer holds tensors that are not parameters of the "
                    f"LightningModule (shapes {missing[:3]}): build the optimizer from the module's parameters"
                )
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [names[id(p)] for p in g["params"]]})
        return type(optimizer), groups

    def _cuda_devices(self) -> list[int]:
        d = self._device
        return [d.index or 0] if d.type == "cuda" else []

    # ------------------------------------------------------------------ one step
    @property
    def train_transform(self) -> Callable[[Any, torch.Generator], Any] | None:
        return self.config.train_transform

    @property
    def sim_time(self) -> float:
        """Simulated seconds at the end of the last completed global round (the engine's clock)."""
        return 0.0 if self.engine is None else self.engine.sim_time

    def next_batch(self) -> Any:
        """One mini-batch for every device that trains in the next local step (all, unless participation is
        partial: then only theirs is drawn, and the others keep their place in their data)."""
        assert self.sampler is not None and self.engine is not None
        e = self.engine
        active = e.upcoming_global_devices()  # every rank draws every training device's batch (one sampler)
        idx = self.sampler.next_indices(None if active is None else active.cpu())
        devices = torch.arange(self.config.hierarchy.num_devices) if active is None else active.cpu()
        if self.shard is not None:  # this rank's devices among them
            mine = e.local_index(0)[devices] >= 0
            idx, devices = idx[mine], devices[mine]
        batch = tree_map(lambda t: gather_batch(t, idx.to(self._device)), self.data)
        if self.train_transform is not None:
            if self.config.device_rng == "stream":  # every device's augmentation from its own (seed, device, step) stream
                parts = []
                for j, dev in enumerate(devices.tolist()):
                    self._aug_generator.manual_seed(mix(self.config.seed, Stream.AUGMENT, dev, e.total_steps))
                    parts.append(self.train_transform(tree_map(lambda t: t[j:j + 1], batch), self._aug_generator))
                batch = tree_map(lambda *xs: torch.cat(xs), *parts) if parts else batch
            else:
                batch = self.train_transform(batch, self._aug_generator)
        if self._flipped is not None:  # label-flipping Byzantine devices train on flipped labels
            batch = self._flip_labels(batch, self._flipped[devices.to(self._device)])
        return batch

    def _flip_labels(self, batch: Any, rows: Tensor) -> Any:
        attack = self.config.layers[0].attack

        def flip(y: Tensor) -> Tensor:
            mask = rows.view(-1, *([1] * (y.dim() - 1)))
            return torch.where(mask, attack.flip(y), y)

        return map_labels(batch, flip, self.config.label_key)

    def _global_values(self, values: Tensor) -> Tensor:
        """Per-device values of this rank's training devices -> those of every rank's, in device order (the
        identity in one process)."""
        if self.shard is None:
            return values
        e = self.engine
        active = e.upcoming_global_devices()
        devices = torch.arange(self.config.hierarchy.num_devices) if active is None else active.cpu()
        mine = devices[e.local_index(0)[devices] >= 0]
        ids = torch.cat(self.comm.all_gather(mine.to(values.device)))
        vals = torch.cat(self.comm.all_gather(values))
        return vals[torch.argsort(ids)]

    def _device_loss(self, module: Any, batch: Any) -> tuple[Tensor, dict[Any, Tensor]]:
        """The user's training_step on one device's weights and batch, with self.log captured."""
        with self.logs.installed(module) as captured:
            out = module.training_step(batch, self._batch_idx)
        if out is None:
            raise ValueError(
                "training_step returned None: under QMLHFLStrategy every device step needs a loss (skipping a "
                "step is not supported)"
            )
        extras: dict[str, Tensor] = {}
        if isinstance(out, dict):
            if "loss" not in out:
                raise ValueError(f"training_step returned a dict without 'loss' (keys {sorted(out)})")
            loss = out["loss"]
            extras = {k: v.detach().to(torch.float32).reshape(()) for k, v in out.items()
                      if k != "loss" and isinstance(v, Tensor) and v.numel() == 1}
        else:
            loss = out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"training_step must return a scalar loss tensor (or a dict with 'loss'), got {out!r}")
        aux = {(LOG_KEY, k): v for k, v in captured.items()}
        aux.update({(OUT_KEY, k): v for k, v in extras.items()})
        return loss.reshape(()), aux

    def _loss_scale(self, strategy: "Strategy") -> float:
        scale = 1.0 / self._accumulate if self._accumulate > 1 else 1.0
        scaler = self._scaler(strategy)
        if scaler is None:
            return scale
        return scale * float(scaler.scale(torch.ones((), device=self._device)))  # (scale() initialises the scaler)

    @staticmethod
    def _scaler(strategy: "Strategy") -> Any:
        precision = strategy.precision_plugin
        return strategy.lightning.scaler(precision)

    def training_step(self, strategy: "Strategy", batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Every device's training_step on its mini-batch: gradients (accumulated until the optimizer step) and
        the per-device logs, logged as device means."""
        assert self.engine is not None
        self._batch_idx = int(batch_idx)
        module = strategy.lightning_module
        self.logs.reset()
        with strategy.precision_plugin.train_step_context():
            with torch.random.fork_rng(devices=self._cuda_devices()):
                torch.set_rng_state(self._rng_state)
                if self._cuda_rng_state is not None:
                    torch.cuda.set_rng_state(self._cuda_rng_state, self._device)
                losses, aux = self.engine.compute_gradients(batch, self._loss_scale(strategy))
                losses = self._global_values(losses)
                aux = {k: self._global_values(v) for k, v in aux.items()}
                self._rng_state = torch.get_rng_state()
                if self._cuda_rng_state is not None:
                    self._cuda_rng_state = torch.cuda.get_rng_state(self._device)
        if losses.numel() == 0:  # no device takes part in this step (partial participation)
            return {"loss": torch.zeros((), device=self._device)}
        self.logs.log_step(module, aux, batch_size=self.sampler.batch_size)
        mean_loss = losses.mean()
        self._round_loss_sum += float(mean_loss) / self._accumulate
        out = {"loss": mean_loss}
        out.update({k[1]: v.mean() for k, v in aux.items() if k[0] == OUT_KEY})
        return out

    def optimizer_step(self, strategy: "Strategy", optimizer: torch.optim.Optimizer) -> None:
        """Eq. 3's update of every device with the step's gradients, then the aggregations that fall due."""
        assert self.engine is not None
        groups = optimizer.param_groups
        sizes = [len(g["params"]) for g in groups]
        if not self._group_sizes:
            self._group_sizes = sizes
        elif sizes != self._group_sizes:
            raise ValueError(
                f"the optimizer's parameter groups changed during training ({self._group_sizes} -> {sizes} "
                f"parameters per group): the set of trained parameters is fixed when training starts"
            )
        self.engine.optimizer.set_hyperparameters([{k: v for k, v in g.items() if k != "params"} for g in groups])
        try:
            result = self.engine.apply_step(scaler=self._scaler(strategy))
        except NonFiniteUpdateError:
            self._poisoned = True
            raise
        self._round_loss_steps += 1
        if result.round_completed:
            self._end_round(strategy.lightning_module)

    def _end_round(self, module: Any) -> None:
        e = self.engine
        assert e is not None
        e.load_cloud_into(module)
        rec = {
            "round": e.round,
            "local_steps": e.total_steps,
            "train_loss": self._round_loss_sum / max(1, self._round_loss_steps),
            "sim_time": e.sim_time,
            "bits_total": sum(e.bits_sent),
            "bits_baseline_total": sum(e.baseline_bits),
        }
        for n in range(1, e.N + 1):
            rec[f"bits_layer{n}"] = e.bits_sent[n - 1]
            rec[f"bits_round_layer{n}"] = e.round_bits[n - 1]
            rec[f"bits_baseline_layer{n}"] = e.baseline_bits[n - 1]
        stats = e.last_round_stats
        rec["time_compute"] = stats["time_compute"]
        for n in range(1, e.N + 1):
            rec[f"time_layer{n}"] = stats[f"time_layer{n}"]
            rec[f"participants_layer{n}"] = stats[f"participants_layer{n}"]
            rec[f"drops_layer{n}"] = stats[f"drops_layer{n}"]
        per_layer = ("clipped", "drift", "clip_fraction", "clip_norm", "noise_std", "epsilon", "attacked",
                     "attack_fraction", "rejected", "tau", "tau_next", "tau_wanted")
        for key in ("moves", "edge_failures", "edge_devices_min", "edge_devices_max", "epsilon", "energy",
                    "round_energy", *(f"{k}_layer{n}" for k in per_layer for n in range(1, e.N + 1))):
            if key in stats:
                rec[key] = stats[key]
        rec.update((k, v) for k, v in stats.items() if k.startswith("theory/"))  # measured constants, as named
        if not e.mobility.is_static:  # the current device count of every edge server (not logged as a metric)
            rec["edge_devices"] = e.tree.device_counts(1).tolist()
        self.history.append(rec)
        for k, v in rec.items():
            if isinstance(v, list):
                continue
            module.log(k if k.startswith("theory/") else f"fl/{k}", float(v), on_step=False, on_epoch=True, batch_size=1,
                       prog_bar=k in ("round", "train_loss"))
        self._round_loss_sum, self._round_loss_steps = 0.0, 0

    # ------------------------------------------------------------------ checkpointing
    @property
    def poisoned(self) -> bool:
        return self._poisoned

    def state_dict(self, engine_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The simulation's state; ``engine_state`` replaces the engine's own (a multi-process run stores the
        global one, or a sharded skeleton)."""
        assert self.engine is not None and self.sampler is not None
        return {
            "engine": self.engine.state_dict() if engine_state is None else engine_state,
            "sampler": self.sampler.state_dict(),
            "rng": self._rng_state.clone(),
            "cuda_rng": None if self._cuda_rng_state is None else self._cuda_rng_state.clone(),
            "aug_rng": self._aug_generator.get_state(),
            "history": [dict(h) for h in self.history],
            "round_loss": [self._round_loss_sum, self._round_loss_steps],
        }

    def load_state_dict(self, sd: dict[str, Any], module: Any) -> None:
        assert self.engine is not None and self.sampler is not None
        engine_sd = sd["engine"]
        if "sharded" in engine_sd:  # a multi-process run's sharded checkpoint: assemble the global state
            from .checkpoints import load_sharded

            if self._checkpoint_path is None:
                raise ValueError("a sharded checkpoint is loaded from its file (its tensors lie beside it)")
            engine_sd = load_sharded(engine_sd, self._checkpoint_path, self.config.hierarchy.nodes_per_layer)
        self.engine.load_state_dict(engine_sd)
        self.sampler.load_state_dict(sd["sampler"])
        self._rng_state = sd["rng"].clone()
        self._cuda_rng_state = None if sd["cuda_rng"] is None else sd["cuda_rng"].clone()
        self._aug_generator.set_state(sd["aug_rng"])
        self.history = [dict(h) for h in sd["history"]]
        if sd["engine"].get("format_version", 1) == 1 and "population" not in sd["engine"]:  # before the clock
            self.engine.clock.now = float(sd.get("sim_time", 0.0))
        self._round_loss_sum, self._round_loss_steps = float(sd["round_loss"][0]), int(sd["round_loss"][1])
        self.engine.load_cloud_into(module)

    def restore(self, sd: dict[str, Any] | None, module: Any, path: Any = None) -> None:
        """Load a checkpoint's simulation state now, or when the simulation is built (at the first training
        dataloader). ``path``: the checkpoint file (where a sharded checkpoint's tensors lie beside)."""
        self._checkpoint_path = path
        if sd is None:
            return
        if self.engine is not None:
            self.load_state_dict(sd, module)
        else:
            self._pending_state = sd

