"""Checks of the recipes' config values (no Lightning here): a bad value gets an error naming the key, the value
and what is allowed."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_fraction", "int_option"]


def int_option(value: Any, what: str, minimum: int, allow_none: bool = True) -> int | None:
    """``value`` as an integer ``>= minimum`` (None passes when ``allow_none``); ``what`` names it in the error.
    Booleans are refused (``True`` is an int to Python, never a count to a user)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be {'null or ' if allow_none else ''}an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(value: object, what: str, allow_zero: bool = True) -> float:
    """``value`` as a float in ``[0, 1)`` (or ``(0, 1)`` without ``allow_zero``); ``what`` names it in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    v = float(value)
    if not (0.0 <= v < 1.0) or (v == 0.0 and not allow_zero) or math.isnan(v):
        allowed = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{what} must be in {allowed} (the fraction of samples held out), got {value!r}")
    return v
