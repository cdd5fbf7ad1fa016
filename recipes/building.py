"""Config -> library objects, shared by every recipe (no Lightning import here, so ``recipes.plan`` stays light)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_qmlhfl.compressors import Compressor, layer_compressors, layer_quantizers
from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.availability import Availability
from lightning_qmlhfl.mobility import Mobility, make_mobility
from lightning_qmlhfl.participation import Participation, layer_participation
from lightning_qmlhfl.server_optim import ServerOptimizer, layer_server_optimizers

__all__ = ["build_hierarchy", "build_compressors", "build_server_optimizers", "build_participation",
           "build_availability", "build_mobility"]


def build_hierarchy(cfg: DictConfig) -> Hierarchy:
    h = cfg.hierarchy
    if h.get("parents") is not None:
        return Hierarchy.from_parents(OmegaConf.to_container(h.parents))
    return Hierarchy.balanced([int(b) for b in h.branching])


def build_compressors(cfg: DictConfig, num_layers: int) -> list[Compressor]:
    """C_1..C_N from the ``compressor`` group (``compressor.layers`` names one compressor per layer or one for all;
    ``compressor.levels`` / ``bucket_size`` / ``ratio`` / ``k`` / ``error_feedback`` are one value or a list of N;
    ``levels`` and ``bucket_size`` default to ``quantizer.levels`` / ``quantizer.bucket_size``). Configs without a
    ``compressor`` group use the QSGD levels of ``quantizer`` (null levels: 32-bit uploads)."""
    c: Any = cfg.get("compressor")
    if c is None:
        q = OmegaConf.to_container(cfg.quantizer, resolve=True)
        return layer_quantizers(q.get("levels"), q.get("bucket_size"), num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "qsgd")
    return layer_compressors(layers, num_layers, **opts)


def build_server_optimizers(cfg: DictConfig, num_layers: int) -> list[ServerOptimizer]:
    """One server optimizer per layer from the ``server_optim`` group (``Average()`` everywhere without it)."""
    c: Any = cfg.get("server_optim")
    if c is None:
        return layer_server_optimizers("average", num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    return layer_server_optimizers(opts.pop("layers", "average"), num_layers, **opts)


def build_participation(cfg: DictConfig, num_layers: int) -> list[Participation]:
    """One participation rule per layer from the ``participation`` group (Full everywhere without it)."""
    c: Any = cfg.get("participation")
    if c is None:
        return layer_participation("full", num_layers)
    opts = OmegaConf.to_container(c, resolve=True)
    return layer_participation(opts.pop("layers", "full"), num_layers, **opts)


def build_availability(cfg: DictConfig) -> Availability | None:
    """The ``availability`` group: per-period probabilities of being unavailable and of dropping out, or a trace
    file of availability windows (None when every device is always there)."""
    c: Any = cfg.get("availability")
    if c is None:
        return None
    a = Availability(unavailable=float(c.get("unavailable") or 0.0), dropout=float(c.get("dropout") or 0.0),
                     trace=c.get("trace") or None)
    return None if a.is_always else a


def build_mobility(cfg: DictConfig, hierarchy: Hierarchy) -> Mobility:
    """The ``mobility`` group: devices moving between edge servers and edge-server failures (Static without it)."""
    c: Any = cfg.get("mobility")
    if c is None:
        return make_mobility(None)
    return make_mobility(OmegaConf.to_container(c, resolve=True),
                         hierarchy.nodes_per_layer[1] if hierarchy.num_layers > 1 else None)
