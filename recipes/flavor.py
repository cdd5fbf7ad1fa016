"""The Lightning package a recipe run uses: ``lightning`` (``lightning.pytorch``), or the standalone
``pytorch_lightning`` when the model is written against it (``import pytorch_lightning as pl``).

The two packages carry the same code under two names with separate classes, and a Trainer accepts only its own
package's modules, datamodules, callbacks, plugins and strategies. The recipes' configs name ``lightning.pytorch``
classes and the recipes' own components derive from them. For a ``pytorch_lightning`` model, :func:`counterpart`
maps every class a node names to its twin of that package:

- a class of ``lightning.pytorch`` / ``lightning.fabric`` to the same name in ``pytorch_lightning`` /
  ``lightning_fabric`` (``lightning.pytorch.Trainer`` -> ``pytorch_lightning.Trainer``);
- the QMLHFL strategies to :mod:`lightning_qmlhfl.pytorch_lightning`'s;
- any other class derived from a ``lightning.pytorch`` base (the recipes' callbacks and datamodule, a user's
  ``lightning`` callback) to a subclass that also derives from the other package's base, with every member it
  inherits from ``lightning`` taken from ``pytorch_lightning`` instead: the Trainer finds its own base classes and
  its own default hooks (``is_overridden`` compares code objects), and the class's own methods run unchanged;
- anything else (functions, torch classes, a class written against ``pytorch_lightning``) stays as it is.

The package is chosen once per run from ``model._target_`` (:func:`package_of_target`) and held by
:func:`use_package` for the run's duration (a context variable, read by :func:`recipes.components.instantiate_node`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
from typing import Any, Iterator

from recipes.options import ConfigError

__all__ = ["LIGHTNING", "PYTORCH_LIGHTNING", "build_counterpart", "counterpart", "current_package", "is_overridden", "module_package",
           "package_of_target", "retarget", "use_package"]

LIGHTNING = "lightning.pytorch"
PYTORCH_LIGHTNING = "pytorch_lightning"
_PREFIXES = {"lightning.pytorch": "pytorch_lightning", "lightning.fabric": "lightning_fabric"}
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("qmlhfl_recipes_lightning_package", default=LIGHTNING)


def current_package() -> str:
    """The Lightning package of the run in progress (``lightning.pytorch`` outside a run)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_package(package: str) -> Iterator[None]:
    """Build the run's components for ``package`` while the block runs."""
    if package not in (LIGHTNING, PYTORCH_LIGHTNING):
        raise ValueError(f"package must be {LIGHTNING!r} or {PYTORCH_LIGHTNING!r}, got {package!r}")
    token = _CURRENT.set(package)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _pl_module_class() -> type | None:
    try:
        return importlib.import_module("pytorch_lightning").LightningModule
    except ImportError:
        return None


def module_package(obj: Any) -> str | None:
    """The package of a LightningModule class or instance, or None when it is neither package's module."""
    from lightning.pytorch import LightningModule

    cls = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, LightningModule):
        return LIGHTNING
    pl_module = _pl_module_class()
    if pl_module is not None and issubclass(cls, pl_module):
        return PYTORCH_LIGHTNING
    return None


def package_of_target(target: Any) -> str:
    """The package of the run whose ``model._target_`` is ``target`` (a dotted path): ``pytorch_lightning`` for a
    ``pytorch_lightning`` LightningModule class, else ``lightning.pytorch`` (a factory's result is checked once
    built, by :func:`recipes.components.build_model`)."""
    if not target:
        return LIGHTNING
    from hydra.utils import get_object

    try:
        obj = get_object(str(target))
    except Exception:  # noqa: BLE001 - build_model reports the import error with the key
        return LIGHTNING
    return (module_package(obj) or LIGHTNING) if isinstance(obj, type) else LIGHTNING


def _lightning_prefix(module: str) -> str | None:
    return next((p for p in _PREFIXES if module == p or module.startswith(p + ".")), None)


