"""Byzantine attack models: what a fixed set of malicious senders upload instead of their honest model differences.

Where an attack acts. At the aggregation of layer n the senders are the nodes of layer n-1 (layer 0: the devices)
and each sender uploads one row, its model difference x = v_child - v_parent. An attack at layer n picks, once for
the whole run, a fixed set of Byzantine senders among the nodes of layer n-1 (:meth:`Attack.byzantine`) and, at
every layer-n aggregation, replaces the uploads of those of them that upload by the attack's message
(:meth:`Attack.corrupt`); the honest uploads are passed on bit for bit. A compromised edge server is the same
attack at layer 2: its upload there is the (corrupted) aggregate of its subtree, i.e. the attack's message in
place of its model difference; an attack at layer 1 is a set of compromised devices.

The attacks (config names in quotes; ``fraction`` in [0, 1) is the share of Byzantine senders, required):

- ``NoAttack()`` "none": nothing (the default).
- ``SignFlip(fraction, scale=1.0)`` "sign_flip": x -> -scale * x.
- ``GaussianAttack(fraction, std=1.0, scaled=True)`` "gaussian": the message is zero-mean Gaussian noise, i.i.d.
  over the P coordinates, with standard deviation ``std * ||x_i||_2 / sqrt(P)`` (``scaled=True``: ``std`` times the
  root mean square of the row's own coordinates, so the message has about ``std`` times the norm of the honest
  upload whatever its scale) or ``std`` (``scaled=False``: an absolute standard deviation).
- ``ALIE(fraction, z=None)`` "alie": "A little is enough" (Baruch, Baruch and Goldberg, NeurIPS 2019). The
  attacker is omniscient: per segment (the rows of one parent), it takes the per-coordinate mean mu and standard
  deviation sigma (population std, ddof 0) of *all* the segment's uploads (honest and Byzantine rows, before any
  corruption), and every Byzantine row of the segment sends mu - z * sigma. ``z=None`` takes the paper's z_max
  per segment (:func:`alie_z_max`): with n the segment's number of uploading rows in this call and f its number of
  Byzantine rows, s = floor(n/2 + 1) - f and z_max = Phi^-1((n - s) / n). Degenerate rule: when (n - s) / n is
  not inside (0, 1) - s <= 0, the Byzantine rows alone are a majority of the segment (e.g. a segment of one
  Byzantine row), or s >= n, which only happens for a segment with no Byzantine row - z = 0 and the Byzantine
  rows send the segment's mean.
- ``LabelFlip(fraction, num_classes=10)`` "label_flip": a data attack. ``corrupt`` leaves the uploads as they are;
  the Byzantine senders train on flipped labels y -> num_classes - 1 - y (:func:`flip_labels`). It is meant for
  layer 1 (Byzantine devices); at a higher layer the reading is that every device below a Byzantine sender flips
  its labels. Applying the flip to the data is the caller's part.

The Byzantine draw (:meth:`Attack.byzantine`): exactly round(fraction * num_senders) senders (Python's round, half
to even, like :class:`~lightning_qmlhfl.federation.participation.Fraction`), uniformly without replacement, the
first ones of a permutation drawn from a CPU generator seeded with ``mix(seed, BYZANTINE_KEY, layer)``
(:mod:`lightning_qmlhfl.rng`). The set depends only on (seed, layer, num_senders, fraction): it is the same at
every round and every aggregation of the run (and after a resume), the same for every attack class with the same
fraction, and nested in the fraction (a larger fraction adds senders to a smaller fraction's set).

This module is the math only (no Lightning, no engine): the option objects, their config round trip
(:func:`make_attack`, :func:`layer_attacks`) and the operations on stacked [rows, P] tensors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import checks
from ..options import ConfigOption, Family, from_spec, per_layer
from ..rng import generator as _keyed_generator

__all__ = ["Attack", "NoAttack", "SignFlip", "GaussianAttack", "ALIE", "LabelFlip", "ATTACKS", "ATTACK_FAMILY",
           "BYZANTINE_KEY", "make_attack", "layer_attacks", "flip_labels", "alie_z_max"]

BYZANTINE_KEY = 0x42595A414E54  # fixed key of the Byzantine draw: mix(seed, BYZANTINE_KEY, layer) ("BYZANT")


def _fraction(value: object, what: str) -> float:
    if value is None:
        raise ValueError(f"{what} must be a number in [0, 1) (the share of Byzantine senders; required), got None")
    return checks.probability(value, what, one=False)


def _check_corrupt_inputs(x: Tensor, byz: Tensor, segment: Tensor, num_segments: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [k, P] (one upload per row), got "
                         f"{type(x).__name__ if not isinstance(x, Tensor) else f'{x.dtype} {tuple(x.shape)}'}")
    k = x.shape[0]
    if not isinstance(byz, Tensor) or byz.dtype != torch.bool or tuple(byz.shape) != (k,):
        raise ValueError(f"byz must be a bool tensor [{k}] (one flag per row of x), got "
                         f"{type(byz).__name__ if not isinstance(byz, Tensor) else f'{byz.dtype} {tuple(byz.shape)}'}")
    if not isinstance(segment, Tensor) or segment.dtype != torch.int64 or tuple(segment.shape) != (k,):
        got = type(segment).__name__ if not isinstance(segment, Tensor) else f"{segment.dtype} {tuple(segment.shape)}"
        raise ValueError(f"segment must be an int64 tensor [{k}] (the parent of each row of x), got {got}")
    checks.integer(num_segments, "num_segments", minimum=0)
    if k and (int(segment.min()) < 0 or int(segment.max()) >= num_segments):
        raise ValueError(f"segment values must be in [0, {num_segments}) (num_segments = {num_segments}), got "
                         f"values in [{int(segment.min())}, {int(segment.max())}]")


class Attack(ConfigOption):
    """A Byzantine attack at one aggregation layer (module docstring). ``config_name``: the name
    :func:`make_attack` takes; ``config_options``: its constructor's options; ``fraction``: the share of Byzantine
    senders in [0, 1)."""

    config_name = ""
    config_options: tuple[str, ...] = ()
    fraction: float = 0.0

    @property
    def is_none(self) -> bool:
        """True when the attack changes nothing (no attack, or a fraction that draws no Byzantine sender)."""
        return self.fraction == 0.0

    @property
    def poisons_data(self) -> bool:
        """True for a data attack (the Byzantine senders train on poisoned data; ``corrupt`` changes nothing)."""
        return False

    def num_byzantine(self, num_senders: int) -> int:
        """round(fraction * num_senders): Python's round, half to even."""
        checks.integer(num_senders, "num_senders", minimum=0)
        return int(round(self.fraction * num_senders))

    def byzantine(self, num_senders: int, seed: int, layer: int) -> Tensor:
        """bool [num_senders]: the fixed Byzantine senders of the layer-``layer`` aggregation, sender i the i-th
        node of layer ``layer`` - 1 (all its nodes, not only those that upload in a given period). Exactly
        :meth:`num_byzantine` of them, the first of a uniform permutation drawn from a CPU generator seeded with
        ``mix(seed, BYZANTINE_KEY, layer)``: the same set for the whole run (module docstring)."""
        count = self.num_byzantine(num_senders)
        checks.integer(seed, "seed")
        checks.integer(layer, "layer", minimum=1)
        out = torch.zeros(num_senders, dtype=torch.bool)
        if count:
            perm = torch.randperm(num_senders, generator=_keyed_generator(seed, BYZANTINE_KEY, layer))
            out[perm[:count]] = True
        return out

    def corrupt(self, x: Tensor, byz: Tensor, segment: Tensor, num_segments: int,
                generator: torch.Generator | None = None) -> Tensor:
        """[k, P]: the uploads ``x`` (one row per uploading sender, ``segment`` the parent of each row in
        [0, num_segments)) with the rows flagged in ``byz`` replaced by the attack's message. A new tensor: ``x``
        is not modified, and the honest rows are copied bit for bit. ``generator``: the draws of a randomised
        attack (unused by the others)."""
        _check_corrupt_inputs(x, byz, segment, num_segments)
        out = x.clone()
        if x.shape[0] == 0 or x.shape[1] == 0 or not bool(byz.any()):
            return out
        rows = torch.nonzero(byz, as_tuple=True)[0]  # ascending
        out[rows] = self._message(x, byz, rows, segment, num_segments, generator).to(x.dtype)
        return out

    def _message(self, x: Tensor, byz: Tensor, rows: Tensor, segment: Tensor, num_segments: int,
                 generator: torch.Generator | None) -> Tensor:
        """[len(rows), P]: the messages of the Byzantine rows ``rows`` (ascending)."""
        return x[rows]



