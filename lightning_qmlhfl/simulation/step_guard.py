"""The guard around a step whose effects must stay inside it (:class:`StepGuard`): one vmapped step, whose
torchmetrics updates and module attributes would be batched tensors escaping the transform, or the loop
executor's concurrent rows, whose updates would race."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["StepGuard", "VmapUnsupportedError", "ConcurrentStepError", "MISSING"]


class VmapUnsupportedError(RuntimeError):
    """The user's step cannot run under ``torch.func.vmap`` (``executor="vmap"`` was asked for explicitly)."""


class ConcurrentStepError(RuntimeError):
    """The user's step cannot run with ``forwards="concurrent"``: its effects depend on the order of the rows."""


def metric_class() -> type | tuple:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return ()
    return Metric


def _refuse_metric(error: type[Exception], why: str, metric: nn.Module, *args: Any, **kwargs: Any) -> Any:
    raise error(f"the step updates the torchmetrics {type(metric).__name__} ({why})")


class StepGuard:
    """Around one step: makes torchmetrics updates raise ``error`` (saying ``metric_why``) before they touch any
    state, records every module attribute the user's code assigns and puts all of them back. A step that
    assigned attributes raises ``error`` on exit, after the restore, so that nothing of it survives."""

    def __init__(self, module: nn.Module, error: type[Exception] = VmapUnsupportedError,
                 metric_why: str = "its states are plain tensors updated in place, which vmap cannot batch") -> None:
        self.error, self.metric_why = error, metric_why
        metric = metric_class()
        self.modules = list(module.named_modules())
        self.metrics = [m for _, m in self.modules if metric and isinstance(m, metric)]

    def __enter__(self) -> "StepGuard":
        self._methods = []
        for m in self.metrics:
            for attr in ("forward", "update"):
                self._methods.append((m, attr, m.__dict__.get(attr, MISSING)))
                m.__dict__[attr] = functools.partial(_refuse_metric, self.error, self.metric_why, m)
        metric_ids = {id(m) for m in self.metrics}
        self._snapshot = [(name, m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                          for name, m in self.modules if id(m) not in metric_ids]
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        changed = []
        for name, m, d, params, bufs, mods in self._snapshot:
            for table, old, what in ((m.__dict__, d, ""), (m._parameters, params, " (parameter)"),
                                     (m._buffers, bufs, " (buffer)"), (m._modules, mods, " (submodule)")):
                if table.keys() == old.keys() and all(table[k] is v for k, v in old.items()):
                    continue
                keys = sorted(set(table) ^ set(old) | {k for k in set(table) & set(old) if table[k] is not old[k]})
                changed += [f"{name + '.' if name else ''}{k}{what}" for k in keys]
                table.clear()
                table.update(old)
        for m, attr, old in self._methods:
            if old is MISSING:
                m.__dict__.pop(attr, None)
            else:
                m.__dict__[attr] = old
        if changed and exc_type is None:
            raise self.error(f"the step assigns module attribute(s) {changed}")


MISSING = object()
