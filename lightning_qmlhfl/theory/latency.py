"""Wall-clock model of one global iteration (docs/algorithm.md#latency; the model is this project's, **ours**).

One global iteration runs ``prod tau_m`` local steps on every device and, for each layer n = 1..N,
``prod_{m>n} tau_m`` uploads over the links into layer n (layer N, the cloud, once). Layers are synchronous:
a step ends when the slowest device finishes it, an aggregation of layer n starts when the slowest sender of layer
n-1 has delivered its upload, and everything happens one after the other (the schedule of docs/algorithm.md#schedule
is sequential). Hence::

    T_glob(tau) = prod_m tau_m * t_comp  +  sum_{n=1..N} (prod_{m>n} tau_m) * t_n
    t_n         = bits_n / min(uplink rate of a layer-(n-1) sender)  [+ downlink_bits_n / min(downlink rate)]

``bits_n`` is :func:`lightning_qmlhfl.compressors.upload_bits` of layer n's compressor for the model's d
parameters and its float buffers (the engine's count). The optional downlink
(Eq. 5 re-synchronisation, never quantized, so 32 d bits by default) is charged once per aggregation of the layer:
after an aggregation at layer n the new model travels down links n, n-1, ..., 1, but the links below n also aggregated
at that moment, so every link still carries exactly one download per aggregation of its own layer.
Units: seconds and bits per second throughout.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from ..compressors import Compressor, make_compressor
from ..compressors import upload_bits as _upload_bits
from ..hierarchy import aggregations_per_round

__all__ = ["LatencyModel", "RoundTime", "upload_bits", "downlink_bits", "default_uplink_rates", "default_latency",
           "measure_compute_time"]

Rate = Union[float, Sequence[float]]
"""A layer's link rate in bits/s: one number (all senders alike) or one number per sender of that layer."""


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return v


def _slowest_rate(rate: object, what: str) -> float:
    """The rate that sets a synchronous layer's time: the minimum over senders."""
    if isinstance(rate, torch.Tensor):
        rate = rate.flatten().tolist()
    if isinstance(rate, (Sequence, np.ndarray)) and not isinstance(rate, (str, bytes)):
        if len(rate) == 0:
            raise ValueError(f"{what} is an empty list; give one rate (bits/s) or one per sender")
        return min(_positive(r, f"{what}[{i}]") for i, r in enumerate(rate))
    return _positive(rate, what)


def default_uplink_rates(num_layers: int) -> list[float]:
    """The project's default links, in bit/s for layers n = 1..N: 100 Mbit/s from the devices (short, local
    links), 10x slower for every layer up (longer, shared wide-area links)."""
    return [1e8 / 10**n for n in range(num_layers)]


def default_latency(num_layers: int) -> "LatencyModel":
    """The project's default clock: 1 ms of computation per local step and :func:`default_uplink_rates`."""
    return LatencyModel(compute_time=1e-3, uplink_rates=default_uplink_rates(num_layers))


def upload_bits(quantizers: Sequence[Any], d: int, buffer_elems: int = 0,
                local_solvers: Sequence[Any] | None = None) -> list[int]:
    """Bits of one upload on each layer's links, n = 1..N, by :func:`lightning_qmlhfl.compressors.upload_bits`
    (the engine's count): the d parameters compressed by the layer's compressor plus ``buffer_elems`` float
    buffer entries (BatchNorm statistics) at 32 bits, plus what each layer's local solver sends beside them
    (``local_solvers``: one per layer, config values accepted; SCAFFOLD's variate deltas)."""
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"d (the number of model parameters) must be an integer >= 1, got {d!r}")
    if isinstance(quantizers, (str, bytes)) or not isinstance(quantizers, Sequence):
        raise ValueError(f"quantizers must be a list with one entry per layer, got {quantizers!r}")
    if local_solvers is None:
        return [_upload_bits(make_compressor(q), int(d), buffer_elems) for q in quantizers]
    from ..optimizers.local_solvers import make_local_solver

    if isinstance(local_solvers, (str, bytes)) or not isinstance(local_solvers, Sequence) \
            or len(local_solvers) != len(quantizers):
        raise ValueError(f"local_solvers must list one solver per layer ({len(quantizers)}), got {local_solvers!r}")
    return [_upload_bits(make_compressor(q), int(d), buffer_elems, local_solver=make_local_solver(s))
            for q, s in zip(quantizers, local_solvers)]