class NoAttack(Attack):
    """No Byzantine sender (the default)."""

    config_name = "none"
    config_options = ()

    def __init__(self) -> None:
        self.fraction = 0.0


class SignFlip(Attack):
    """x -> -scale * x for every Byzantine row (``scale`` > 0)."""

    config_name = "sign_flip"
    config_options = ("fraction", "scale")

    def __init__(self, fraction: float | None = None, scale: float = 1.0) -> None:
        self.fraction = _fraction(fraction, "SignFlip fraction")
        self.scale = checks.real(scale, "SignFlip scale", low=0.0, low_open=True)

    def _message(self, x, byz, rows, segment, num_segments, generator):
        return x[rows] * (-self.scale)


class GaussianAttack(Attack):
    """Zero-mean Gaussian noise in place of every Byzantine row (module docstring). The noise is
    ``torch.randn(b, P, generator=generator, dtype=x.dtype, device=generator.device)`` for the b Byzantine rows
    in ascending row order, times ``std * ||x_i|| / sqrt(P)`` (``scaled``) or ``std``; ``generator`` is required."""

    config_name = "gaussian"
    config_options = ("fraction", "std", "scaled")

    def __init__(self, fraction: float | None = None, std: float = 1.0, scaled: bool = True) -> None:
        self.fraction = _fraction(fraction, "GaussianAttack fraction")
        self.std = checks.real(std, "GaussianAttack std", low=0.0)
        self.scaled = checks.choice(scaled, "GaussianAttack scaled", (True, False))

    def _message(self, x, byz, rows, segment, num_segments, generator):
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"GaussianAttack.corrupt needs a torch.Generator for its noise, got {generator!r}")
        noise = torch.randn(rows.numel(), x.shape[1], generator=generator, dtype=x.dtype,
                            device=generator.device).to(x.device)
        if not self.scaled:
            return noise * self.std
        sigma = torch.linalg.vector_norm(x[rows], dim=1, keepdim=True) * (self.std / math.sqrt(x.shape[1]))
        return noise * sigma


