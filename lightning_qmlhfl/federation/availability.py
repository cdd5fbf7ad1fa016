"""Device availability and dropouts.

A device can be drawn for a layer-1 aggregation period only when it is *available* at the period's start; a drawn
device that *drops out* after training does not upload (its work is lost). Either is given by probabilities per
period or by a trace of availability windows in simulated time (in the spirit of FedScale's client traces):

- ``Availability(unavailable=q, dropout=d)``: every device is unavailable for a period with probability q (a
  number, or one per device), and a drawn device drops out with probability d (likewise), independently.
- ``Availability(trace=AvailabilityTrace...)``: device i is available at time t when t lies in one of its
  windows [start, end); a drawn device drops out when its window closes before its upload is complete.

Trace files (``AvailabilityTrace.from_file``), times in simulated seconds:

- JSON: ``{"devices": [[[start, end], ...], ...], "period": P}``: one list of windows per device, in device
  order (all devices); ``period`` (optional) repeats every device's windows every P seconds.
- CSV: a header ``device,start,end`` and one row per window (every device needs at least one window).

Windows must have 0 <= start < end; a device's windows must not overlap. Draws are counter-based (seeded from the
run seed, the round and the aggregation event), so they do not depend on how the rows are processed.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Availability", "AvailabilityTrace", "TraceFormatError"]


class TraceFormatError(ValueError):
    """A malformed availability trace file."""


def _probability(value: Any, what: str, n: int | None = None) -> Tensor | float:
    if isinstance(value, Tensor) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
        if not bool(((t >= 0) & (t < 1)).all()):
            raise ValueError(f"{what} must hold probabilities in [0, 1), got values in [{float(t.min())}, "
                             f"{float(t.max())}]")
        return t
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"{what} must be a probability in [0, 1) (or one per device), got {value!r}")
    return float(value)


class AvailabilityTrace:
    """Per device, the windows [start, end) of simulated seconds in which it is online (module docstring)."""

    def __init__(self, windows: Sequence[Sequence[Sequence[float]]], period: float | None = None) -> None:
        if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or len(windows) == 0:
            raise TraceFormatError("an availability trace needs one list of [start, end) windows per device")
        if period is not None and (isinstance(period, bool) or not isinstance(period, numbers.Real)
                                   or not math.isfinite(float(period)) or float(period) <= 0):
            raise TraceFormatError(f"period must be a number of seconds > 0, got {period!r}")
        self.period = None if period is None else float(period)
        width = max(len(w) for w in windows)
        starts = torch.full((len(windows), max(1, width)), math.inf, dtype=torch.float64)
        ends = torch.full_like(starts, math.inf)
        for i, dev in enumerate(windows):
            if len(dev) == 0:
                raise TraceFormatError(f"device {i} has no availability window (it could never take part)")
            spans = []
            for j, win in enumerate(dev):
                if isinstance(win, (str, bytes)) or not isinstance(win, Sequence) or len(win) != 2:
                    raise TraceFormatError(f"device {i}, window {j}: expected [start, end], got {win!r}")
                s, e = win
                for v in (s, e):
                    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
                        raise TraceFormatError(f"device {i}, window {j}: times must be numbers, got {win!r}")
                if not 0 <= float(s) < float(e):
                    raise TraceFormatError(f"device {i}, window {j}: need 0 <= start < end, got {win!r}")
                if self.period is not None and float(e) > self.period:
                    raise TraceFormatError(f"device {i}, window {j} ends after the period {self.period}: {win!r}")
                spans.append((float(s), float(e)))
            spans.sort()
            for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
                if s1 < e0:
                    raise TraceFormatError(f"device {i}: windows {[s0, e0]} and {[s1, e1]} overlap")
            for j, (s, e) in enumerate(spans):
                starts[i, j], ends[i, j] = s, e
        self.starts, self.ends = starts, ends

    @property
    def num_devices(self) -> int:
        return self.starts.shape[0]

    @classmethod
    def from_file(cls, path: str | Path) -> "AvailabilityTrace":
        """Read a JSON or CSV trace (module docstring), with errors that name the file and the entry."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise TraceFormatError(f"cannot read availability trace {path}: {err}") from err
        try:
            if path.suffix.lower() == ".csv":
                rows = list(csv.DictReader(text.splitlines()))
                if not rows or set(rows[0]) != {"device", "start", "end"}:
                    raise TraceFormatError("a CSV trace needs the header device,start,end and at least one row")
                per: dict[int, list[list[float]]] = {}
                for k, r in enumerate(rows, start=2):
                    try:
                        dev, s, e = int(r["device"]), float(r["start"]), float(r["end"])
                    except (TypeError, ValueError) as err:
                        raise TraceFormatError(f"line {k}: {r} is not device,start,end numbers ({err})") from None
                    if dev < 0:
                        raise TraceFormatError(f"line {k}: device {dev} < 0")
                    per.setdefault(dev, []).append([s, e])
                n = max(per) + 1
                return cls([per.get(i, []) for i in range(n)])
            data = json.loads(text)
        except TraceFormatError as err:
            raise TraceFormatError(f"{path}: {err}") from None
        except json.JSONDecodeError as err:
            raise TraceFormatError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or "devices" not in data:
            raise TraceFormatError(f'{path}: expected {{"devices": [[[start, end], ...], ...]}}, got keys '
                                   f'{sorted(data) if isinstance(data, dict) else type(data).__name__}')
        try:
            return cls(data["devices"], data.get("period"))
        except TraceFormatError as err:
            raise TraceFormatError(f"{path}: {err}") from None

    def _window(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(online bool [N], end of the window holding t, float64 [N]) for every device at its own time t [N]."""
        tt = t.to(torch.float64)
        if self.period is not None:
            tt = torch.remainder(tt, self.period)
        j = torch.searchsorted(self.starts, tt[:, None], right=True).squeeze(1) - 1
        jj = j.clamp(min=0)
        end = self.ends.gather(1, jj[:, None]).squeeze(1)
        online = (j >= 0) & (tt < end)
        if self.period is not None:
            end = end + (t.to(torch.float64) - tt)  # back to absolute time
        return online, end

    def online(self, t: Tensor) -> Tensor:
        """bool [N]: whether each device is online at its own time t [N]."""
        return self._window(t)[0]

    def online_through(self, start: Tensor, end: Tensor) -> Tensor:
        """bool [N]: online at ``start`` and still online at ``end`` (in the same window)."""
        online, until = self._window(start)
        return online & (end.to(torch.float64) < until)


class Availability:
    """Who can be drawn and who drops out (module docstring)."""

    def __init__(self, unavailable: float | Sequence[float] | Tensor = 0.0,
                 dropout: float | Sequence[float] | Tensor = 0.0, trace: AvailabilityTrace | str | None = None
                 ) -> None:
        self.unavailable = _probability(unavailable, "unavailable")
        self.dropout = _probability(dropout, "dropout")
        if isinstance(trace, (str, Path)):
            trace = AvailabilityTrace.from_file(trace)
        if trace is not None and not isinstance(trace, AvailabilityTrace):
            raise TypeError(f"trace must be an AvailabilityTrace or a file path, got {type(trace).__name__}")
        self.trace = trace

    @property
    def is_always(self) -> bool:
        """Whether every device is always available and never drops out."""
        return (self.trace is None and not isinstance(self.unavailable, Tensor) and self.unavailable == 0
                and not isinstance(self.dropout, Tensor) and self.dropout == 0)

    def check(self, num_devices: int) -> None:
        for name in ("unavailable", "dropout"):
            v = getattr(self, name)
            if isinstance(v, Tensor) and v.numel() != num_devices:
                raise ValueError(f"availability {name} has {v.numel()} entries but there are {num_devices} devices")
        if self.trace is not None and self.trace.num_devices != num_devices:
            raise ValueError(f"the availability trace describes {self.trace.num_devices} devices but there are "
                             f"{num_devices}")

    def available(self, now: Tensor, generator: torch.Generator) -> Tensor:
        """bool [N]: the devices that can be drawn at their period start ``now`` (float64 [N], simulated s)."""
        n = now.numel()
        ok = torch.ones(n, dtype=torch.bool)
        if self.trace is not None:
            ok &= self.trace.online(now)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if isinstance(self.unavailable, Tensor) or self.unavailable > 0:
            ok &= ~(u < self.unavailable)
        return ok

    def drops(self, start: Tensor, finish: Tensor, generator: torch.Generator) -> Tensor:
        """bool [N]: the devices whose upload is lost: by the dropout probability, or (trace) because their window
        closes before ``finish`` (their upload's completion time; ``start`` the period start)."""
        n = start.numel()
        lost = torch.zeros(n, dtype=torch.bool)
        if self.trace is not None:
            lost |= ~self.trace.online_through(start, finish)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if isinstance(self.dropout, Tensor) or self.dropout > 0:
            lost |= u < self.dropout
        return lost

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            return f"<{v.numel()} per device>" if isinstance(v, Tensor) else repr(v)

        trace = "" if self.trace is None else f", trace=<{self.trace.num_devices} devices>"
        return f"Availability(unavailable={show(self.unavailable)}, dropout={show(self.dropout)}{trace})"