def _same_name(cls: type) -> type:
    prefix = _lightning_prefix(cls.__module__)
    assert prefix is not None
    module = importlib.import_module(_PREFIXES[prefix] + cls.__module__[len(prefix):])
    return getattr(module, cls.__qualname__)


def counterpart(obj: Any, package: str | None = None) -> Any:
    """``obj`` (a class or callable a config node names) for ``package`` (default: the run's); see the module
    docstring."""
    package = package or current_package()
    if package == LIGHTNING or not isinstance(obj, type):
        return obj
    return _twin(obj)


@functools.lru_cache(maxsize=None)
def _twin(cls: type) -> type:
    if _lightning_prefix(cls.__module__):
        return _same_name(cls)
    if cls.__module__.startswith("lightning_qmlhfl.") and hasattr(cls, "register_strategies"):
        import lightning_qmlhfl.pytorch_lightning as plq

        twin = getattr(plq, cls.__name__, None)
        if twin is None:
            raise ConfigError(f"{cls.__qualname__} has no pytorch_lightning counterpart in lightning_qmlhfl")
        return twin
    base = next((b for b in cls.__mro__ if _lightning_prefix(b.__module__)), None)
    if base is None:
        return cls  # not a Lightning class, or one written against pytorch_lightning already
    pl_base = _same_name(base)
    members: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                               "__doc__": cls.__doc__}
    for name in dir(cls):
        if name.startswith("__") and name.endswith("__"):
            continue
        owner = next((b for b in cls.__mro__ if name in vars(b)), None)
        if owner is not None and _lightning_prefix(owner.__module__) and hasattr(pl_base, name):
            members[name] = inspect.getattr_static(pl_base, name)
    return type(cls.__name__, (cls, pl_base), members)


def _path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def retarget(spec: Any, package: str | None = None) -> Any:
    """A copy of the plain config ``spec`` (dicts and lists) whose every ``_target_`` builds its
    :func:`counterpart` for ``package`` (default: the run's); unchanged for ``lightning.pytorch``. A counterpart with
    a name of its own is named; a derived twin (no importable name: Hydra instantiates dotted paths) is built
    through :func:`build_counterpart`."""
    package = package or current_package()
    if package == LIGHTNING:
        return spec
    from hydra.utils import get_object

    if isinstance(spec, dict):
        out = {k: retarget(v, package) for k, v in spec.items()}
        target = out.get("_target_")
        if isinstance(target, str) and target and target != _path(build_counterpart):
            obj = get_object(target)
            twin = counterpart(obj, package)
            if twin is not obj:
                named = _path(twin)
                if _importable(named, twin):
                    out["_target_"] = named
                else:
                    out["_target_"], out[_OF] = _path(build_counterpart), target
        return out
    if isinstance(spec, list):
        return [retarget(v, package) for v in spec]
    return spec


_OF = "counterpart_of"


def _importable(path: str, obj: Any) -> bool:
    from hydra.utils import get_object

    try:
        return get_object(path) is obj
    except Exception:  # noqa: BLE001
        return False


def build_counterpart(*args: Any, counterpart_of: str, **kwargs: Any) -> Any:
    """``counterpart(counterpart_of)(*args, **kwargs)`` for the run's package: the ``_target_`` that
    :func:`retarget` gives a node whose class has a derived twin."""
    from hydra.utils import get_object

    return counterpart(get_object(counterpart_of))(*args, **kwargs)


def is_overridden(method: str, obj: Any) -> bool:
    """Lightning's ``is_overridden`` for an instance of either package (a module, datamodule or callback)."""
    from lightning_qmlhfl.strategy.flavor import PACKAGES, lightning_api

    for package in sorted(PACKAGES, key=lambda p: p != current_package()):  # a twin is checked as its run's
        try:
            return bool(lightning_api(package).is_overridden(method, obj))
        except (ImportError, ValueError):  # not installed, or obj is not of this package ("Expected a parent")
            continue
    raise TypeError(f"{type(obj).__name__} is neither a lightning nor a pytorch_lightning module, datamodule or "
                    f"callback")