def _z_max(n: Tensor, f: Tensor) -> Tensor:
    """float64: the paper's z_max per segment from int64 n (rows) and f (Byzantine rows); 0 where degenerate."""
    n, f = n.to(torch.float64), f.to(torch.float64)
    s = torch.floor(n / 2 + 1) - f
    ok = (s > 0) & (s < n)
    p = torch.where(ok, (n - s) / torch.where(n > 0, n, torch.ones_like(n)), torch.full_like(n, 0.5))
    return torch.where(ok, torch.special.ndtri(p), torch.zeros_like(p))


def alie_z_max(n: int, f: int) -> float:
    """ALIE's z_max for a segment of ``n`` uploading rows of which ``f`` are Byzantine: s = floor(n/2 + 1) - f,
    z_max = Phi^-1((n - s) / n); 0 when 0 < s < n fails (module docstring: the degenerate rule)."""
    n = checks.integer(n, "ALIE n (rows of the segment)", minimum=1)
    f = checks.integer(f, "ALIE f (Byzantine rows of the segment)", minimum=0, maximum=n)
    return float(_z_max(torch.tensor([n]), torch.tensor([f]))[0])


class ALIE(Attack):
    """ALIE ("A little is enough"): every Byzantine row sends its segment's mean - z * std (module docstring);
    ``z``: a number >= 0, or ``None`` for the paper's z_max per segment."""

    config_name = "alie"
    config_options = ("fraction", "z")

    def __init__(self, fraction: float | None = None, z: float | None = None) -> None:
        self.fraction = _fraction(fraction, "ALIE fraction")
        self.z = checks.real(z, "ALIE z", low=0.0, allow_none=True)

    def _message(self, x, byz, rows, segment, num_segments, generator):
        ones = torch.ones(x.shape[0], dtype=torch.int64, device=x.device)
        n = torch.zeros(num_segments, dtype=torch.int64, device=x.device).index_add_(0, segment, ones)
        f = torch.zeros(num_segments, dtype=torch.int64, device=x.device).index_add_(0, segment, byz.long())
        denom = n.clamp(min=1).to(x.dtype)[:, None]
        mean = torch.zeros(num_segments, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, segment, x)
        mean = mean / denom
        dev = x - mean[segment]
        var = torch.zeros_like(mean).index_add_(0, segment, dev * dev) / denom
        std = var.sqrt()
        if self.z is None:
            z = _z_max(n, f).to(x.dtype)
        else:
            z = torch.full((num_segments,), self.z, dtype=x.dtype, device=x.device)
        seg = segment[rows]
        return mean[seg] - z[seg][:, None] * std[seg]


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """y -> num_classes - 1 - y (a new tensor); ``y`` integer labels in [0, num_classes)."""
    num_classes = checks.integer(num_classes, "num_classes", minimum=2)
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got "
                         f"{type(y).__name__ if not isinstance(y, Tensor) else y.dtype}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must be in [0, {num_classes}) (num_classes = {num_classes}), got {bad}")
    return (num_classes - 1) - y


