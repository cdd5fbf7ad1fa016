"""Every device's held-out local data (``eval.local_fraction``): the split, the evaluation and its callback.

Per-device evaluation. With ``eval.local_fraction = f > 0`` the recipe wraps its partitioner in
:class:`HoldoutPartitioner`: the strategy partitions the training data it is given as usual, and then, before any
training, every device's share is split into a training part (what the strategy trains on: the sampler table holds
only it) and a held-out part of ``round(f * n_i)`` samples (at least 1), stratified by label within the device. So
the held-out data is per device, drawn from the device's own (non-IID) distribution, never trained on, and the
split is a pure function of the seed (it is recomputed identically when a run resumes). Every ``eval.every`` rounds
(and at the last round):

- **cloud**: the cloud model w_t on every device's held-out data (one pass over all held-out samples);
- **personalised** (``eval.personalized``): every device's own model after local training. Inside the simulation a
  device's model after its last local steps is never observable through the strategy's public state: the update of
  a layer-1 period's last step and the aggregation and re-synchronisation that end it happen in one call, and at a
  round's end every device row equals the cloud model. So the personalised model is re-created: a copy of the cloud
  model trained for ``eval.personal_steps`` local steps (default tau_1, one layer-1 period) by every device on its
  own training part, with the devices' optimizer class, parameter groups and current learning rate (fresh optimizer
  state), each device's mini-batches drawn from its own data by a seeded sampler, and the per-sample loss above as
  the objective; then evaluated on that device's held-out data. It runs on a separate engine with its own
  random-number stream, so the simulation is unchanged. (With a library hook that exposes the device rows before
  the round's last aggregation, the in-simulation models could be evaluated instead.)

Statistics over devices (:func:`device_summary`): mean, std (over devices, ddof 0), worst10 (the mean accuracy of
the worst 10 % of devices, at least one), p10 (10th percentile), min and best (max).

:class:`LocalEvaluation` is the callback that runs it: every ``eval.every`` rounds and at the last round (through
:class:`~recipes.recorder.RunRecorder`), and at the end for a run stopped early.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lightning_qmlhfl.data import DeviceSampler, EmptyPartitionError, Partitioner
from recipes.evaluation import EvalMode, classifier_problem, map_tensors, per_sample_metrics
from recipes.options import ConfigError, check_fraction, int_option
from recipes.recorder import RoundEvaluation, RunRecorder
from recipes.splits import stratified_split

__all__ = ["HoldoutPartitioner", "LocalEvaluation", "device_summary", "per_device_accuracy", "personalised_accuracy"]


def _scores(module: nn.Module, data: Any, index: Tensor, batch_size: int) -> Tensor:
    """Per-sample ``acc`` (float64 [len(index)]) of ``module`` on ``data[index]``, in chunks of ``batch_size``."""
    out = []
    with EvalMode(module):
        for chunk in index.split(batch_size):
            part = map_tensors(lambda t: t.index_select(0, chunk.to(t.device)), data)
            out.append(per_sample_metrics(module, part)["acc"].double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def per_device_accuracy(module: nn.Module, data: Any, holdout: Sequence[Tensor], batch_size: int = 1000) -> Tensor:
    """Accuracy of one model (e.g. the cloud's) on every device's held-out samples: float64 ``[D]``.

    ``data``: the strategy's materialised training data (``strategy.train_data``); ``holdout[i]``: device i's
    held-out indices into it."""
    sizes = torch.tensor([len(h) for h in holdout], dtype=torch.long)
    index = torch.cat([torch.as_tensor(h, dtype=torch.long) for h in holdout])
    owner = torch.repeat_interleave(torch.arange(len(holdout)), sizes)
    s = _scores(module, data, index, batch_size)
    return torch.zeros(len(holdout), dtype=torch.float64).index_add_(0, owner, s) / sizes.double()


def personalised_accuracy(strategy: Any, module: nn.Module, holdout: Sequence[Tensor], steps: int, seed: int,
                          batch_size: int = 1000) -> Tensor:
    """Accuracy of every device's personalised model on its held-out data: float64 ``[D]``.

    The personalised model of device i is the current module weights (the cloud model at a round's end) trained for
    ``steps`` local steps on device i's training part (the strategy's sampler table) with the devices' optimizer
    (see the module docstring). ``seed`` seeds the mini-batch draws and dropout masks (use one per round, so a
    resumed run redraws the same); the simulation's random state is not touched."""
    from lightning_qmlhfl import Hierarchy
    from lightning_qmlhfl.simulation.engine import QMLHFLEngine, gather_batch

    trainer = strategy.lightning_module.trainer
    sampler = strategy.sampler
    D = len(holdout)
    parts = [sampler.table[i, : int(sampler.sizes[i])].clone() for i in range(D)]
    device = strategy.root_device
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    clip = None
    if trainer.gradient_clip_val:
        algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
        clip = (algorithm, float(trainer.gradient_clip_val))
    executor = strategy.engine.executor_name
    executor = executor if executor in ("vmap", "loop") else "auto"
    template = copy.deepcopy(module)
    template.train()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        engine = QMLHFLEngine(template, per_sample_metrics_train,
                              Hierarchy.balanced([D]), [steps + 1], None, optimizer=type(optimizer),
                              param_groups=groups, executor=executor, seed=seed, device=device,
                              grad_clip=clip)
        draws = DeviceSampler(parts, sampler.batch_size, seed=seed + 1)
        generator = torch.Generator(device=device).manual_seed(seed + 2)
        for _ in range(steps):
            idx = draws.next_indices().to(device)
            batch = map_tensors(lambda t: gather_batch(t, idx), strategy.train_data)
            if strategy.train_transform is not None:
                batch = strategy.train_transform(batch, generator)
            engine.local_step(batch)
    acc = torch.zeros(D, dtype=torch.float64)
    for i in range(D):
        engine.state.load_row_into(template, 0, i)
        s = _scores(template, strategy.train_data, torch.as_tensor(holdout[i], dtype=torch.long), batch_size)
        acc[i] = s.mean()
    return acc


def per_sample_metrics_train(module: nn.Module, batch: Any) -> Tensor:
    """The mean per-sample loss: the objective of the personalisation steps."""
    return per_sample_metrics(module, batch, detach=False)["loss"].mean()


def device_summary(values: Tensor | Sequence[float]) -> dict[str, float]:
    """Statistics of per-device accuracies ``[D]``: mean, std (ddof 0), worst10 (mean of the lowest
    max(1, ceil(0.1 D))), p10 (10th percentile, linear interpolation), min, best (max)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError("device_summary of no devices")
    k = max(1, math.ceil(0.1 * v.numel()))
    return {"mean": float(v.mean()), "std": float(v.std(correction=0)), "worst10": float(v.sort().values[:k].mean()),
            "p10": float(torch.quantile(v, 0.1)), "min": float(v.min()), "best": float(v.max())}


class HoldoutPartitioner(Partitioner):
    """Wraps a partitioner: every device's share is split into a training part (returned to the strategy) and a
    held-out part (:attr:`holdout`), ``round(fraction * n_i)`` samples (at least 1, at most n_i - 1), stratified by
    label when the wrapped partitioner uses labels. See the module docstring.

    Attributes:
        holdout: after the call, one sorted int64 index tensor per device (indices into the training dataset).
        full: after the call, every device's whole share (training part + held-out part).
    """

    def __init__(self, inner: Partitioner, fraction: float) -> None:
        self.inner = inner
        self.fraction = check_fraction(fraction, "eval.local_fraction", allow_zero=False)
        self.needs_labels = inner.needs_labels
        self.group_by_edge = inner.group_by_edge
        self.holdout: list[Tensor] | None = None
        self.full: list[Tensor] | None = None

    def __call__(self, labels: Tensor | None, hierarchy: Any, seed: int = 0,
                 num_samples: int | None = None) -> list[Tensor]:
        parts = self.inner(labels, hierarchy, seed=seed, num_samples=num_samples)
        lab = None if labels is None else torch.as_tensor(labels).reshape(-1).long().cpu()
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919) % (2**63))
        train, held = [], []
        for i, p in enumerate(parts):
            if p.numel() < 2:
                raise EmptyPartitionError(
                    f"eval.local_fraction={self.fraction}: device {i} has {p.numel()} sample(s), too few to hold one "
                    f"out and still train; use more data, fewer devices or eval.local_fraction=0")
            keep, hold = stratified_split(None if lab is None else lab[p], self.fraction, g,
                                          num_samples=p.numel(), min_held=1, min_kept=1)
            train.append(p[keep])
            held.append(p[hold])
        self.full, self.holdout = list(parts), held
        return train

    def _split(self, labels: Tensor, index: Tensor, parts: int, g: torch.Generator) -> list[Tensor]:
        raise NotImplementedError  # __call__ delegates to the wrapped partitioner

    def __repr__(self) -> str:
        return f"{self.inner!r} with {self.fraction:g} of every device's share held out"


class LocalEvaluation(RoundEvaluation):
    """Per-device evaluation (see the module docstring) of a run whose strategy partitions through a
    :class:`HoldoutPartitioner` (``eval.local_fraction > 0``; otherwise this callback does nothing).

    Args:
        every: evaluate every this many rounds (and at the last round).
        personalized: also evaluate every device's personalised model.
        personal_steps: local steps of the personalisation (None: tau_1).
        seed: the run seed; round r's personalisation draws from ``seed * 1_000_003 + r``.
        batch_size: evaluation batch size.
    """

    def __init__(self, every: int = 1, personalized: bool = False, personal_steps: int | None = None,
                 seed: int = 0, batch_size: int = 1000) -> None:
        self.every = int_option(every, "eval.every", 1, allow_none=False)
        self.personalized = bool(personalized)
        self.personal_steps = int_option(personal_steps, "eval.personal_steps", 1)
        self.seed = int(seed)
        self.batch_size = int_option(batch_size, "eval.batch_size", 1, allow_none=False)
        self.holdout: HoldoutPartitioner | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        part = getattr(trainer.strategy, "partitioner", None)
        self.holdout = part if isinstance(part, HoldoutPartitioner) else None
        if self.holdout is None or stage != "fit":
            return
        if not callable(getattr(module, "per_sample_metrics", None)):
            with torch.random.fork_rng():  # the probe's data loading draws nothing from the run's random state
                batch = next(iter(trainer.datamodule.train_dataloader()), None) if trainer.datamodule else None
                problem = "no training batch" if batch is None else classifier_problem(module, batch)
            if problem is not None:
                raise ConfigError(f"eval.local_fraction={self.holdout.fraction:g} evaluates every device with the "
                                  f"recipes' classifier metrics, but {type(module).__name__} is not a classifier "
                                  f"they understand ({problem}); give it per_sample_metrics(batch) or set "
                                  f"eval.local_fraction=0")

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule, round_idx: int) -> dict[str, Any]:
        """``local_cloud_acc`` (per device, [D] list) and its :func:`device_summary` as ``local_cloud_acc_<stat>``;
        the same for ``local_personal_acc`` when personalised."""
        assert self.holdout is not None
        held = self.holdout.holdout
        if held is None:
            raise RuntimeError("the holdout partitioner has not been called: the strategy has not built its data")
        strategy = trainer.strategy
        out: dict[str, Any] = {}
        cloud = per_device_accuracy(module, strategy.train_data, held, self.batch_size)
        out["local_cloud_acc"] = cloud.tolist()
        out.update({f"local_cloud_acc_{k}": v for k, v in device_summary(cloud).items()})
        if self.personalized:
            seed = (self.seed * 1_000_003 + int(round_idx)) % (2**62)
            steps = self.personal_steps or int(strategy.taus[0])
            pers = personalised_accuracy(strategy, module, held, steps, seed, self.batch_size)
            out["local_personal_acc"] = pers.tolist()
            out.update({f"local_personal_acc_{k}": v for k, v in device_summary(pers).items()})
        return out

    def evaluate_round(self, trainer: L.Trainer, module: L.LightningModule, round_idx: int, last: bool
                       ) -> dict[str, Any]:
        if self.holdout is None or not (round_idx % self.every == 0 or last):
            return {}
        return self.evaluate(trainer, module, round_idx)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A run that stopped before its last planned round: its last round is evaluated now."""
        if self.holdout is None or not trainer.is_global_zero:
            return
        records = RunRecorder.of(trainer).records
        if records and "local_cloud_acc" not in records[-1]:
            records[-1].update(self.evaluate(trainer, module, int(records[-1]["round"])))
