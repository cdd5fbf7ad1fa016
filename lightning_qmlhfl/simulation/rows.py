"""Which rows an engine holds and how its layers map onto each other: the global-to-local row index of a rank's
share under DDP (all rows in one process), the tree's parent, weight and ancestor maps over the held rows, and,
with partial participation, the compact stack of the devices that train in the current layer-1 period. A
mixin of :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`, kept apart so that the schedule (``engine.py``)
reads on its own."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RowIndexing"]


class RowIndexing:
    """Row indexing across a shard, the tree's maps (``parent_index``, ``weights``, ``ancestors``) and the training
    devices' rows of an engine with ``rows``, ``_local``, ``shard``, ``tree``, ``N``, ``device``, ``work_dtype``,
    ``_device_mass``, ``state``, ``population``, ``step_in_round``, ``_period`` and ``_compact``."""

    # ------------------------------------------------------------------ rows: all of them, or a rank's share
    def local_index(self, m: int) -> Tensor | None:
        """int64 [nodes of layer m]: this engine's row of every global row of layer m (-1 where another rank
        holds it), or None when this engine holds every row."""
        return self._local[m]

    def _localise(self, n: int, global_rows: Tensor) -> Tensor:
        """Global row indices of layer n as this engine's rows (identity without a shard)."""
        return global_rows if self._local[n] is None else self._local[n][global_rows]

    def local_rows(self, m: int, global_rows: Tensor | None) -> Tensor | None:
        """The subset of ``global_rows`` (layer m) this engine holds, as local indices (None: all)."""
        if global_rows is None or self._local[m] is None:
            return global_rows
        loc = self._local[m][global_rows.cpu()]
        return loc[loc >= 0]

    def at_cut(self, n: int) -> bool:
        """Whether the aggregation into layer n gathers uploads from every rank (the layer above the cut)."""
        return self.shard is not None and n == self.shard.cut + 1

    @property
    def device_ids(self) -> Tensor:
        """int64 [rows of layer 0]: the global index of every device row this engine holds."""
        return self.rows[0]

    # ------------------------------------------------------------------ the tree
    def refresh_tree(self) -> None:
        """Parent indices, weights |C(c)| / |C(p)| and resync maps of the current tree (this engine's rows)."""
        t = self.tree
        self.parent_index = [self._localise(n, t.parent_index(n - 1)[self.rows[n - 1]]).to(self.device)
                             for n in range(1, self.N + 1)]
        self.weights = [t.aggregation_weights(n, self._device_mass).to(device=self.device, dtype=self.work_dtype)
                        for n in range(1, self.N + 1)]
        self.ancestors = [[self._localise(n, t.ancestor_index(m, n)[self.rows[m]]).to(self.device)
                           for m in range(n)] for n in range(1, self.N + 1)]

    # ------------------------------------------------------------------ the training devices' rows
    # With partial participation only the devices of the current layer-1 period are touched: their rows are
    # gathered into a compact stack at the period's first step, trained there, and written back at its end (or
    # when the state is saved); the re-synchronisation (Eq. 5) leaves the device layer alone, and the devices of
    # the next period start from their parents' rows instead, the values the eager copy would have given them.
    def _rows_from_parents(self) -> bool:
        """Whether this step's device rows are read from their layer-1 parents (partial participation, at the
        first step of a layer-1 period)."""
        return self.lazy_devices and self.step_in_round % self._period[0] == 0

    @property
    def lazy_devices(self) -> bool:
        """Whether Eq. 5 skips the device layer (partial participation: see above)."""
        return not self.population.trivial

    def device_params(self) -> Tensor:
        """[devices held, P]: every device's current model, as the eager re-synchronisation would hold it (a copy):
        with partial participation the rows of the devices that do not train now are their parents'."""
        return self._device_rows(0)

    def device_buffers(self) -> Tensor:
        """[devices held, B]: every device's float buffers, as :meth:`device_params`."""
        return self._device_rows(1)

    @torch.no_grad()
    def _device_rows(self, which: int) -> Tensor:
        s = self.state
        stack = s.params if which == 0 else s.buffers
        if not self.lazy_devices:
            return stack[0].clone()
        out = stack[1].index_select(0, self.parent_index[0])
        if self.step_in_round % self._period[0] != 0:  # inside a period: its training devices' own rows
            if self._compact is not None:
                rows, compact = self._compact[0], self._compact[1 + which]
                out[rows] = compact
            else:
                active = self.local_rows(0, self.population.active)  # the period's draw (read, not drawn)
                out = stack[0].clone() if active is None else out.index_copy_(
                    0, active.to(out.device), stack[0].index_select(0, active.to(out.device)))
        return out

    def _gather_devices(self, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.state
        if self._rows_from_parents():
            src = self.parent_index[0].index_select(0, active)
            return active, s.params[1].index_select(0, src), s.buffers[1].index_select(0, src)
        return active, s.params[0].index_select(0, active), s.buffers[0].index_select(0, active)

    @torch.no_grad()
    def _materialise_devices(self) -> None:
        """Every device row from its parent (a period in which every device trains)."""
        s, idx = self.state, self.parent_index[0]
        torch.index_select(s.params[1], 0, idx, out=s.params[0])
        if s.num_buffer_elems:
            torch.index_select(s.buffers[1], 0, idx, out=s.buffers[0])

    @torch.no_grad()
    def flush_devices(self) -> None:
        """Write the compact stack of the period's training devices back into their rows."""
        if self._compact is None:
            return
        rows, p_c, b_c = self._compact
        self._compact = None
        if rows.numel():
            self.state.params[0][rows] = p_c
            if self.state.num_buffer_elems:
                self.state.buffers[0][rows] = b_c
