"""Sharded checkpoints of a multi-process run, with ``torch.distributed.checkpoint`` as the storage.

The engine's state splits into the tensors whose rows are spread over the ranks (the declared state's rows of the
layers at or below the cut: :meth:`QMLHFLEngine.map_sharded`) and the rest, which every rank holds alike (replicated layers, the population, the clock, counters, configuration). Every
rank writes its own rows, and the global row indices they stand for, into one DCP checkpoint directory beside the
Lightning checkpoint file (``<file>.shards/``); the Lightning file (written by rank 0) holds the rest with
placeholders. Loading reads every rank's pieces and assembles the global state, which any engine takes its rows
from: a sharded checkpoint resumes at any world size, one process included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["shard_dir", "save_sharded", "load_sharded", "SHARD_MARK"]

SHARD_MARK = "qmlhfl-shard"


def shard_dir(filepath: Any) -> Path:
    """The DCP directory of a Lightning checkpoint file."""
    return Path(str(filepath) + ".shards")


def save_sharded(engine: Any, filepath: Any) -> dict[str, Any]:
    """Write this rank's sharded tensors (a collective: every rank calls it) and return the engine state with
    placeholders for them (what rank 0 stores in the Lightning checkpoint)."""
    import torch.distributed.checkpoint as dcp

    shard = engine.shard
    tensors: dict[str, Tensor] = {}
    count = [0]

    def take(t: Tensor, m: int) -> str:
        key = f"{count[0]}"
        count[0] += 1
        tensors[f"rank{shard.rank}/{key}"] = t.detach().cpu().contiguous()
        return f"{SHARD_MARK}:{key}:{m}"

    skeleton = engine.map_sharded(engine.state_dict(), take)
    for m in range(shard.cut + 1):
        tensors[f"rank{shard.rank}/rows/{m}"] = shard.rows(m).clone()
    dcp.save(tensors, checkpoint_id=str(shard_dir(filepath)))
    skeleton["sharded"] = {"world": shard.world, "cut": shard.cut, "dir": shard_dir(filepath).name}
    return skeleton


def load_sharded(skeleton: dict[str, Any], filepath: Any, nodes_per_layer: tuple[int, ...]) -> dict[str, Any]:
    """The global engine state from a sharded checkpoint (``skeleton``: what :func:`save_sharded` returned)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(filepath).parent / skeleton["sharded"]["dir"]
    if not directory.is_dir():
        raise FileNotFoundError(f"the sharded checkpoint's tensors are missing: {directory} (written beside {filepath})")
    md = dcp.FileSystemReader(str(directory)).read_metadata()
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    dcp.load(flat, checkpoint_id=str(directory))
    world = int(skeleton["sharded"]["world"])

    def assemble(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(SHARD_MARK + ":"):
            _, key, m = value.split(":")
            parts = [flat[f"rank{r}/{key}"] for r in range(world)]
            rows = [flat[f"rank{r}/rows/{m}"] for r in range(world)]
            full = parts[0].new_empty((nodes_per_layer[int(m)], *parts[0].shape[1:]))
            for part, idx in zip(parts, rows):
                full[idx] = part
            return full
        if isinstance(value, dict):
            return {k: assemble(v) for k, v in value.items()}
        if isinstance(value, list):
            return [assemble(v) for v in value]
        return value

    out = assemble({k: v for k, v in skeleton.items() if k != "sharded"})
    return out
