"""The engine's declared state and checkpoints: what :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`
registers with its :class:`~lightning_qmlhfl.simulation.state.StateRegistry`, its checkpoint format (version,
configuration identity, parameter layout, state), the DDP gather and scatter of the rows, and loading with migration
of earlier formats. A mixin of the engine, kept apart so that the schedule (``engine.py``) reads on its own."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from .state import FORMAT_VERSION, migrate

__all__ = ["EngineCheckpointing"]


class EngineCheckpointing:
    """State registration, ``state_dict`` / ``load_state_dict`` and the sharded views of the engine."""

    def _register_state(self) -> None:
        """Every piece of this engine's own state (the stages register theirs when they are bound)."""
        reg, s = self.registry, self.state
        for m in range(self.N + 1):
            reg.register_rows(f"params/{m}", s.params[m], m)
            reg.register_rows(f"buffers/{m}", s.buffers[m], m)
        opt = self.optimizer

        def per_device(value: dict[str, Any], t: Tensor) -> int | None:
            rows = value["device_steps"]
            return 0 if t.dim() >= 1 and t.shape[0] == (rows.shape[0] if isinstance(rows, Tensor) else -1) else None

        reg.register("optimizer", opt.state_dict, opt.load_state_dict, rows=per_device)
        reg.register("population", self.population.state_dict, self._load_population, sharded=False)
        reg.register("tree", self._tree_state, self._load_tree, sharded=False)
        reg.register("counters", self._counters, self._load_counters, sharded=False)

    def _tree_state(self) -> dict[str, Any]:
        ct = self.change_tree
        return {**self.tree.state_dict(), "home": self.home.clone(), "moves": 0 if ct is None else ct.moves,
                "failures": 0 if ct is None else ct.failures}

    def _load_tree(self, sd: dict[str, Any] | None) -> None:
        if sd is None:  # a checkpoint from before mobility: the tree never changed
            return
        self.tree.load_state_dict(sd)
        self.home = sd["home"].clone()
        if self.change_tree is not None:
            self.change_tree.moves, self.change_tree.failures = int(sd["moves"]), int(sd["failures"])
            self.refresh_tree()

    def _load_population(self, sd: dict[str, Any] | None) -> None:
        if sd is not None:  # None: a checkpoint from before the population (full participation, no clock state)
            self.population.load_state_dict(sd)

    def _counters(self) -> dict[str, Any]:
        return {"round": self.round, "step_in_round": self.step_in_round, "total_steps": self.total_steps,
                "events_in_round": list(self.events_in_round), "aggregation_counts": list(self.aggregation_counts),
                "bits_sent": list(self.bits.bits_sent), "baseline_bits": list(self.bits.baseline_bits),
                "round_bits": list(self.bits.round_bits)}

    def _load_counters(self, c: dict[str, Any]) -> None:
        self.round, self.step_in_round, self.total_steps = c["round"], c["step_in_round"], c["total_steps"]
        self.events_in_round = list(c["events_in_round"])
        self.aggregation_counts = list(c["aggregation_counts"])
        self.bits.bits_sent, self.bits.baseline_bits = list(c["bits_sent"]), list(c["baseline_bits"])
        self.bits.round_bits = list(c["round_bits"])

    def _param_layout(self) -> list[list[Any]]:
        return [[name, list(shape), list(order)] for name, shape, order in self.state.param_layout.describe()]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit (tensors and plain python only), in the checkpoint format of
        :mod:`.state`."""
        self.flush_devices()
        return {"format_version": FORMAT_VERSION, "config": self.config.identity(),
                "param_layout": self._param_layout(), "state": self.registry.state_dict()}

    def map_sharded(self, sd: dict[str, Any], fn: Callable[[Tensor, int], Any]) -> dict[str, Any]:
        """A copy of the checkpoint ``sd`` with ``fn(tensor, layer)`` applied to every tensor whose rows are split
        over the ranks (rows of the layers at or below the cut of a sharded entry)."""
        return {**sd, "state": self.registry.map_sharded(sd["state"], fn, self.shard.cut)}

    def global_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every row of every rank (a collective on a sharded engine: every rank calls
        it): what a single-process engine of the same run holds, and can load."""
        sd = self.state_dict()
        if self.shard is None:
            return sd
        shard, comm = self.shard, self.comm

        def gather(t: Tensor, m: int) -> Tensor:
            parts = comm.all_gather(t)
            full = t.new_empty((self.hierarchy.nodes_per_layer[m], *t.shape[1:]))
            for r, part in enumerate(parts):
                full[shard.rows_of(r, m).to(full.device)] = part
            return full

        return self.map_sharded(sd, gather)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``sd``: this engine's own :meth:`state_dict` (of this or an earlier format), or, for a
        sharded engine, the global one (:meth:`global_state_dict` or a single-process checkpoint of the same run),
        of which it takes its rows."""
        sd = migrate(sd, self.N)
        if "legacy_config" in sd:
            self._check_config(sd["legacy_config"], self.config.legacy_identity())
        else:
            self._check_config(sd["config"], self.config.identity())
        theirs = sd.get("param_layout") or [[n, shp, list(range(len(shp)))] for n, shp, _ in self._param_layout()]
        if theirs != self._param_layout():  # the meaning of the flat rows (before it was recorded: module order)
            diff = [(a, b) for a, b in zip(theirs, self._param_layout()) if a != b][:3]
            raise ValueError(
                f"checkpoint's flat rows use another parameter layout (name, shape, storage order) than this run, "
                f"e.g. {diff}: build the engine with the param_order the checkpoint was made with"
            )
        state = sd["state"]
        if self.shard is not None and state["params/0"].shape[0] == self.hierarchy.num_devices \
                and self.state.params[0].shape[0] != self.hierarchy.num_devices:  # a global state: take my rows
            state = self.registry.map_sharded(state, lambda t, m: t[self.rows[m].to(t.device)].clone(),
                                              self.shard.cut)
        self.registry.load_state_dict(state)
        self._compact = None

    @staticmethod
    def _check_config(theirs: dict[str, Any], mine: dict[str, Any]) -> None:
        theirs, mine = _by_option(theirs), _by_option(mine)
        for key in mine:
            if theirs.get(key) != mine[key]:
                raise ValueError(f"checkpoint was made with {key}={theirs.get(key)!r}, this run has {mine[key]!r}")


def _by_option(identity: dict[str, Any]) -> dict[str, Any]:
    """A config identity with the per-layer options as lists (``compressors=[...]``), for readable mismatches."""
    out = {k: v for k, v in identity.items() if k not in ("layers", "format_version")}
    if "layers" in identity:
        for key, option in (("taus", "tau"), ("compressors", "compressor"), ("server_optimizers", "server_optimizer"),
                            ("participation", "participation"), ("clip_norms", "clip_norm")):
            out[key] = [layer.get(option) for layer in identity["layers"]]
    return out
