"""Evaluation outside Lightning's loops: the test set, and every device's held-out local data.

Per-sample metrics (:func:`per_sample_metrics`): a module may define ``per_sample_metrics(batch) -> {"loss": [B],
"acc": [B]}`` (float per-sample loss and score in [0, 1]); otherwise the batch must be ``(x, y, ...)`` with int64 class
ids ``y`` ``[B]`` and ``module(x)`` logits ``[B, C]``: loss = cross-entropy, acc = 1 where the argmax is ``y``.
Evaluation runs in eval mode (no dropout, BatchNorm running statistics) under ``no_grad`` and draws no random numbers,
so it never changes the simulation.

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
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_qmlhfl.data import DeviceSampler, EmptyPartitionError, Partitioner
from recipes.options import check_fraction
from recipes.splits import stratified_split

__all__ = ["HoldoutPartitioner", "device_summary", "evaluate_loader", "per_device_accuracy", "per_sample_metrics",
           "personalised_accuracy", "plot_device_accuracy"]


def per_sample_metrics(module: nn.Module, batch: Any) -> dict[str, Tensor]:
    """``{"loss": float [B], "acc": float [B]}`` of ``module`` on ``batch`` (see the module docstring)."""
    hook = getattr(module, "per_sample_metrics", None)
    if callable(hook):
        out = hook(batch)
        if not isinstance(out, dict) or "loss" not in out or "acc" not in out:
            raise ValueError(f"{type(module).__name__}.per_sample_metrics(batch) must return a dict with per-sample "
                             f"'loss' and 'acc' tensors [B], got {type(out).__name__}")
        return {"loss": out["loss"].detach().float().reshape(-1), "acc": out["acc"].detach().float().reshape(-1)}
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"cannot evaluate {type(module).__name__} on a batch of type {type(batch).__name__}: the default "
            f"evaluation needs batches (x, y, ...) with class ids y; define per_sample_metrics(batch) -> "
            f"{{'loss': [B], 'acc': [B]}} on the module, or turn the evaluation off (eval.test_every=0, "
            f"eval.local_fraction=0)")
    x, y = batch[0], batch[1]
    logits = module(x)
    if (not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or not isinstance(logits, Tensor)
            or logits.dim() != 2 or logits.shape[0] != y.shape[0]):
        raise ValueError(
            f"cannot evaluate {type(module).__name__}: the default evaluation needs integer class ids y [B] and "
            f"logits module(x) [B, C], got y {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))} "
            f"and output {tuple(getattr(logits, 'shape', ()))}; define per_sample_metrics(batch) on the module")
    y = y.long()
    return {"loss": F.cross_entropy(logits.float(), y, reduction="none"),
            "acc": (logits.argmax(dim=1) == y).float()}


class _EvalMode:
    """Eval mode and no_grad for the block; the module's training flag is restored afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.grad = module, torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.module.train(self.was_training)


def _map_tensors(fn: Any, data: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) batch or dataset; other leaves are kept."""
    return tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, data)


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def evaluate_loader(module: nn.Module, loader: Any) -> dict[str, float]:
    """Mean ``acc`` and ``loss`` of ``module`` over every sample of ``loader`` (an iterable of batches):
    ``{"acc": ..., "loss": ..., "n": samples}``."""
    device = _device_of(module)
    acc = loss = 0.0
    n = 0
    with _EvalMode(module):
        for batch in loader:
            m = per_sample_metrics(module, _map_tensors(lambda t: t.to(device), batch))
            acc += float(m["acc"].double().sum())
            loss += float(m["loss"].double().sum())
            n += int(m["acc"].numel())
    if n == 0:
        raise ValueError("evaluation loader is empty")
    return {"acc": acc / n, "loss": loss / n, "n": n}


def _scores(module: nn.Module, data: Any, index: Tensor, batch_size: int) -> Tensor:
    """Per-sample ``acc`` (float64 [len(index)]) of ``module`` on ``data[index]``, in chunks of ``batch_size``."""
    out = []
    with _EvalMode(module):
        for chunk in index.split(batch_size):
            part = _map_tensors(lambda t: t.index_select(0, chunk.to(t.device)), data)
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
            batch = _map_tensors(lambda t: gather_batch(t, idx), strategy.train_data)
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
    return per_sample_metrics(module, batch)["loss"].mean()


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


def plot_device_accuracy(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Box plot of the per-device accuracies of every evaluated round (cloud model, and personalised models when
    recorded), saved to ``path``. Returns False (and writes nothing) when no round has per-device results."""
    rec = [r for r in records if r.get("local_cloud_acc")]
    if not rec:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    personal = any(r.get("local_personal_acc") for r in rec)
    rounds = [r["round"] for r in rec]
    step = min((b - a for a, b in zip(rounds, rounds[1:])), default=1) or 1
    width = 0.35 * step if personal else 0.6 * step
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rec) + 3), 4))
    series = [("local_cloud_acc", "cloud model", "tab:blue", -0.5 if personal else 0.0)]
    if personal:
        series.append(("local_personal_acc", "personalised", "tab:orange", 0.5))
    handles, labels = [], []
    for key, label, color, shift in series:
        data = [[100 * v for v in r[key]] for r in rec if r.get(key)]
        pos = [r["round"] + shift * width for r in rec if r.get(key)]
        bp = ax.boxplot(data, positions=pos, widths=width, patch_artist=True, manage_ticks=False,
                        flierprops={"markersize": 3})
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.5)
        (mean_line,) = ax.plot(pos, [sum(d) / len(d) for d in data], color=color, marker=".", lw=1)
        handles += [bp["boxes"][0], mean_line]
        labels += [label, f"{label}: mean over devices"]
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_xlabel("global round")
    ax.set_ylabel("device accuracy on its held-out data [%]")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
