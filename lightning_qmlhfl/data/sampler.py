"""Per-device mini-batch indices: every device walks its own shuffled permutation of its own data."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeviceSampler"]


class DeviceSampler:
    """Per-device shuffled streams of indices; ``next_indices()`` -> LongTensor [N_tot, batch_size].

    Each device walks its own permutation of its own data; when it runs out it draws a new permutation and
    continues (no sample is dropped or repeated within a device epoch; a batch that crosses the end of a device
    epoch is completed from the next one). Deterministic given the seed. With ``shuffle=False`` every device walks
    its data in index order, epoch after epoch (a train DataLoader without shuffling).
    """

    def __init__(self, parts: Sequence[Tensor], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        if bool((self.sizes == 0).any()):
            raise ValueError(f"device {int((self.sizes == 0).nonzero()[0])} has no data")
        width = int(self.sizes.max())
        self.table = torch.full((len(parts), width), -1, dtype=torch.long)
        for i, p in enumerate(parts):
            self.table[i, : len(p)] = p
        self.generator = torch.Generator().manual_seed(int(seed))
        self.perm = torch.full_like(self.table, -1)
        self.pos = torch.zeros(len(parts), dtype=torch.long)
        self.epochs = torch.zeros(len(parts), dtype=torch.long)
        for i in range(len(parts)):
            self._reshuffle(i)
        self._ar = torch.arange(batch_size)

    def _reshuffle(self, i: int) -> None:
        n = int(self.sizes[i])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        self.perm.numpy()[i, :n] = self.table.numpy()[i, order.numpy()]  # numpy views: the same storage
        self.pos.numpy()[i] = 0

    def next_indices(self, rows: Tensor | None = None) -> Tensor:
        """LongTensor [N_tot, batch_size] of dataset indices, or [len(rows), batch_size] for the devices ``rows``
        only (the others keep their position: a device that does not train does not consume its data)."""
        B = self.batch_size
        r = None if rows is None else rows.to(torch.long).cpu()
        pos = self.pos if r is None else self.pos[r]
        sizes = self.sizes if r is None else self.sizes[r]
        crossing = pos + B > sizes
        safe_pos = torch.minimum(pos, (sizes - B).clamp(min=0))
        cols = (safe_pos[:, None] + self._ar[None, :]).clamp(max=self.table.shape[1] - 1)
        out = (self.perm if r is None else self.perm[r]).gather(1, cols)
        if r is None:
            self.pos += torch.where(crossing, 0, B)
        else:
            self.pos[r] = pos + torch.where(crossing, 0, B)
        devices = np.arange(len(self.sizes)) if r is None else r.numpy()
        # devices running out of data this step, then those that finished exactly at a batch boundary: small
        # per-device work, on numpy views of the same storage (a tensor op per device costs several times more);
        # the reshuffles draw from the one generator in the same order as ever
        perm, pos_np, sizes_np, epochs, out_np = (self.perm.numpy(), self.pos.numpy(), self.sizes.numpy(),
                                                  self.epochs.numpy(), out.numpy())
        for j in np.flatnonzero(crossing.numpy()):
            i = int(devices[j])
            n, need, parts = int(sizes_np[i]), B, []
            while need:
                p = int(pos_np[i])
                take = min(need, n - p)
                parts.append(perm[i, p:p + take].copy())  # copy: a reshuffle rewrites perm in place
                pos_np[i] += take
                need -= take
                if pos_np[i] == n:
                    epochs[i] += 1
                    self._reshuffle(i)
            out_np[j] = np.concatenate(parts)
        done = (pos_np == sizes_np) if r is None else (pos_np[devices] == sizes_np[devices])
        for j in np.flatnonzero(done):
            i = int(devices[j])
            epochs[i] += 1
            self._reshuffle(i)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos.clone(), "epochs": self.epochs.clone(),
                "generator": self.generator.get_state(), "table": self.table.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not torch.equal(sd["table"], self.table):
            raise ValueError("checkpoint partition differs from this run's partition (different data or seed)")
        self.perm.copy_(sd["perm"])
        self.pos.copy_(sd["pos"])
        self.epochs.copy_(sd["epochs"])
        self.generator.set_state(sd["generator"])
