"""Which rows an engine holds and how its layers map onto each other: the global-to-local row index of a rank's
share under DDP (all rows in one process), and the tree's parent, weight and ancestor maps over the held rows. A
mixin of :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine`, kept apart so that the schedule (``engine.py``)
reads on its own."""

from __future__ import annotations

from torch import Tensor

__all__ = ["RowIndexing"]


class RowIndexing:
    """Row indexing across a shard and the tree's maps (``parent_index``, ``weights``, ``ancestors``) of an engine
    with ``rows``, ``_local``, ``shard``, ``tree``, ``N``, ``device``, ``work_dtype`` and ``_device_mass``."""

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
