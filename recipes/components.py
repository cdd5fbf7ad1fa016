"""Config nodes -> objects: the one way the recipes name a component is a ``_target_`` node (a class or factory and
its arguments), and a config-group file gives it a short name (``model=lenet`` is ``conf/model/lenet.yaml``).

:func:`instantiate_node` instantiates such a node with Hydra. A preset carries only keys its target takes, plus, in
the ``model`` and ``partition`` groups, ``name``: the preset's label (summaries, reports), never passed. When a
user's ``_target_`` replaces a preset's class (``model._target_=my.Module`` on top of ``model=lenet``), the keys it
inherited from the preset that the new target does not take are dropped with a warning; any other key it does not
take is an error naming it.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recipes.config import CONF_DIR
from recipes.flavor import LIGHTNING, counterpart, current_package, module_package, retarget
from recipes.options import ConfigError

__all__ = ["LABELLED", "PRESET_KEYS", "build_callbacks", "build_datamodule", "build_model", "build_partitioner",
           "instantiate_node", "model_label", "preset_targets"]

LABELLED = ("model", "partition")
"""Groups whose presets carry ``name``, a label that is not an argument of their ``_target_``."""


@lru_cache(maxsize=None)
def _group_presets(group: str) -> tuple[frozenset[str], frozenset[str]]:
    keys: set[str] = set()
    targets: set[str] = set()
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict):
            keys |= {k for k in node if k not in ("_target_", "defaults")}
            if node.get("_target_"):
                targets.add(str(node["_target_"]))
    return frozenset(keys), frozenset(targets)


class _PresetKeys(dict):
    """``PRESET_KEYS[group]``: the keys the group's built-in presets carry (read from ``conf/<group>/*.yaml``)."""

    def __missing__(self, group: str) -> frozenset[str]:
        group = group.split(".", 1)[0]
        return _group_presets(group)[0] if (CONF_DIR / group).is_dir() else frozenset()


PRESET_KEYS: dict[str, frozenset[str]] = _PresetKeys()


def preset_targets(group: str) -> frozenset[str]:
    """The ``_target_`` of every built-in preset of ``group``."""
    return _group_presets(group)[1]


