"""``self.log`` / ``self.log_dict`` inside a device's ``training_step``: captured per device, logged once per step.

Semantics (documented in the README's compatibility table):

- A tensor or Python number logged by every device is logged once per Trainer step as the **mean over the
  devices** that ran the step, with the user's own options (``on_step``, ``on_epoch``, ``prog_bar``, ``logger``,
  ``reduce_fx``, ``sync_dist``, ``batch_size``, ...). ``reduce_fx`` then reduces these per-step means over the
  epoch (one global round), exactly as it reduces per-step values in plain Lightning.
- A torchmetrics ``Metric`` object logged by name (``self.log("acc", self.train_acc)``) is logged as the object
  itself: updated by every device's ``training_step`` in device order, it accumulates over every device's batches
  as if they were consecutive batches of one epoch, and its epoch value (``compute()``) covers all of them. Its
  step value is the last device's batch value (what its ``forward`` cached last).
- Values must be scalars, as in plain Lightning; every device must log the same names.
"""

from __future__ import annotations

import inspect
import numbers
from contextlib import contextmanager
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = ["DeviceLogCapture", "LOG_KEY", "OUT_KEY"]

LOG_KEY = "log"  # aux keys (LOG_KEY, name): values logged with self.log
OUT_KEY = "out"  # aux keys (OUT_KEY, name): extra scalar entries of a dict returned by training_step

_LOG_SIGNATURE = inspect.signature(pl.LightningModule.log)
_LOG_DICT_SIGNATURE = inspect.signature(pl.LightningModule.log_dict)


class DeviceLogCapture:
    """Stands in for ``LightningModule.log`` / ``log_dict`` while the devices' ``training_step`` s run.

    ``options[name]``: the user's keyword options of the first call for that name; ``metrics[name]``: a Metric
    object logged by name. Scalars go into the dict :meth:`installed` yields (one per device call), which the
    executor stacks over the devices.
    """

    def __init__(self) -> None:
        self.options: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, Metric] = {}

    def reset(self) -> None:
        self.options.clear()
        self.metrics.clear()

    @contextmanager
    def installed(self, module: pl.LightningModule) -> Iterator[dict[str, Tensor]]:
        captured: dict[str, Tensor] = {}

        def log(*args: Any, **kwargs: Any) -> None:
            bound = _LOG_SIGNATURE.bind(module, *args, **kwargs)
            bound.apply_defaults()
            opts = dict(bound.arguments)
            opts.pop("self")
            name, value = opts.pop("name"), opts.pop("value")
            self._capture(captured, name, value, opts)

        def log_dict(*args: Any, **kwargs: Any) -> None:
            bound = _LOG_DICT_SIGNATURE.bind(module, *args, **kwargs)
            bound.apply_defaults()
            opts = dict(bound.arguments)
            opts.pop("self")
            dictionary = opts.pop("dictionary")
            items = dictionary.items() if not isinstance(dictionary, MetricCollection) else dictionary.items(
                keep_base=False, copy_state=False)
            for name, value in items:
                self._capture(captured, name, value, dict(opts))

        module.__dict__["log"], module.__dict__["log_dict"] = log, log_dict
        try:
            yield captured
        finally:
            module.__dict__.pop("log", None)
            module.__dict__.pop("log_dict", None)

    def _capture(self, captured: dict[str, Tensor], name: str, value: Any, opts: dict[str, Any]) -> None:
        if not isinstance(name, str):
            raise TypeError(f"self.log: the name must be a string, got {name!r}")
        self.options.setdefault(name, opts)
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, Tensor):
            raise ValueError(f"self.log({name!r}, ...) got a {type(value).__name__}; log a scalar tensor, a number "
                             f"or a torchmetrics Metric")
        if value.numel() != 1:
            raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; values must be "
                             f"scalars (one number per step and device)")
        captured[name] = value.detach().to(torch.float32).reshape(())

    def log_step(self, module: pl.LightningModule, aux: dict[Any, Tensor], batch_size: int,
                 mask: Tensor | None = None) -> None:
        """Log this step's values on the real module: device means of the scalars (over ``mask``'s devices when
        given), Metric objects as themselves."""
        for key, values in aux.items():
            if not (isinstance(key, tuple) and key[0] == LOG_KEY):
                continue
            name = key[1]
            kw = dict(self.options.get(name, {}))
            if kw.get("batch_size") is None:
                kw["batch_size"] = batch_size
            v = values if mask is None else values[mask]
            module.log(name, v.mean(), **kw)
        for name, metric in self.metrics.items():
            kw = dict(self.options.get(name, {}))
            if kw.get("batch_size") is None:
                kw["batch_size"] = batch_size
            module.log(name, metric, **kw)