def downlink_bits(d: int) -> int:
    """Bits of one (unquantized, fp32) model download: 32 d."""
    return Compressor.baseline_bits(d)


@dataclass(frozen=True)
class RoundTime:
    """Time of one global iteration, split by where it goes (seconds).

    total: T_glob(tau). compute: prod tau_m * t_comp. per_layer_comm[n-1]: prod_{m>n} tau_m * t_n, the time
    layer n's links are busy per global iteration. link_time[n-1]: t_n, one upload (+ download) on layer n.
    """

    total: float
    compute: float
    per_layer_comm: tuple[float, ...]
    link_time: tuple[float, ...] = field(default=())

    @property
    def communication(self) -> float:
        return float(sum(self.per_layer_comm))

    def fractions(self) -> dict[str, float]:
        """Share of ``total`` spent in computation and on each layer's links (sums to 1)."""
        tot = self.total if self.total > 0 else 1.0
        out = {"compute": self.compute / tot}
        for n, c in enumerate(self.per_layer_comm, start=1):
            out[f"layer_{n}"] = c / tot
        return out


@dataclass(frozen=True)
class LatencyModel:
    """Per-step computation time and per-layer link rates; see the module docstring for the formula.

    compute_time: seconds per local step (forward + backward + update on one mini-batch) of the slowest device.
        May be ``None`` when ``compute_times_per_device`` is given.
    uplink_rates: per layer n = 1..N, the rate (bits/s) of each sender of layer n-1 to its parent: one number for
        all senders, or one per sender (the slowest sets the layer's time).
    downlink_rates: ``None`` (downloads are free) or, per layer, the rate (bits/s) parent -> children.
    compute_times_per_device: optional seconds per local step of every device (float tensor or list [N_tot]);
        the slowest sets the time, and it takes precedence over ``compute_time``.
    deadlines: optional per layer n = 1..N, seconds after the start of its aggregation period by which a sender's
        upload must be complete (``None`` entries: no deadline); see ``straggler``.
    straggler: ``"wait"`` (default: an aggregation waits for its slowest included sender, deadlines ignored) or
        ``"drop"`` (senders whose upload would complete after the layer's deadline are dropped, their work lost,
        and the aggregation happens at the deadline).
    energy: optional :class:`~lightning_qmlhfl.theory.energy.EnergyModel` (joules per step, transmit powers): the
        engine's clock then also counts energy (docs/algorithm.md#energy); it changes no time.

    With per-device compute times or per-sender rates, :meth:`round_time` with a ``hierarchy`` follows the tree
    (each node waits for its own slowest child, subtrees run in parallel; the engine's clock,
    :mod:`lightning_qmlhfl.federation.clock`, is the same recursion step by step); without one it uses the slowest sender of
    every layer, an upper bound. :meth:`lognormal` and :meth:`from_file` build heterogeneous models.
    """

    compute_time: float | None
    uplink_rates: Sequence[Rate]
    downlink_rates: Sequence[Rate] | None = None
    compute_times_per_device: torch.Tensor | Sequence[float] | None = None
    deadlines: Sequence[float | None] | None = None
    straggler: str = "wait"
    energy: Any = None

    def __post_init__(self) -> None:
        if self.compute_times_per_device is not None:
            ct = self.compute_times_per_device
            if isinstance(ct, torch.Tensor):
                ct = ct.detach().flatten().tolist()
            if isinstance(ct, (str, bytes)) or not isinstance(ct, (Sequence, np.ndarray)) or len(ct) == 0:
                raise ValueError(
                    f"compute_times_per_device must be a non-empty list/tensor of seconds per step, got {ct!r}"
                )
            step = max(_positive(c, f"compute_times_per_device[{i}]") for i, c in enumerate(ct))
        elif self.compute_time is None:
            raise ValueError("give compute_time (seconds per local step) or compute_times_per_device")
        else:
            step = _positive(self.compute_time, "compute_time (seconds per local step)")
        object.__setattr__(self, "_step", step)
        ups = self.uplink_rates
        if isinstance(ups, (str, bytes)) or not isinstance(ups, (Sequence, np.ndarray)) or len(ups) == 0:
            raise ValueError(f"uplink_rates must list one rate (bits/s) per layer n = 1..N, got {ups!r}")
        up = tuple(_slowest_rate(r, f"uplink_rates[{i}] (layer {i + 1})") for i, r in enumerate(ups))
        object.__setattr__(self, "_up", up)
        down: tuple[float, ...] | None = None
        if self.downlink_rates is not None:
            dr = self.downlink_rates
            if isinstance(dr, (str, bytes)) or not isinstance(dr, (Sequence, np.ndarray)) or len(dr) != len(up):
                raise ValueError(
                    f"downlink_rates must be None or list one rate per layer ({len(up)} layers), got {dr!r}"
                )
            down = tuple(_slowest_rate(r, f"downlink_rates[{i}] (layer {i + 1})") for i, r in enumerate(dr))
        object.__setattr__(self, "_down", down)
        if self.energy is not None:
            from .energy import EnergyModel

            if not isinstance(self.energy, EnergyModel) or self.energy.num_layers != len(up):
                raise ValueError(f"energy must be None or an EnergyModel for {len(up)} layers, got {self.energy!r}")
        if self.straggler not in ("wait", "drop"):
            raise ValueError(f"straggler must be 'wait' or 'drop', got {self.straggler!r}")
        if self.deadlines is not None:
            dl = self.deadlines
            if isinstance(dl, (str, bytes)) or not isinstance(dl, (Sequence, np.ndarray)) or len(dl) != len(up):
                raise ValueError(f"deadlines must be None or list one deadline (seconds, or None) per layer "
                                 f"({len(up)} layers), got {dl!r}")
            object.__setattr__(self, "deadlines",
                               tuple(None if v is None else _positive(v, f"deadlines[{i}] (layer {i + 1})")
                                     for i, v in enumerate(dl)))

    # ------------------------------------------------------------------ per-node times (the clock's inputs)
    def device_compute_times(self, num_devices: int) -> torch.Tensor:
        """float64 [num_devices]: seconds per local step of every device."""
        ct = self.compute_times_per_device
        if ct is None:
            return torch.full((num_devices,), self.step_time, dtype=torch.float64)
        t = torch.as_tensor(ct, dtype=torch.float64).flatten()
        if t.numel() != num_devices:
            raise ValueError(f"compute_times_per_device has {t.numel()} entries but there are {num_devices} devices")
        return t

    def sender_rates(self, n: int, num_senders: int) -> torch.Tensor:
        """float64 [num_senders]: the uplink rate (bits/s) of every sender of layer n-1 into layer n (1-based n)."""
        r = self.uplink_rates[n - 1]
        if isinstance(r, (torch.Tensor, Sequence, np.ndarray)) and not isinstance(r, (str, bytes)):
            t = torch.as_tensor(r if not isinstance(r, torch.Tensor) else r.detach(), dtype=torch.float64).flatten()
            if t.numel() != num_senders:
                raise ValueError(f"uplink_rates[{n - 1}] (layer {n}) has {t.numel()} rates but layer {n - 1} has "
                                 f"{num_senders} senders")
            return t
        return torch.full((num_senders,), float(r), dtype=torch.float64)

    def deadline(self, n: int) -> float | None:
        """Layer n's deadline in seconds when stragglers are dropped, else None."""
        if self.straggler != "drop" or self.deadlines is None:
            return None
        return self.deadlines[n - 1]

    @classmethod
    def lognormal(cls, hierarchy: Any, compute_time: float, uplink_rates: Sequence[float], compute_sigma: float = 0.0,
                  rate_sigma: float = 0.0, seed: int = 0, **kw: Any) -> "LatencyModel":
        """Heterogeneous devices and links: every device's time per step is ``compute_time`` times a lognormal
        factor exp(sigma Z) (median ``compute_time``), every sender's uplink rate likewise around ``uplink_rates``
        (one median per layer); drawn once with ``seed``. ``kw``: the other fields (downlink_rates, deadlines,
        straggler)."""
        for name, v in (("compute_sigma", compute_sigma), ("rate_sigma", rate_sigma)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        g = torch.Generator().manual_seed(int(seed))
        n_dev = hierarchy.num_devices
        ct = _positive(compute_time, "compute_time") * torch.exp(compute_sigma * torch.randn(n_dev, generator=g,
                                                                                           dtype=torch.float64))
        if isinstance(uplink_rates, (str, bytes)) or len(uplink_rates) != hierarchy.num_layers:
            raise ValueError(f"uplink_rates must list one median rate per layer ({hierarchy.num_layers}), got "
                             f"{uplink_rates!r}")
        rates = []
        for n in range(1, hierarchy.num_layers + 1):
            m = hierarchy.nodes_per_layer[n - 1]
            rates.append(_positive(uplink_rates[n - 1], f"uplink_rates[{n - 1}]")
                         * torch.exp(rate_sigma * torch.randn(m, generator=g, dtype=torch.float64)))
        return cls(compute_time=None, uplink_rates=rates, compute_times_per_device=ct, **kw)

    @classmethod
    def from_file(cls, path: Any, **kw: Any) -> "LatencyModel":
        """Per-node times from JSON: ``{"compute_times": [s per step, one per device], "uplink_rates": [[bits/s per
        sender of layer 0], [.. of layer 1], ...]}`` (optional ``downlink_rates``, ``deadlines``, ``straggler``);
        ``kw`` overrides fields."""
        import json
        from pathlib import Path

        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the latency file {p}: {err}") from None
        if not isinstance(data, dict) or "uplink_rates" not in data or "compute_times" not in data:
            raise ValueError(f"{p}: expected a JSON object with 'compute_times' and 'uplink_rates'")
        fields = dict(compute_time=None, uplink_rates=data["uplink_rates"], compute_times_per_device=
                      data["compute_times"], downlink_rates=data.get("downlink_rates"),
                      deadlines=data.get("deadlines"), straggler=data.get("straggler", "wait"))
        fields.update(kw)
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{p}: {err}") from None

    @property
    def is_homogeneous(self) -> bool:
        """Every device computes alike and every layer's senders have one rate (the slowest-sender formula is
        exact then)."""
        def one(v: Any) -> bool:
            if isinstance(v, (torch.Tensor, Sequence, np.ndarray)) and not isinstance(v, (str, bytes)):
                t = torch.as_tensor(v if not isinstance(v, torch.Tensor) else v.detach(), dtype=torch.float64)
                return bool((t == t.flatten()[0]).all())
            return True

        return one(self.compute_times_per_device) and all(one(r) for r in self.uplink_rates)

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        """N, the number of layers whose links are described."""
        return len(self._up)  # type: ignore[attr-defined]

    @property
    def step_time(self) -> float:
        """t_comp: seconds per local step of the slowest device."""
        return self._step  # type: ignore[attr-defined]

    @property
    def slowest_uplink_rates(self) -> tuple[float, ...]:
        """Per layer, the rate (bits/s) of its slowest sender."""
        return self._up  # type: ignore[attr-defined]

    @property
    def slowest_downlink_rates(self) -> tuple[float, ...] | None:
        return self._down  # type: ignore[attr-defined]

    def link_times(self, upload_bits: Sequence[int], downlink_bits: int | Sequence[int] | None = None) -> list[float]:
        """t_n per layer: ``upload_bits[n-1] / rate_n`` plus, with downlink rates, ``downlink_bits / down_rate_n``.

        ``downlink_bits``: one number for all layers (normally 32 d) or one per layer; required with downlink rates.
        """
        N = self.num_layers
        if isinstance(upload_bits, (str, bytes)) or not isinstance(upload_bits, (Sequence, np.ndarray)):
            raise ValueError(f"upload_bits must list the bits of one upload per layer, got {upload_bits!r}")
        if len(upload_bits) != N:
            raise ValueError(f"upload_bits has {len(upload_bits)} entries but the latency model has {N} layers")
        bits = [_positive(b, f"upload_bits[{i}] (layer {i + 1})") for i, b in enumerate(upload_bits)]
        times = [b / r for b, r in zip(bits, self.slowest_uplink_rates)]
        if self.slowest_downlink_rates is not None:
            if downlink_bits is None:
                raise ValueError(
                    "the model has downlink_rates: pass downlink_bits (normally 32 * d, see downlink_bits())"
                )
            if isinstance(downlink_bits, (Sequence, np.ndarray)) and not isinstance(downlink_bits, (str, bytes)):
                if len(downlink_bits) != N:
                    raise ValueError(f"downlink_bits has {len(downlink_bits)} entries, expected 1 or {N}")
                dbits = [_positive(b, f"downlink_bits[{i}]") for i, b in enumerate(downlink_bits)]
            else:
                dbits = [_positive(downlink_bits, "downlink_bits")] * N
            times = [t + b / r for t, b, r in zip(times, dbits, self.slowest_downlink_rates)]
        return times

    @property
    def needs_tree(self) -> bool:
        """Whether the round time depends on the tree (heterogeneous nodes, or stragglers dropped at deadlines)."""
        return not self.is_homogeneous or any(self.deadline(n) is not None for n in range(1, self.num_layers + 1))

    def _per_layer_down(self, downlink_bits: int | Sequence[int] | None) -> list[int] | None:
        if self.slowest_downlink_rates is None:
            return None
        if downlink_bits is None:
            raise ValueError("the model has downlink_rates: pass downlink_bits (normally 32 * d, see downlink_bits())")
        if isinstance(downlink_bits, (Sequence, np.ndarray)) and not isinstance(downlink_bits, (str, bytes)):
            return [int(b) for b in downlink_bits]
        return [int(downlink_bits)] * self.num_layers

    def round_time(
        self,
        taus: Sequence[int],
        upload_bits: Sequence[int],
        downlink_bits: int | Sequence[int] | None = None,
        hierarchy: Any = None,
    ) -> RoundTime:
        """T_glob(tau) and its split (see the module docstring). ``upload_bits``: bits per upload, per layer.

        With a ``hierarchy`` and heterogeneous nodes (or drop deadlines) the round follows the tree: the engine's
        clock for a round in which everyone takes part (:mod:`lightning_qmlhfl.federation.clock`); the split is that of the
        critical path. Otherwise the slowest sender of every layer sets its time (exact for identical nodes)."""
        from .convergence import check_taus  # local import: theory does not depend on latency either way

        t = check_taus(taus, self.num_layers)
        link = self.link_times(upload_bits, downlink_bits)
        if hierarchy is not None and self.needs_tree:
            from ..federation.participation import Full
            from ..federation.population import simulate_round

            total, split = simulate_round(hierarchy, t, self, list(upload_bits), [Full()] * self.num_layers,
                                          downlink_bits=self._per_layer_down(downlink_bits))
            return RoundTime(total=total, compute=float(split[0]), per_layer_comm=tuple(float(x) for x in split[1:]),
                             link_time=tuple(link))
        compute = float(math.prod(t)) * self.step_time
        comm = []
        for n in range(1, len(t) + 1):
            count = aggregations_per_round(t, n)
            comm.append(count * link[n - 1])
        return RoundTime(total=compute + sum(comm), compute=compute, per_layer_comm=tuple(comm), link_time=tuple(link))

    def round_time_for(self, taus: Sequence[int], quantizers: Sequence[Any], d: int, buffer_elems: int = 0
                       ) -> RoundTime:
        """:meth:`round_time` with the bits of ``quantizers`` (one spec per layer) for a d-parameter model with
        ``buffer_elems`` float buffer entries (the engine's count, :func:`upload_bits`)."""
        return self.round_time(taus, upload_bits(quantizers, d, buffer_elems),
                               downlink_bits(d + buffer_elems) if self._down else None)

    def round_time_grid(self, tau_grid: np.ndarray, link_times: Sequence[float], hierarchy: Any = None,
                        upload_bits: Sequence[int] | None = None,
                        downlink_bits: int | Sequence[int] | None = None) -> np.ndarray:
        """Vectorised T_glob for many tau: ``tau_grid`` int array [K, N], ``link_times`` t_n -> float64 [K].
        With a ``hierarchy`` (and ``upload_bits``) and heterogeneous nodes, the tree recursion of
        :func:`lightning_qmlhfl.federation.clock.tree_round_times` (the engine's clock when everyone takes part)."""
        if hierarchy is not None and self.needs_tree:
            from ..federation.clock import tree_round_times

            if upload_bits is None:
                raise ValueError("the tree recursion needs upload_bits")
            N = self.num_layers
            up = [float(upload_bits[n - 1]) / self.sender_rates(n, hierarchy.nodes_per_layer[n - 1])
                  for n in range(1, N + 1)]
            dbits = self._per_layer_down(downlink_bits)
            down = [0.0] * N if dbits is None else [dbits[n] / self.slowest_downlink_rates[n] for n in range(N)]
            return tree_round_times(hierarchy, tau_grid, self.device_compute_times(hierarchy.num_devices), up, down,
                                    [self.deadline(n) for n in range(1, N + 1)])
        t = np.asarray(tau_grid, dtype=np.float64)
        total = np.prod(t, axis=1) * self.step_time
        suffix = np.ones(t.shape[0], dtype=np.float64)  # prod_{m>n} tau_m, built from the top layer down
        for n in range(t.shape[1], 0, -1):
            total = total + suffix * link_times[n - 1]
            suffix = suffix * t[:, n - 1]
        return total


def _loss_of(module: torch.nn.Module, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("with loss_fn, example_batch must be an (inputs, targets) pair")
        x, y = batch
        return loss_fn(module(x), y)
    if hasattr(module, "training_step"):
        out = module.training_step(batch, 0)
        if isinstance(out, dict):
            out = out["loss"]
        return out
    out = module(batch)
    if not (isinstance(out, torch.Tensor) and out.numel() == 1):
        raise ValueError(
            "measure_compute_time needs a scalar loss: pass loss_fn(outputs, targets) with an (inputs, targets) "
            "batch, or a module with training_step, or a module whose forward returns the loss"
        )
    return out


def measure_compute_time(
    module: torch.nn.Module,
    example_batch: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    repeats: int = 5,
    warmup: int = 2,
) -> float:
    """Seconds of one local step (forward + backward on ``example_batch``) of ``module`` on this machine.

    The loss is ``loss_fn(module(x), y)`` for a batch ``(x, y)``; without ``loss_fn``, the module's
    ``training_step(batch, 0)`` (a LightningModule) or its forward output must be the scalar loss. Returns the
    median of ``repeats`` timed steps after ``warmup`` untimed ones; synchronises CUDA when the parameters are on a
    GPU. The SGD update itself (one axpy per parameter) is not timed; it is negligible next to the backward pass.
    The module is left as it was: parameters untouched, gradients and buffers (e.g. BatchNorm statistics)
    restored, training/eval mode restored.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("module has no trainable parameters to time a local step on")
    cuda = params[0].is_cuda
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in module.buffers()]
    was_training = module.training
    module.train()
    times = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Lightning's self.log() without a Trainer
            for i in range(warmup + repeats):
                for p in params:
                    p.grad = None
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = _loss_of(module, example_batch, loss_fn)
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved_buffers):
                b.copy_(s)
        module.train(was_training)
    return float(statistics.median(times))