def _container(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def instantiate_node(node: Any, what: str, defaults: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Instantiate the ``_target_`` node ``node`` (``what`` names it in errors: ``"model"``, ``"callbacks.recorder"``)
    with Hydra (nested ``_target_`` / ``_partial_`` nodes too; containers become plain lists and dicts).

    ``kwargs`` are arguments given by the recipe (objects, derived values); ``defaults`` are passed where the node
    does not set them. In the :data:`LABELLED` groups ``name`` is the preset's label and not passed. A target that is
    not one of the group's built-in presets' (a user's class replacing a preset's) gets the keys it inherited from
    the preset only where it takes them (see the module docstring).

    Raises:
        ConfigError: the target cannot be imported, does not take a key, or refuses a value (its message kept).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    spec = _container(node)
    target = spec.pop("_target_", None)
    if not target:
        raise ConfigError(f"{what}._target_ is not set")
    group = what.split(".", 1)[0]
    if group in LABELLED:
        spec.pop("name", None)
    try:
        obj = counterpart(get_object(str(target)))
    except Exception as e:  # ImportError, AttributeError, hydra's InstantiationException
        raise ConfigError(f"{what}._target_={target!r} cannot be imported ({type(e).__name__}: {e}); give an "
                          f"importable dotted path, e.g. my_package.MyModule (on sys.path or installed)") from e
    for k, v in (defaults or {}).items():
        spec.setdefault(k, v)
    if str(target) not in preset_targets(group):
        _drop_inherited(spec, obj, what, str(target))
    if current_package() != LIGHTNING:  # the classes of the run's Lightning package (recipes.flavor)
        spec = retarget({"_target_": str(target), **spec})
        target = spec.pop("_target_")
    try:
        if not kwargs:
            return instantiate({"_target_": target, **spec}, _convert_="all")
        # objects given by the recipe are passed as they are (Hydra would merge them into the config first)
        factory = instantiate({"_target_": target, "_partial_": True, **spec}, _convert_="all")
    except InstantiationException as e:  # the target's own ValueError / TypeError says what is wrong: keep it
        cause = e.__cause__
        if _refused(cause):
            raise ConfigError(_name_the_key(str(cause), what, str(target), spec)) from cause
        raise
    try:
        return factory(**kwargs)
    except (ValueError, TypeError, Exception) as e:
        if _refused(e) and not isinstance(e, ConfigError):
            raise ConfigError(_name_the_key(str(e), what, str(target), spec)) from e
        raise


def _refused(error: BaseException | None) -> bool:
    """A target refusing a value: its ValueError / TypeError, or Lightning's MisconfigurationException."""
    return isinstance(error, (ValueError, TypeError)) or type(error).__name__ == "MisconfigurationException"


def _drop_inherited(spec: dict[str, Any], obj: Any, what: str, target: str) -> None:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in spec if not k.startswith("_") and k not in accepted]
    inherited = PRESET_KEYS[what]
    bad = [k for k in unknown if k not in inherited]
    if bad:
        raise ConfigError(f"{what}._target_={target} does not take {', '.join(sorted(bad))} "
                          f"({what}.{bad[0]}={spec[bad[0]]!r}); it takes: {', '.join(sorted(accepted)) or 'nothing'}")
    dropped = [k for k in unknown if k in inherited]
    if dropped:
        warnings.warn(f"{what}._target_={target} does not take {', '.join(sorted(dropped))} (inherited from the "
                      f"built-in {what} preset): not passed", UserWarning, stacklevel=3)
        for k in dropped:
            spec.pop(k)


def _name_the_key(message: str, what: str, target: str, spec: dict[str, Any]) -> str:
    """``lr must be > 0`` from the model becomes ``model.lr must be > 0``; a message that names a key already stays."""
    words = message.split(" ")
    if words[0] in spec:
        return f"{what}.{message}"
    if "." in words[0] or "=" in words[0]:  # names a config key already
        return message
    named = next((w.strip(",:") for w in words[1:3] if w.strip(",:") in spec), None)  # "Dirichlet alpha must ..."
    if named is not None:
        return f"{what}.{named}={spec[named]!r}: {message}"
    return f"{what} ({target}): {message}"


def model_label(cfg: Any) -> str:
    """The model's name in summaries: the preset's ``name`` for a built-in model, else its ``_target_``."""
    from recipes.models import model_target

    m = cfg["model"]
    target, name = m.get("_target_"), m.get("name")
    if not target or (name and model_target(str(name)) == str(target)):
        return str(name)
    return str(target)


def build_model(cfg: DictConfig) -> Any:
    """The LightningModule of ``cfg.model`` (its ``_target_``; a node with only ``name``, from before the targets,
    builds the registered model of that name), of the run's Lightning package (:mod:`recipes.flavor`)."""
    from recipes.models import build_model as registered

    m = cfg.model
    if m.get("_target_"):
        module = instantiate_node(m, "model")
    else:
        warnings.warn(f"model.name={m.get('name')!r} without model._target_: use model={m.get('name')} (a preset with "
                      f"its _target_)", FutureWarning, stacklevel=2)
        module = registered(str(m.name), **{k: v for k, v in _container(m).items() if k not in ("name", "_target_")})
    package = module_package(module)
    if package is None:
        raise TypeError(f"model._target_={m.get('_target_')!r} built a {type(module).__name__}, not a "
                        f"LightningModule")
    if package != current_package():
        raise ConfigError(f"model._target_={m.get('_target_')!r} is a function that built a {package} module: name "
                          f"the module's class as model._target_ (its package decides the Trainer's)")
    return module


def build_datamodule(cfg: DictConfig) -> Any:
    """``datamodule._target_`` (a user's LightningDataModule, with the node's other keys as arguments), else the
    ``dataset`` node (the built-in :class:`~recipes.datamodules.ImageDataModule`), of the run's Lightning
    package."""
    import importlib

    base = importlib.import_module(current_package()).LightningDataModule
    user = cfg.get("datamodule")
    if user is not None and user.get("_target_"):
        dm = instantiate_node(user, "datamodule")
        if not isinstance(dm, base):
            raise TypeError(f"datamodule._target_={user._target_!r} built a {type(dm).__name__}, not a "
                            f"LightningDataModule of {current_package()} (the model's package)")
        return dm
    return instantiate_node(cfg.dataset, "dataset")


def build_partitioner(cfg: DictConfig) -> Any:
    """The partitioner of ``cfg.partition``: its ``_target_`` (any :class:`lightning_qmlhfl.data.Partitioner`), or, for
    a node with only ``name`` and options (from before the targets), the library's ``make_partitioner``."""
    from lightning_qmlhfl.data import Partitioner, make_partitioner

    p = cfg.partition
    if not p.get("_target_"):
        return make_partitioner({k: v for k, v in _container(p).items() if k != "_target_"})
    part = instantiate_node(p, "partition")
    if not isinstance(part, Partitioner):
        raise TypeError(f"partition._target_={p._target_!r} built a {type(part).__name__}, not a "
                        f"lightning_qmlhfl.data.Partitioner")
    return part


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The Trainer's callbacks: every node of ``cfg.callbacks`` in order (a null node is left out), then the user's
    ``trainer.callbacks`` list, as callbacks of the run's Lightning package."""
    import importlib

    Callback = importlib.import_module(f"{current_package()}.callbacks").Callback
    out = []
    nodes = [(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v is not None]
    nodes += [(f"trainer.callbacks[{i}]", v) for i, v in enumerate(cfg.trainer.get("callbacks") or [])]
    for what, node in nodes:
        cb = instantiate_node(node, what)
        if not isinstance(cb, Callback):
            raise TypeError(f"{what} built a {type(cb).__name__}, not a Callback of {current_package()} (the model's "
                            f"Lightning package)")
        out.append(cb)
    return out
