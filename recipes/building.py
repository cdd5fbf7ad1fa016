"""Config -> library objects, shared by every recipe (no Lightning import here, so ``recipes.plan`` stays light).

Open-ended choices are Hydra ``_target_`` nodes (:func:`instantiate_node`): the model (``model._target_``, whose
optimizer may itself be a ``_partial_`` node), the datamodule, the partitioner, the logger, extra callbacks and
compressors. Derived values (one compressor option broadcast to N layers, rounds from a deadline) are computed here
and in :mod:`recipes.common`, not instantiated.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_qmlhfl.compressors import Compressor, layer_compressors, layer_quantizers
from lightning_qmlhfl.hierarchy import Hierarchy
from lightning_qmlhfl.federation.availability import Availability
from lightning_qmlhfl.federation.mobility import Mobility, make_mobility
from lightning_qmlhfl.federation.participation import Participation, layer_participation
from lightning_qmlhfl.optimizers.server import ServerOptimizer, layer_server_optimizers

__all__ = ["build_hierarchy", "build_compressors", "build_server_optimizers", "build_participation",
           "build_availability", "build_mobility", "build_model_from_cfg", "build_partitioner", "instantiate_node",
           "model_label", "PRESET_KEYS"]

# Keys the built-in presets of a group carry. When a ``_target_`` replaces the built-in class and does not take one
# of these, it is dropped with a warning (``model._target_=my.Module`` on top of ``model=lenet`` inherits lr,
# momentum, ...); any other key the target does not take is an error (a typo must not be silently ignored).
PRESET_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"name", "lr", "momentum", "weight_decay", "optimizer"}),
    "partition": frozenset({"name", "alpha", "min_samples", "group_by_edge", "classes_per_device"}),
    "logger": frozenset({"name", "project", "entity", "mode", "tags", "group", "run_name", "save_dir"}),
    "datamodule": frozenset(),
    "compressor": frozenset({"layers", "levels", "bucket_size", "ratio", "k", "error_feedback"}),
    "trainer.callbacks": frozenset(),
}


def _container(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def instantiate_node(node: Any, what: str, defaults: dict[str, Any] | None = None) -> Any:
    """Instantiate a config node with a ``_target_`` (Hydra's ``instantiate``; nested ``_target_`` / ``_partial_``
    nodes are instantiated too, containers become plain lists and dicts).

    ``what`` names the node in errors (``"model"``, ``"datamodule"``, ...). The key ``name`` (the preset's label)
    is never passed. Keys the target's signature does not take: dropped with a warning when they are one of the
    group's :data:`PRESET_KEYS`, else a ``ValueError`` naming them and the accepted arguments. ``defaults`` are
    passed only where the target takes them and the node does not set them (e.g. a logger's ``save_dir``).
    """
    from hydra.utils import get_object, instantiate

    spec = _container(node)
    target = spec.pop("_target_", None)
    if not target:
        raise ValueError(f"{what}._target_ is not set")
    spec.pop("name", None)
    try:
        obj = get_object(str(target))
    except Exception as e:  # ImportError, AttributeError, hydra's InstantiationException
        raise ValueError(f"{what}._target_={target!r} cannot be imported ({type(e).__name__}: {e}); give an "
                         f"importable dotted path, e.g. my_package.MyModule (on sys.path or installed)") from e
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not takes_any:
        unknown = [k for k in spec if not k.startswith("_") and k not in accepted]
        preset = PRESET_KEYS.get(what, frozenset())
        bad = [k for k in unknown if k not in preset]
        if bad:
            raise ValueError(f"{what}._target_={target} does not take {', '.join(sorted(bad))} "
                             f"({what}.{bad[0]}={spec[bad[0]]!r}); it takes: "
                             f"{', '.join(sorted(accepted)) or 'nothing'}")
        dropped = [k for k in unknown if k in preset]
        if dropped:
            warnings.warn(f"{what}._target_={target} does not take {', '.join(sorted(dropped))} (inherited from the "
                          f"built-in {what} preset): not passed", UserWarning, stacklevel=2)
            for k in dropped:
                spec.pop(k)
    for k, v in (defaults or {}).items():
        if k not in spec and (takes_any or k in accepted):
            spec[k] = v
    from hydra.errors import InstantiationException

    try:
        return instantiate({"_target_": target, **spec}, _convert_="all")
    except InstantiationException as e:  # the target's own ValueError / TypeError says what is wrong: keep it
        cause = e.__cause__
        if type(cause) in (ValueError, TypeError):
            raise type(cause)(f"{what}._target_={target}: {cause}") from cause
        raise


def model_label(cfg: DictConfig) -> str:
    """The model's name in summaries: the preset's ``name`` for a built-in model, else its ``_target_``."""
    from recipes.models import model_target

    m = cfg.model
    target, name = m.get("_target_"), m.get("name")
    if not target or (name and model_target(str(name)) == str(target)):
        return str(name)
    return str(target)


def build_model_from_cfg(cfg: DictConfig) -> Any:
    """The LightningModule of ``cfg.model``: ``model._target_`` (with the node's other keys as arguments), or the
    registered model ``model.name`` (:func:`recipes.models.build_model`) when no target is set."""
    import lightning as L

    from recipes.models import build_model

    m = cfg.model
    if m.get("_target_"):
        module = instantiate_node(m, "model")
    else:
        kw = {k: v for k, v in _container(m).items() if k not in ("name", "_target_")}
        module = build_model(str(m.name), **kw)
    if not isinstance(module, L.LightningModule):
        raise TypeError(f"model._target_={m.get('_target_')!r} built a {type(module).__name__}, not a "
                        f"LightningModule")
    return module


def build_partitioner(cfg: DictConfig) -> Any:
    """The partitioner of ``cfg.partition``: a ``_target_`` (any :class:`lightning_qmlhfl.data.Partitioner`), or the
    library's ``{name: iid | dirichlet | shards, ...}`` config."""
    from lightning_qmlhfl.data import Partitioner, make_partitioner

    p = cfg.partition
    if p.get("_target_"):
        part = instantiate_node(p, "partition")
        if not isinstance(part, Partitioner):
            raise TypeError(f"partition._target_={p._target_!r} built a {type(part).__name__}, not a "
                            f"lightning_qmlhfl.data.Partitioner")
        return part
    return make_partitioner({k: v for k, v in _container(p).items() if k != "_target_"})


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
    if c.get("_target_"):  # one user compressor class on every layer (a fresh instance per layer)
        return [_instantiate_compressor(c, "compressor") for _ in range(num_layers)]
    opts = OmegaConf.to_container(c, resolve=True)
    layers = opts.pop("layers", "qsgd")
    if isinstance(layers, list) and any(isinstance(v, dict) for v in layers):
        if len(layers) != num_layers:
            raise ValueError(f"compressor.layers has {len(layers)} entries, the hierarchy has N = {num_layers}")
        names = ["identity" if isinstance(v, dict) else v for v in layers]
        built = layer_compressors(names, num_layers, **opts)
        return [_instantiate_compressor(v, f"compressor.layers[{n}]") if isinstance(v, dict) else built[n]
                for n, v in enumerate(layers)]
    return layer_compressors(layers, num_layers, **opts)


def _instantiate_compressor(node: Any, what: str) -> Compressor:
    spec = _container(node)
    if not spec.get("_target_"):
        raise ValueError(f"{what} must be a compressor name or a node with _target_, got {spec!r}")
    spec.pop("layers", None)
    comp = instantiate_node(spec, "compressor")
    if not isinstance(comp, Compressor):
        raise TypeError(f"{what}._target_={spec['_target_']!r} built a {type(comp).__name__}, not a "
                        f"lightning_qmlhfl.compressors.Compressor")
    return comp


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
