"""Uplink compressors C_n, one per layer, each optionally with error feedback.

=====================  =========  ===========================================  ==================================
compressor             unbiased   bits per upload of d numbers                  E||C(x)-x||^2 <= omega ||x||^2
=====================  =========  ===========================================  ==================================
``Identity()``         yes        32 d                                          0
``QSGD(s, b)``         yes        32 per bucket + d (1 + ceil(log2(s + 1)))      min(b/s^2, sqrt(b)/s)
``RandomK(ratio)``     yes        32 k (indices from the shared seed)           d/k - 1
``NaturalCompression`` yes        9 d                                           1/8
``TopK(ratio | k)``    no         min(k (32 + ceil(log2 d)), d + 32 k)           1 - k/d
``ScaledSign(b)``      no         d + 32 per bucket                             1 - 1/b
=====================  =========  ===========================================  ==================================

``error_feedback=None | "ef" | "ef21"`` on any of them (see :mod:`.base`). ``NoQuantization`` is ``Identity``'s
earlier name and ``Quantizer`` the interface's; both are kept as aliases.
"""

from __future__ import annotations

import numbers
from typing import Any

from .base import (ERROR_FEEDBACK, Compressor, Encoded, check_error_feedback, row_l1_norms, row_norms,
                   upload_bits)
from .identity import Identity, NoQuantization
from .natural import NaturalCompression
from .qsgd import QSGD, quantize_levels
from .sign import ScaledSign
from .sparsify import RandomK, TopK

Quantizer = Compressor

__all__ = ["Compressor", "Quantizer", "Identity", "NoQuantization", "QSGD", "TopK", "RandomK", "ScaledSign",
           "NaturalCompression", "Encoded", "ERROR_FEEDBACK", "check_error_feedback", "make_compressor",
           "make_quantizer", "layer_compressors", "layer_quantizers", "row_norms", "row_l1_norms",
           "upload_bits", "quantize_levels", "COMPRESSOR_NAMES", "validate_compressors"]

COMPRESSOR_NAMES = {
    "identity": Identity, "none": Identity, "qsgd": QSGD, "topk": TopK, "randomk": RandomK,
    "sign": ScaledSign, "scaled_sign": ScaledSign, "natural": NaturalCompression,
}


def make_compressor(spec: object) -> Compressor:
    """Build a compressor from a config value: an instance; ``None`` / "none" / "identity" (32-bit uploads); an int
    s (QSGD with s levels); a name with default options ("natural", "sign"); or a dict with ``name`` and the
    options of that compressor (``{"name": "topk", "ratio": 0.01, "error_feedback": "ef"}``). A dict without a
    name is QSGD's ``{"levels": s, "bucket_size": b}`` (levels ``None``: 32-bit)."""
    if isinstance(spec, Compressor):
        return spec
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "null", "fp32", "identity")):
        return Identity()
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return QSGD(int(spec))
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict) or hasattr(spec, "items"):
        d = dict(spec)
        name = d.pop("name", None)
        if name is None:  # QSGD's options: levels (None = 32-bit) and bucket_size
            levels, bucket = d.pop("levels", None), d.pop("bucket_size", None)
            ef = d.pop("error_feedback", None)
            if d:
                raise ValueError(f"unknown quantizer options {sorted(d)}; allowed: levels, bucket_size, "
                                 f"error_feedback (or give a compressor name)")
            return Identity(ef) if levels is None or (isinstance(levels, str) and levels.lower() in
                                                      ("none", "null")) else QSGD(levels, bucket, ef)
        key = str(name).lower()
        if key not in COMPRESSOR_NAMES:
            raise ValueError(f"unknown compressor {name!r}; allowed: {sorted(COMPRESSOR_NAMES)}")
        cls = COMPRESSOR_NAMES[key]
        unknown = sorted(set(d) - set(cls.config_options))
        if unknown:
            raise ValueError(f"{cls.__name__} takes the options {list(cls.config_options)}, got also {unknown}")
        if cls is QSGD and d.get("levels") is None:
            raise ValueError("QSGD needs levels (an integer s >= 1); use 'identity' for 32-bit uploads")
        return cls(**d)
    raise ValueError(f"cannot build a compressor from {spec!r}; use an int s >= 1, a name "
                     f"({sorted(COMPRESSOR_NAMES)}), a dict with a name and options, or a Compressor")


make_quantizer = make_compressor


def _per_layer(value: Any, what: str, num_layers: int) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return [value] * num_layers
    value = list(value)
    if len(value) != num_layers:
        raise ValueError(
            f"{what} has {len(value)} entries {value} but the hierarchy has N = {num_layers} layers: give one value "
            f"per layer, or a single value"
        )
    return value


def layer_compressors(layers: Any = "qsgd", num_layers: int = 1, prefix: str = "compressor", **options: Any
                      ) -> list[Compressor]:
    """C_1..C_N from config values. ``layers``: one compressor name for every layer or a list of N names;
    each option (``levels``, ``bucket_size``, ``ratio``, ``k``, ``error_feedback``) one value for every layer or
    a list of N; each layer takes the options its compressor has (a QSGD layer with levels ``None`` sends 32-bit
    floats). Example: ``layers=["topk", "qsgd", "qsgd"], ratio=0.01, levels=8, error_feedback=["ef", None, None]``.
    ``prefix`` names the config group in errors.
    """
    names = _per_layer(layers, f"{prefix}.layers", num_layers)
    per = {k: _per_layer(v, f"{prefix}.{k}", num_layers) for k, v in options.items()}
    out = []
    for n, name in enumerate(names):
        key = "identity" if name is None else str(name).lower()
        if key not in COMPRESSOR_NAMES:
            raise ValueError(f"{prefix}.layers[{n}] = {name!r} is not a compressor; allowed: "
                             f"{sorted(COMPRESSOR_NAMES)}")
        cls = COMPRESSOR_NAMES[key]
        opts = {k: None if isinstance(v[n], str) and v[n].lower() in ("none", "null") else v[n]
                for k, v in per.items() if k in cls.config_options}
        if cls in (TopK, RandomK) and opts.get("k") is not None:
            opts.pop("ratio", None)
        elif cls in (TopK, RandomK):
            opts.pop("k", None)
        if cls is QSGD and opts.get("levels") is None:
            out.append(Identity(opts.get("error_feedback")))
            continue
        out.append(make_compressor({"name": key, **opts}))
    return out


def layer_quantizers(levels: object, bucket_size: object, num_layers: int) -> list[Compressor]:
    """QSGD layers from ``levels`` and ``bucket_size`` (each one value or a list of N; ``None`` levels: 32-bit)."""
    return layer_compressors("qsgd", num_layers, prefix="quantizer", levels=levels, bucket_size=bucket_size)


def validate_compressors(compressors: Any, num_layers: int, what: str = "compressors") -> tuple[Compressor, ...]:
    """One compressor per layer (config values accepted), or ``None`` for 32-bit uploads everywhere. ``what``
    names the argument in errors."""
    if compressors is None:
        return tuple(Identity() for _ in range(num_layers))
    if isinstance(compressors, (Compressor, numbers.Integral, str)):
        raise ValueError(f"{what} must be a list of {num_layers} compressors (one per layer), got {compressors!r}")
    compressors = list(compressors)
    if len(compressors) != num_layers:
        raise ValueError(
            f"{what} has length {len(compressors)} but the hierarchy has N = {num_layers} layers: give one per layer"
        )
    return tuple(make_compressor(c) for c in compressors)

