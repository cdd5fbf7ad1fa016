"""Config -> the trust options of every layer: differential privacy (``privacy``), robust aggregation (``robust``)
and Byzantine senders (``attack``) (docs/privacy.md, docs/robustness.md).

Each group names where it acts in words that fit the hierarchy, or per layer with ``layers``:

- ``privacy.trust``: ``devices`` (every device adds noise to its upload: no one trusted; local DP at layer 1),
  ``edge`` (every edge server adds noise to its aggregate: edges trusted; central DP at layer 1), ``cloud`` (the
  cloud adds noise to its aggregate: central DP at layer N), or ``layers`` (``privacy.layers`` a list of N names
  with ``privacy.where`` one value or a list). ``target_epsilon`` (with ``delta``) calibrates the noise multiplier
  for the run's rounds instead of ``noise_multiplier``.
- ``robust.at``: ``edge`` (layer 1, over every edge server's devices), ``cloud`` (layer N), ``both`` (1 and N),
  ``all``, ``none`` (the weighted mean everywhere: the baseline of a sweep over placements), or ``layers`` (``robust.layers`` a list of N names).
- ``attack.at``: ``devices`` (Byzantine devices: layer 1) or ``edge`` (compromised edge servers corrupt their
  aggregate: layer 2).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_qmlhfl.federation.participation import Participation
from lightning_qmlhfl.privacy import Privacy, calibrate_noise_multiplier, layer_privacy, noise_points
from lightning_qmlhfl.robust import Attack, RobustAggregator, layer_attacks, layer_robust_aggregators
from recipes.options import ConfigError, check_choice
from recipes.simulation import _library

__all__ = ["build_privacy", "build_robust", "build_attacks", "dp_delta"]

TRUST = ("none", "devices", "edge", "cloud", "layers")
ROBUST_AT = ("none", "edge", "cloud", "both", "all", "layers")
ATTACK_AT = ("devices", "edge")


def _opts(cfg: DictConfig, group: str) -> dict[str, Any] | None:
    c: Any = cfg.get(group)
    return None if c is None else OmegaConf.to_container(c, resolve=True)


def dp_delta(cfg: DictConfig) -> float | None:
    """The delta of the reported guarantee (``privacy.delta``), None without the group."""
    opts = _opts(cfg, "privacy")
    return None if opts is None or opts.get("delta") is None else float(opts["delta"])


def build_privacy(cfg: DictConfig, num_layers: int, taus: list[int], participation: list[Participation],
                  hierarchy: Any, rounds: int) -> list[Privacy]:
    """One privacy option per layer (module docstring); none everywhere without the group."""
    opts = _opts(cfg, "privacy")
    if opts is None:
        return layer_privacy("none", num_layers)
    trust = check_choice(opts.pop("trust", "none"), "privacy.trust", TRUST)
    names = opts.pop("layers", "none")
    target, delta = opts.pop("target_epsilon", None), opts.pop("delta", None)
    if trust == "none":
        return layer_privacy("none", num_layers)
    if trust != "layers":
        layer = num_layers if trust == "cloud" else 1
        names = ["gaussian" if n == layer else "none" for n in range(1, num_layers + 1)]
        opts["where"] = "local" if trust == "devices" else "central"
    elif isinstance(names, str):
        raise ConfigError(f"privacy.layers={names!r}: with privacy.trust=layers give a list of {num_layers} names "
                          f"(gaussian | none), one per layer")
    if target is not None:
        if opts.get("noise_multiplier") is not None:
            raise ConfigError(f"privacy.target_epsilon={target!r} and privacy.noise_multiplier="
                              f"{opts['noise_multiplier']!r}: give one (the target calibrates the multiplier)")
        if delta is None:
            raise ConfigError("privacy.target_epsilon needs privacy.delta")
        opts["noise_multiplier"] = 1.0
        probe = _library("privacy", lambda: layer_privacy(names, num_layers, **opts), opts)
        points = noise_points(hierarchy, taus, probe, participation)
        if len(points) != 1:
            raise ConfigError(f"privacy.target_epsilon calibrates one noise point; these options add noise at "
                              f"{len(points)} layers: give privacy.noise_multiplier instead")
        z = _library("privacy", lambda: calibrate_noise_multiplier(points[0], float(target), float(delta), rounds))
        opts["noise_multiplier"] = z
    return _library("privacy", lambda: layer_privacy(names, num_layers, **opts), opts)


def build_robust(cfg: DictConfig, num_layers: int) -> list[RobustAggregator]:
    """One aggregator per layer (module docstring); the weighted mean everywhere without the group."""
    opts = _opts(cfg, "robust")
    if opts is None:
        return layer_robust_aggregators("mean", num_layers)
    names = opts.pop("layers", "mean")
    at = check_choice(opts.pop("at", "layers"), "robust.at", ROBUST_AT)
    if at != "layers":
        if not isinstance(names, str):
            raise ConfigError(f"robust.layers={names!r} with robust.at={at!r}: give one name (or robust.at=layers)")
        on = {"none": set(), "edge": {1}, "cloud": {num_layers}, "both": {1, num_layers},
              "all": set(range(1, num_layers + 1))}[at]
        names = [names if n in on else "mean" for n in range(1, num_layers + 1)]
    return _library("robust", lambda: layer_robust_aggregators(names, num_layers, **opts), opts)


def build_attacks(cfg: DictConfig, num_layers: int) -> list[Attack]:
    """One attack per layer (module docstring); none without the group."""
    opts = _opts(cfg, "attack")
    if opts is None:
        return layer_attacks("none", num_layers)
    name = opts.pop("name", "none")
    at = check_choice(opts.pop("at", "devices"), "attack.at", ATTACK_AT)
    layer = 1 if at == "devices" else 2
    if layer > num_layers:
        raise ConfigError(f"attack.at=edge needs a hierarchy of at least 2 layers (this one has {num_layers})")
    names = [name if n == layer else "none" for n in range(1, num_layers + 1)]
    return _library("attack", lambda: layer_attacks(names, num_layers, **opts), opts)
