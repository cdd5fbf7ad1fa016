"""Checks of option values, written once: each returns the value in its canonical type or raises a ValueError (a
TypeError for a wrong kind of object) whose one line names the option, the value and what is allowed.

The library's components and :class:`~lightning_qmlhfl.config.SimulationConfig` validate through these, so that
every message has the same shape: ``"<what> must be <allowed>, got <value!r>"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

__all__ = ["integer", "real", "probability", "choice", "instance", "function"]


def integer(value: object, what: str, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False) -> int | None:
    """An int (bools are refused) within [minimum, maximum]."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        bounds = ("" if minimum is None else f" >= {minimum}") if maximum is None else (
            f" in [{minimum}, {maximum}]" if minimum is not None else f" <= {maximum}")
        raise ValueError(f"{what} must be {'None or ' if allow_none else ''}an integer{bounds}, got {value!r}")
    return int(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def real(value: object, what: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number (bools refused) within the interval given by ``low``/``high`` (open ends with
    ``low_open``/``high_open``)."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open
                                                                                        else v <= high))
    if not ok:
        interval = _interval(low, high, low_open, high_open)
        kind = "a finite number" if high is None else "a number"  # (a bounded interval excludes inf by itself)
        raise ValueError(f"{what} must be {'None or ' if allow_none else ''}{kind}{interval}, got {value!r}")
    return float(value)


def probability(value: object, what: str, *, zero: bool = True, one: bool = True) -> float:
    """A number in [0, 1] (``zero=False``: (0, ...; ``one=False``: ..., 1))."""
    return real(value, what, 0.0, 1.0, low_open=not zero, high_open=not one)


def choice(value: object, what: str, allowed: Iterable[Any]) -> Any:
    """One of ``allowed`` (compared with ==)."""
    allowed = tuple(allowed)
    if not any(value == a and type(value) is type(a) for a in allowed):
        names = ", ".join(repr(a) for a in allowed[:-1]) + (" or " if len(allowed) > 1 else "") + repr(allowed[-1])
        raise ValueError(f"{what} must be {names}, got {value!r}")
    return value


def instance(value: object, what: str, cls: type | tuple[type, ...], allow_none: bool = False) -> Any:
    """An instance of ``cls`` (a TypeError otherwise)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"{what} must be {'None or ' if allow_none else ''}a {names}, got {type(value).__name__} "
                        f"{value!r}")
    return value


def function(value: object, what: str, signature: str, allow_none: bool = True) -> Callable | None:
    """A callable (``signature`` says how it is called, for the message)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{what} must be callable {signature}, got {value!r}")
    return value
