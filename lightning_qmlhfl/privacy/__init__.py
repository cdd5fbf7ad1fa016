"""Differential privacy for the hierarchy (docs/privacy.md): per-layer options and the arithmetic on the uploads
(:mod:`.mechanisms`, imported here), and the device-level accounting with Google's dp-accounting library
(:mod:`.accounting`, imported on first use of one of its names, so that the mechanisms do not load scipy)."""

from __future__ import annotations

from typing import Any

from .mechanisms import (PRIVACIES, PRIVACY_FAMILY, WHERE, GaussianDP, NoPrivacy, Privacy, adaptive_clip_update,
                         add_gaussian_noise_, clip_rows_, default_count_noise, layer_privacy, make_privacy,
                         noise_multiplier_for_sum, noisy_fraction_below)

_ACCOUNTING = ("NoisePoint", "Analysis", "PrivacyAccountant", "ACCOUNTANTS", "SAMPLINGS", "analyses", "point_epsilon",
               "calibrate_noise_multiplier", "noise_points", "DP_ACCOUNTING_VERSION")

__all__ = ["Privacy", "NoPrivacy", "GaussianDP", "WHERE", "PRIVACIES", "PRIVACY_FAMILY", "make_privacy",
           "layer_privacy", "default_count_noise", "noise_multiplier_for_sum", "clip_rows_", "add_gaussian_noise_",
           "noisy_fraction_below", "adaptive_clip_update", *_ACCOUNTING]


def __getattr__(name: str) -> Any:
    if name in _ACCOUNTING:
        from . import accounting
        return getattr(accounting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
