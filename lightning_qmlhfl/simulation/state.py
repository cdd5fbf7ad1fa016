"""Declared state: every piece of a simulation's state is registered once, with the layer whose rows it holds and
whether those rows are split over the ranks of a multi-process run; saving, loading, gathering and sharded
checkpoints are generic over the registry.

An entry is a name, a getter, a loader and a rule that says which of its tensors are rows of which layer:

- ``rows=m`` (an int): every tensor of the entry is a stack of layer m's rows (dim 0);
- ``rows=None``: the entry is the same on every rank (counters, the population's draws, the clock);
- ``rows=callable``: ``rows(value, tensor) -> m or None`` per tensor of the entry's ``value`` (a torch optimizer's
  state mixes per-row tensors and scalars; the value says how many rows it holds).

Rows of layers at or below a multi-process run's cut layer are sharded (each rank holds its own) unless the entry
says ``sharded=False``. :class:`StateRegistry` turns the entries into one flat ``{name: value}`` state
(:meth:`~StateRegistry.state_dict`), loads it back, and maps a function over the sharded rows
(:meth:`~StateRegistry.map_sharded`: gathering to one process, taking one rank's rows, writing them apart).

Checkpoint format: ``{"format_version": 2, "config": SimulationConfig.identity(), "param_layout": [...],
"state": {name: value}}``. :func:`migrate` turns the format of earlier versions (1: the nested dict written before
the registry, with the configuration as ``repr()`` strings) into the current one; it is the one place that knows
old formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

__all__ = ["FORMAT_VERSION", "StateEntry", "StateRegistry", "migrate", "clone_state"]

FORMAT_VERSION = 2

Rows = int | Callable[[Any, Tensor], int | None] | None


def clone_state(value: Any) -> Any:
    """A deep copy of nested dicts / lists / tuples of tensors and plain values (tensors cloned)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@dataclass(frozen=True)
class StateEntry:
    """One registered piece of state (module docstring)."""

    name: str
    get: Callable[[], Any]
    load: Callable[[Any], None]
    rows: Rows = None
    sharded: bool = True

    def layer_of(self, value: Any, t: Tensor) -> int | None:
        """The layer whose rows the tensor ``t`` of the entry's ``value`` holds, or None (the same on every rank)."""
        if callable(self.rows):
            return self.rows(value, t)
        return self.rows


class StateRegistry:
    """The entries of one simulation, in registration order (module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, StateEntry] = {}

    def register(self, name: str, get: Callable[[], Any], load: Callable[[Any], None], rows: Rows = None,
                 sharded: bool = True) -> None:
        if name in self._entries:
            raise ValueError(f"state {name!r} is registered twice")
        self._entries[name] = StateEntry(name, get, load, rows, sharded)

    def register_rows(self, name: str, tensor: Tensor, layer: int, sharded: bool = True) -> Tensor:
        """Register a tensor that is updated in place (a stack of layer ``layer``'s rows); returns it."""
        self.register(name, lambda: tensor, lambda v: tensor.copy_(v), rows=layer, sharded=sharded)
        return tensor

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> StateEntry:
        return self._entries[name]

    def state_dict(self) -> dict[str, Any]:
        """Every entry's current value (copies)."""
        return {name: clone_state(e.get()) for name, e in self._entries.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load every entry from ``state`` (the names must be exactly the registered ones)."""
        missing = [n for n in self._entries if n not in state]
        extra = [n for n in state if n not in self._entries]
        if missing or extra:
            raise ValueError(f"the checkpoint's state does not match this simulation's: missing {missing}, "
                             f"unexpected {extra} (was it made with other options, e.g. error feedback, server "
                             f"optimizers or a local solver at another layer?)")
        for name, e in self._entries.items():
            # copies: a loader may keep the tensors it is given (torch's Optimizer.load_state_dict keeps those of
            # the right dtype and device as they are), and training on must not change the caller's checkpoint
            e.load(clone_state(state[name]))

    def map_sharded(self, state: dict[str, Any], fn: Callable[[Tensor, int], Any], cut: int) -> dict[str, Any]:
        """A copy of ``state`` with ``fn(tensor, layer)`` applied to every tensor that holds rows of a layer
        m <= ``cut`` of a sharded entry (the rows spread over the ranks); the rest is kept as it is."""
        out = {}
        for name, value in state.items():
            e = self._entries.get(name)
            if e is None or not e.sharded:
                out[name] = value
                continue

            def apply(t: Tensor, e: StateEntry = e, value: Any = value) -> Any:
                m = e.layer_of(value, t)
                return fn(t, m) if m is not None and m <= cut else t

            out[name] = _map_tensors(value, apply)
        return out


def migrate(sd: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """An engine checkpoint of any earlier format in the current one (module docstring).

    Format 1 (no ``format_version``): ``{"stacked", "memory", "server_state", "population", "tree", "optimizer",
    "counters", "config"}``, with the configuration as ``repr()`` strings, under earlier names in older files
    (``quantizers``, ``NoQuantization()``) and without the options added later (server optimizers, participation,
    mobility, the population, the tree, per-device step counts), which those runs did not use.
    """
    version = sd.get("format_version", 1)
    if version == FORMAT_VERSION:
        return sd
    if version != 1:
        raise ValueError(f"engine checkpoint format {version!r} is not known to this version of lightning-qmlhfl "
                         f"(it reads formats 1 to {FORMAT_VERSION})")
    cfg = dict(sd["config"])
    if "compressors" not in cfg:
        cfg["compressors"] = [q.replace("NoQuantization()", "Identity()") for q in cfg.get("quantizers", [])]
    cfg.setdefault("server_optimizers", ["Average()"] * num_layers)
    cfg.setdefault("participation", ["Full()"] * num_layers)
    cfg.setdefault("mobility", "Static()")
    legacy = {k: cfg[k] for k in ("taus", "compressors", "server_optimizers", "participation", "mobility",
                                  "hierarchy", "seed")}
    state: dict[str, Any] = {"optimizer": dict(sd["optimizer"]), "counters": dict(sd["counters"])}
    for m, (params, buffers) in enumerate(zip(sd["stacked"]["params"], sd["stacked"]["buffers"])):
        state[f"params/{m}"], state[f"buffers/{m}"] = params, buffers
    if "device_steps" not in state["optimizer"]:  # before per-device step counts: every device took every step
        state["optimizer"]["device_steps"] = int(sd["counters"]["total_steps"])
    for n, mem in enumerate(sd.get("memory", [None] * num_layers), start=1):
        if mem is not None:
            state[f"memory/{n}"] = mem
    for n, st in enumerate(sd.get("server_state", [None] * num_layers), start=1):
        if st is not None:
            state[f"server/{n}"] = st
    state["population"] = sd.get("population")  # None: written before the population (nothing to restore)
    state["tree"] = sd.get("tree")  # None: written before mobility (the tree never changed)
    return {"format_version": FORMAT_VERSION, "legacy_config": legacy, "param_layout": cfg.get("param_layout"),
            "state": state}
