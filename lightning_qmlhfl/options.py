"""Config values to option objects, the one rule for every family of per-layer options (server optimizers,
participation rules, local solvers): an instance is kept, ``None`` is the family's default, a name is that option
with its defaults, a dict is ``{"name": ..., <option>: value}`` (``None`` values take the defaults). The recipes'
groups give one name or a list of N and each option one value or a list of N; each layer takes the options its
class has.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["Family", "ConfigOption", "from_spec", "per_layer"]


class ConfigOption:
    """An option object that is its config: ``to_config()`` is ``{"name": config_name, <option>: value}`` (what
    :func:`from_spec` rebuilds it from and checkpoints store), and equality, hash and repr follow it."""

    config_name = ""
    config_options: tuple[str, ...] = ()

    def to_config(self) -> dict[str, Any]:
        return {"name": self.config_name, **{k: getattr(self, k) for k in self.config_options}}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.to_config().items(), key=lambda kv: kv[0]))))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.config_options)
        return f"{type(self).__name__}({opts})"


class Family:
    """One family of options: its base class, its classes by config name, the default's name, and how it is named
    in messages (``noun``: "a participation rule"; ``kind``: "participation")."""

    def __init__(self, base: type, classes: Mapping[str, type], default: str, kind: str, noun: str,
                 convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.base, self.classes, self.default, self.kind, self.noun = base, classes, default, kind, noun
        self.convert = convert  # applied to a dict's options before the constructor (e.g. lists to tuples)


def from_spec(spec: object, family: Family) -> Any:
    """An option object from a config value (module docstring)."""
    if isinstance(spec, family.base):
        return spec
    if spec is None:
        return family.classes[family.default]()
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict) or hasattr(spec, "items"):
        d = dict(spec)  # type: ignore[call-overload]
        name = str(d.pop("name", family.default)).lower()
        if name not in family.classes:
            raise ValueError(f"unknown {family.kind} {name!r}; allowed: {sorted(family.classes)}")
        cls = family.classes[name]
        d = {k: v for k, v in d.items() if v is not None}
        unknown = sorted(set(d) - set(cls.config_options))
        if unknown:
            raise ValueError(f"{cls.__name__} takes the options {list(cls.config_options)}, got also {unknown}")
        return cls(**(family.convert(d) if family.convert else d))
    raise ValueError(f"cannot build {family.noun} from {spec!r}; use a name ({sorted(family.classes)}), a dict with "
                     f"a name and options, or a {family.base.__name__}")


def per_layer(names: Any, num_layers: int, family: Family, group: str,
              split: Callable[[str, Any], list[Any]] | None = None, **options: Any) -> list[Any]:
    """One option object per layer n = 1..N from a recipe group: ``names`` one name or a list of N (``None``: the
    default); every option one value or a list of N (``split(key, value)`` overrides how a value is spread over the
    layers). ``group`` names the config group in errors."""
    from .compressors import _per_layer

    layer_names = _per_layer(names, f"{group}.layers", num_layers)
    per = {k: (split(k, v) if split is not None else None) or _per_layer(v, f"{group}.{k}", num_layers)
           for k, v in options.items()}
    out = []
    for n, name in enumerate(layer_names):
        key = family.default if name is None else str(name).lower()
        if key not in family.classes:
            raise ValueError(f"{group}.layers[{n}] = {name!r} is not {family.noun}; allowed: "
                             f"{sorted(family.classes)}")
        cls = family.classes[key]
        out.append(from_spec({"name": key, **{k: v[n] for k, v in per.items() if k in cls.config_options}}, family))
    return out
