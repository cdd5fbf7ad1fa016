"""Checks of the recipes' config values (no Lightning here): every value is checked for its type and range where it
is read, and a bad one raises :class:`ConfigError` naming the key, the value and what is allowed. The command line
prints a :class:`ConfigError` as one line, without a traceback (``HYDRA_FULL_ERROR=1`` shows it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["ConfigError", "check_choice", "check_fraction", "check_number", "int_list", "int_option", "number_list",
           "optional_number"]


class ConfigError(ValueError):
    """A config value is of the wrong type, out of range, or inconsistent with another; the message names the key,
    the value and what is allowed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_option(value: Any, what: str, minimum: int, allow_none: bool = True) -> int | None:
    """``value`` as an integer ``>= minimum`` (None passes when ``allow_none``); ``what`` names it in the error.
    Booleans, floats (``2.5``, also ``2.0``) and strings are refused: a count is never rounded or parsed."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{what} must be {'null or ' if allow_none else ''}an integer >= {minimum}, got {value!r}")
    return value


def check_number(value: Any, what: str, *, minimum: float | None = None, exclusive: bool = False,
                 maximum: float | None = None) -> float:
    """``value`` as a finite float, ``>= minimum`` (``> minimum`` when ``exclusive``) and ``<= maximum`` where given.
    Booleans and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be {_range_text(minimum, exclusive, maximum)}, got {value!r}")
    v = float(value)
    if (minimum is not None and (v <= minimum if exclusive else v < minimum)) or (maximum is not None and v > maximum):
        raise ConfigError(f"{what} must be {_range_text(minimum, exclusive, maximum)}, got {value!r}")
    return v


def optional_number(value: Any, what: str, **limits: Any) -> float | None:
    """:func:`check_number`, or None for null."""
    return None if value is None else check_number(value, what, **limits)


def _range_text(minimum: float | None, exclusive: bool, maximum: float | None) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


def check_fraction(value: object, what: str, allow_zero: bool = True) -> float:
    """``value`` as a float in ``[0, 1)`` (or ``(0, 1)`` without ``allow_zero``); ``what`` names it in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}")
    v = float(value)
    if not (0.0 <= v < 1.0) or (v == 0.0 and not allow_zero) or math.isnan(v):
        allowed = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{what} must be in {allowed} (the fraction of samples held out), got {value!r}")
    return v


def check_choice(value: Any, what: str, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(str(a) for a in allowed)}, got {value!r}")
    return value


def _as_list(value: Any, what: str, kind: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{what} must be a list of {kind}, got {value!r}")
    return list(value)


def int_list(value: Any, what: str, minimum: int, length: int | None = None) -> list[int]:
    """A non-empty list of integers ``>= minimum`` (of ``length`` entries where given)."""
    items = _as_list(value, what, f"integers >= {minimum}")
    if not items or (length is not None and len(items) != length):
        n = f"{length} entries" if length is not None else "at least one entry"
        raise ConfigError(f"{what} must be a list of integers >= {minimum} with {n}, got {items!r}")
    for i, v in enumerate(items):
        if not _is_int(v) or v < minimum:
            raise ConfigError(f"{what}[{i}] must be an integer >= {minimum}, got {v!r} (in {what}={items!r})")
    return items


def number_list(value: Any, what: str, length: int, *, minimum: float | None = None, exclusive: bool = False,
                allow_none: bool = False) -> list[float | None]:
    """A list of ``length`` numbers (null entries where ``allow_none``), each checked by :func:`check_number`."""
    items = _as_list(value, what, "numbers")
    if len(items) != length:
        raise ConfigError(f"{what} has {len(items)} entries, the hierarchy has N = {length} layers: {items!r}")
    out: list[float | None] = []
    for i, v in enumerate(items):
        if v is None and allow_none:
            out.append(None)
        else:
            out.append(check_number(v, f"{what}[{i}]", minimum=minimum, exclusive=exclusive))
    return out
