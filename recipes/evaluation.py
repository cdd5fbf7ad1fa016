"""Classifier metrics outside Lightning's loops (the test curve, the per-device evaluation), and whether a module
is a classifier they apply to.

Per-sample metrics (:func:`per_sample_metrics`): a module may define ``per_sample_metrics(batch) -> {"loss": [B],
"acc": [B]}`` (float per-sample loss and score in [0, 1]; the built-in models do); otherwise the batch must be
``(x, y, ...)`` with int64 class ids ``y`` ``[B]`` and ``module(x)`` logits ``[B, C]``: loss = cross-entropy, acc =
1 where the argmax is ``y``. Evaluation runs in eval mode (no dropout, BatchNorm running statistics) under
``no_grad``; the metrics draw no random numbers, so they never change the simulation.

Any other module (an autoencoder, a regression model) is not evaluated with these metrics: the recipes test it
with its own ``test_step`` through ``trainer.test`` (:mod:`recipes.testing`). :func:`classifier_problem` tells the
two apart on one batch, before training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["EvalMode", "TestLoader", "classification_metrics", "classifier_problem", "device_of", "evaluate_loader",
           "map_tensors", "per_sample_metrics"]


def per_sample_metrics(module: nn.Module, batch: Any, detach: bool = True) -> dict[str, Tensor]:
    """``{"loss": float [B], "acc": float [B]}`` of ``module`` on ``batch`` (see the module docstring); with
    ``detach=False`` the loss keeps its graph (a training objective)."""
    hook = getattr(module, "per_sample_metrics", None)
    if callable(hook):
        out = hook(batch)
        if not isinstance(out, dict) or "loss" not in out or "acc" not in out:
            raise ValueError(f"{type(module).__name__}.per_sample_metrics(batch) must return a dict with per-sample "
                             f"'loss' and 'acc' tensors [B], got {type(out).__name__}")
        loss, acc = out["loss"], out["acc"]
        if detach:
            loss, acc = loss.detach(), acc.detach()
        return {"loss": loss.float().reshape(-1), "acc": acc.float().reshape(-1)}
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"cannot evaluate {type(module).__name__} on a batch of type {type(batch).__name__}: the default "
            f"evaluation needs batches (x, y, ...) with class ids y; define per_sample_metrics(batch) -> "
            f"{{'loss': [B], 'acc': [B]}} on the module, or turn the evaluation off (eval.test_every=null, "
            f"eval.local_fraction=0)")
    x, y = batch[0], batch[1]
    logits = module(x)
    if (not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or not isinstance(logits, Tensor)
            or logits.dim() != 2 or logits.shape[0] != y.shape[0]):
        raise ValueError(
            f"cannot evaluate {type(module).__name__}: the default evaluation needs integer class ids y [B] and "
            f"logits module(x) [B, C], got y {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))} "
            f"and output {tuple(getattr(logits, 'shape', ()))}; define per_sample_metrics(batch) on the module")
    return classification_metrics(logits, y)


def classification_metrics(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-sample cross-entropy (in float32) and correctness of the argmax: ``{"loss": [B], "acc": [B]}``."""
    y = y.long()
    return {"loss": F.cross_entropy(logits.float(), y, reduction="none"), "acc": (logits.argmax(dim=1) == y).float()}


class EvalMode:
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


def map_tensors(fn: Any, data: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) batch or dataset; other leaves are kept."""
    return tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, data)


def device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def evaluate_loader(module: nn.Module, loader: Any) -> dict[str, float]:
    """Mean ``acc`` and ``loss`` of ``module`` over every sample of ``loader`` (an iterable of batches):
    ``{"acc": ..., "loss": ..., "n": samples}``."""
    device = device_of(module)
    acc = loss = 0.0
    n = 0
    with EvalMode(module):
        for batch in loader:
            m = per_sample_metrics(module, map_tensors(lambda t: t.to(device), batch))
            acc += float(m["acc"].double().sum())
            loss += float(m["loss"].double().sum())
            n += int(m["acc"].numel())
    if n == 0:
        raise ValueError("evaluation loader is empty")
    return {"acc": acc / n, "loss": loss / n, "n": n}


class TestLoader:
    """A datamodule's test dataloader, made at its first use (after Lightning set the datamodule up for fit; a
    datamodule that needs it gets ``setup("test")`` first, as ``trainer.test`` would)."""

    def __init__(self, dm: Any) -> None:
        self.dm, self.loader = dm, None

    def __iter__(self):
        if self.loader is None:
            from recipes.datamodules import ImageDataModule

            if not isinstance(self.dm, ImageDataModule):  # sets itself up once, for every stage
                self.dm.setup("test")
            self.loader = self.dm.test_dataloader()
        return iter(self.loader)


def classifier_problem(module: nn.Module, batch: Any) -> str | None:
    """Why the classifier metrics cannot evaluate ``module`` on ``batch`` (None: they can). A module with
    ``per_sample_metrics`` is always evaluated with it; otherwise ``batch`` must be ``(x, y, ...)`` with integer
    class ids ``y`` ``[B]`` and ``module(x)`` must be logits ``[B, C]`` with ``C`` above every class id. Runs the
    module once in eval mode on a copy of the random state (the caller's random numbers are not used up)."""
    if callable(getattr(module, "per_sample_metrics", None)):
        return None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return f"its batches are {type(batch).__name__}, not (x, y, ...) pairs"
    y = batch[1]
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
        return f"y is {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}, not class ids [B]"
    device = device_of(module)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), EvalMode(module):
            out = module(map_tensors(lambda t: t.to(device), batch)[0])
    except Exception as e:  # noqa: BLE001 - any failure means: not a classifier these metrics understand
        return f"module(x) fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0]:
        return f"module(x) returns {tuple(getattr(out, 'shape', ())) or type(out).__name__}, not logits [B, C]"
    if y.numel() and int(y.max()) >= out.shape[1]:
        return f"module(x) has {out.shape[1]} outputs per sample but a class id is {int(y.max())}"
    return None