class LabelFlip(Attack):
    """A data attack: the Byzantine senders train on labels y -> num_classes - 1 - y (:meth:`flip`); ``corrupt``
    leaves the uploads as they are."""

    config_name = "label_flip"
    config_options = ("fraction", "num_classes")

    def __init__(self, fraction: float | None = None, num_classes: int = 10) -> None:
        self.fraction = _fraction(fraction, "LabelFlip fraction")
        self.num_classes = checks.integer(num_classes, "LabelFlip num_classes", minimum=2)

    @property
    def poisons_data(self) -> bool:
        return True

    def flip(self, y: Tensor) -> Tensor:
        """:func:`flip_labels` with this attack's ``num_classes``."""
        return flip_labels(y, self.num_classes)

    def corrupt(self, x: Tensor, byz: Tensor, segment: Tensor, num_segments: int,
                generator: torch.Generator | None = None) -> Tensor:
        _check_corrupt_inputs(x, byz, segment, num_segments)
        return x.clone()


ATTACKS: dict[str, type[Attack]] = {"none": NoAttack, "sign_flip": SignFlip, "gaussian": GaussianAttack,
                                    "alie": ALIE, "label_flip": LabelFlip}

ATTACK_FAMILY = Family(Attack, ATTACKS, "none", "attack", "an attack")


def make_attack(spec: object) -> Attack:
    """From a config value: an instance, ``None`` (no attack), a name, or a dict with ``name`` and options
    (:func:`lightning_qmlhfl.options.from_spec`); every attack but "none" needs its ``fraction``."""
    return from_spec(spec, ATTACK_FAMILY)


def layer_attacks(names: Any, num_layers: int, **options: Any) -> list[Attack]:
    """One attack per aggregation layer n = 1..N from config values: ``names`` one name or a list of N (``None``:
    no attack); every option (``fraction``, ``scale``, ``std``, ``scaled``, ``z``, ``num_classes``) one value or a
    list of N; each layer takes the options its attack has, ``None`` the attack's default. Layer n's attack acts
    on the uploads of the nodes of layer n-1 (n = 2: compromised edge servers)."""
    return per_layer(names, num_layers, ATTACK_FAMILY, "attack",
                     split=lambda k, v: [v] * num_layers if v is None or isinstance(v, (str, bool))
                     or not isinstance(v, Sequence) else None, **options)
