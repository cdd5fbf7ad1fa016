"""Executors: compute the Eq. 3 gradient of every device at once, from the stacked device rows.

Both take the stacked device parameters [N_tot, P], float buffers [N_tot, B] and one mini-batch per device
(any pytree of tensors whose leading dimension is N_tot) and return the gradients (``loop``: one [N_tot, P]
tensor; ``vmap``: one [N_tot, *shape] tensor per parameter in layout order, ``None`` for an unused one), the per-device losses [N_tot] and per-device auxiliary scalars {name: [N_tot]}.

- ``vmap``: ``torch.func.functional_call`` under ``torch.func.vmap`` with ``randomness="different"`` (dropout
  masks differ per device), differentiated by ordinary reverse-mode autograd. One vectorised computation.
- ``loop``: walks the rows with ordinary autograd; each row's parameters are views of the stacked buffer
  (no state-dict copies). Faster than vmap for small CNNs on CPU, where vmap turns convolutions into grouped ones.

Floating-point buffers (BatchNorm running statistics) are updated in place in their rows by the forward pass.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .. import checks
from ..config import FORWARDS
from .row_streams import RowStream
from .row_threads import first_free, turn_taking
from .stacked import ParamLayout
from .step_guard import ConcurrentStepError, StepGuard, VmapUnsupportedError, metric_class

__all__ = ["Objective", "VmapExecutor", "LoopExecutor", "GuardedVmapExecutor", "VmapUnsupportedError", "make_executor",
           "choose_executor"]

ExecutorName = Literal["auto", "vmap", "loop"]
LossFn = Callable[[nn.Module, Any], Any]


def _normalise_output(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Accept a loss tensor, a dict with "loss" (Lightning style) or a (loss, {name: scalar}) pair."""
    if isinstance(out, Tensor):
        return out, {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError(f"a dict returned by the loss function must contain 'loss'; keys: {sorted(out)}")
        aux = {k: v.detach() for k, v in out.items() if k != "loss" and isinstance(v, Tensor) and v.numel() == 1}
        return out["loss"], aux
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor):
        return out[0], dict(out[1])
    raise TypeError(
        f"the loss function must return a scalar tensor, a dict with 'loss', or (loss, aux_dict); got {type(out)}"
    )


class Objective(nn.Module):
    """Wraps the user's module so that ``functional_call`` can run ``loss_fn(module, batch)`` on swapped weights."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux = _normalise_output(self._loss_fn(self.inner, batch))
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        return loss, aux


class _DirectSwap:
    """Put tensors in place of a module's parameters and buffers by writing its modules' ``_parameters`` /
    ``_buffers`` entries, and put the originals back: what ``functional_call`` does, without its per-call
    bookkeeping (a measurable share of a small CNN's forward; bench/RESULTS.md). Every alias of a tied tensor is
    swapped.

    Only for modules whose classes all keep ``nn.Module.__setattr__``: a class that overrides it (RNNs keep a
    cache of their weights there) would not see the swap, so such modules go through ``functional_call``.
    torchmetrics' ``Metric`` is the exception: its override only refuses to change some constant attributes.
    """

    def __init__(self, module: nn.Module) -> None:
        self.slots: dict[str, list[tuple[dict, str]]] = {}
        for kind, named in (("_parameters", module.named_parameters), ("_buffers", module.named_buffers)):
            canonical: dict[int, str] = {}
            for name, t in named(remove_duplicate=False):
                if t is None:
                    continue
                key = canonical.setdefault(id(t), name)  # the first name is the one named_*() reports
                prefix, _, attr = name.rpartition(".")
                owner = module.get_submodule(prefix)
                self.slots.setdefault(key, []).append((owner.__dict__[kind], attr))

    @staticmethod
    def applicable(module: nn.Module) -> bool:
        return not _setattr_overriders(module)

    def swap(self, *groups: dict[str, Tensor]) -> list[tuple[dict, str, Any]]:
        saved = []
        for group in groups:
            for name, t in group.items():
                for table, attr in self.slots[name]:
                    saved.append((table, attr, table[attr]))
                    table[attr] = t
        return saved

    @staticmethod
    def restore(saved: list[tuple[dict, str, Any]]) -> None:
        for table, attr, old in reversed(saved):
            table[attr] = old


class _ExecutorBase:
    name = "base"

    def __init__(self, module: nn.Module, loss_fn: LossFn, param_layout: ParamLayout, buffer_layout: ParamLayout):
        self.objective = Objective(module, loss_fn)
        self.param_layout = param_layout
        self.buffer_layout = buffer_layout
        # Non-float buffers (BatchNorm's num_batches_tracked) are shared, not per device: every device of a step
        # sees the same value, and the template keeps the value after one step (identical for both executors).
        self._int_buffers = {
            n: b for n, b in module.named_buffers() if b is not None and not b.is_floating_point()
        }

    @staticmethod
    def _named(*groups: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ``functional_call`` mapping of the wrapped module: parameters, float buffers, integer buffers."""
        return {"inner." + k: v for group in groups for k, v in group.items()}

    def _int_copies(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._int_buffers.items()}

    @torch.no_grad()
    def _store_ints(self, ints: dict[str, Tensor]) -> None:
        for k, v in ints.items():
            self._int_buffers[k].copy_(v)

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any, loss_scale: float = 1.0
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Gradients of ``loss_scale`` x every device's loss (the unscaled losses are returned)."""
        raise NotImplementedError


class VmapExecutor(_ExecutorBase):
    name = "vmap"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        def f(pars: dict[str, Tensor], bufs: dict[str, Tensor], ints: dict[str, Tensor], batch: Any):
            return torch.func.functional_call(self.objective, self._named(pars, bufs, ints), (batch,))

        self._fn = torch.func.vmap(f, in_dims=(0, 0, None, 0), randomness="different")
        self._guard = StepGuard(self.objective.inner)

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any, loss_scale: float = 1.0
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        # The per-device losses are independent, so d(sum_i loss_i)/d params[i] is device i's own gradient.
        # Reverse-mode autograd through the vmapped forward (instead of vmap(grad(...))) keeps BatchNorm's
        # in-place running-statistics updates, which torch.func.grad transforms silently drop. The float
        # buffers go in as contiguous per-name copies (in-place updates of strided views are lost under vmap)
        # and are written back afterwards.
        ints = self._int_copies()
        views = self.buffer_layout.views(buffers)
        bufs = {k: v.clone() for k, v in views.items()}
        # One autograd leaf per parameter (views of the stack, no copy). Differentiating with respect to the
        # whole [N_tot, P] stack instead would make every per-parameter slice's backward materialise a full
        # [N_tot, P] zero tensor and add into it (most of an MLP step; bench/RESULTS.md).
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.param_layout.views(params).items()}
        with torch.enable_grad():
            with self._guard:  # raises before any effect of an unbatchable step is kept
                losses, aux = self._fn(leaves, bufs, ints, batch)
            total = losses.sum() if loss_scale == 1.0 else (losses * loss_scale).sum()
            parts = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        grads = list(parts)  # per parameter, in layout order: the device optimiser takes them as they are
        with torch.no_grad():
            for k, v in views.items():
                v.copy_(bufs[k])
        self._store_ints(ints)
        return grads, losses.detach(), {k: v.detach() for k, v in aux.items()}


class LoopExecutor(_ExecutorBase):
    """Walks the device rows with ordinary autograd.

    On CPU the rows are shared by ``threads`` worker threads (default 2; never more than torch's intra-op thread
    count, so ``torch.set_num_threads(1)`` means a plain loop), each using an equal share of the intra-op threads.
    The forward passes still run one at a time in row order, under a turn-taking lock, so everything a forward
    does that is order-dependent (dropout masks from torch's global generator, BatchNorm statistics, torchmetrics
    states, ``self.log``) happens exactly as in a plain loop; a backward pass and its gradient copy (about half of
    a LeNet step) overlaps with the next forward. Since the forwards form a chain, more than two workers do not
    help (bench/RESULTS.md compares one, two and three workers). Autocast (mixed precision) is thread-local, so
    under autocast the loop runs in the calling thread only.

    ``forwards="concurrent"``: the workers take the next row as they become free and run its forward on their own
    copy of the module (:func:`_module_copy`: new parameter, buffer and submodule tables, everything else shared),
    so no forward waits for another and a worker that loses its core to another process holds no one up. The
    numbers are those of the ordered loop whenever a row's step does not depend on the others; what would break
    that is refused, not worked around. Random draws: with per-device streams (``row_seeds``, the engine's
    ``device_rng="stream"``) every row draws from its own generator (:class:`~.row_streams.RowStream`: the
    dropouts and every draw that takes a generator), giving the ordered loop's masks; a draw from torch's global
    generator (every draw under ``device_rng="global"``) raises after the call. A torchmetrics update raises
    before it touches the metric, and a module attribute assigned by the step raises after the call (which row's
    value would stay?); a step that fails these checks leaves no state behind in the module. What cannot be
    checked is the user's promise: no other Python state shared between the rows' steps (a list appended to in
    ``training_step`` would get the rows in a racing order). On CUDA, where the loop runs in one thread, the two
    modes are the same loop.
    """

    name = "loop"

    def __init__(self, *args: Any, threads: int | None = None, forwards: str = "ordered", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        self.threads = threads
        self.forwards = checks.choice(forwards, "forwards", FORWARDS)
        # with per-device random streams (the engine's device_rng="stream"): the seed of every row of the next
        # call, set before each forward so that the draws do not depend on which rows a call holds
        self.row_seeds: list[int] | None = None
        inner = self.objective.inner
        self._swap = _DirectSwap(inner) if _DirectSwap.applicable(inner) else None
        if forwards == "concurrent":
            _check_concurrent(inner)

    def _workers(self, params: Tensor) -> int:
        if params.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return 1
        return max(1, min(self.threads or 2, torch.get_num_threads(), params.shape[0]))

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any, loss_scale: float = 1.0
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        rows = params.shape[0]
        grads = torch.empty_like(params)
        losses = torch.empty(rows, dtype=torch.float32, device=params.device)
        aux_rows: list[dict[str, Tensor]] = [{} for _ in range(rows)]
        last_ints: list[dict[str, Tensor]] = [{}]

        seeds, self.row_seeds = self.row_seeds, None
        concurrent = self.forwards == "concurrent" and params.device.type == "cpu"
        workers = self._workers(params)
        streams: list[torch.Generator | None] = [None]  # concurrent: the last row's generator, once it has run
        if concurrent:  # copies made per call: they must see what was set on the module between steps
            copies = [_module_copy(self.objective) for _ in range(workers)]
            swaps = [_DirectSwap(c.inner) for c in copies]
            guards = [StepGuard(c.inner, ConcurrentStepError, "every row would update its states at once, in a "
                                "racing order") for c in copies]
            rng = torch.get_rng_state()
            worker_of = threading.local()

        def forward(i: int) -> tuple[list[Tensor], Tensor]:
            stream = contextlib.nullcontext()
            if seeds is not None and concurrent:
                generator = torch.Generator().manual_seed(seeds[i])
                stream = RowStream(generator)
                if i == rows - 1:
                    streams[0] = generator
            elif seeds is not None:
                _seed_row(seeds[i], params.device)
            # one leaf per parameter, each a view of row i of the stacked buffer (no copies)
            leaves = [v.detach().requires_grad_(True) for v in self.param_layout.views(params[i]).values()]
            batch_i = tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
            ints = self._int_copies()
            pars = dict(zip(self.param_layout.names, leaves))
            objective, swap = self.objective, self._swap
            if concurrent:
                k = getattr(worker_of, "k", 0)
                objective, swap = copies[k], swaps[k]
            with torch.enable_grad(), stream:
                if swap is not None:
                    saved = swap.swap(pars, self.buffer_layout.views(buffers[i]), ints)
                    try:
                        loss, aux = objective(batch_i)
                    finally:
                        swap.restore(saved)
                else:
                    named = self._named(pars, self.buffer_layout.views(buffers[i]), ints)
                    loss, aux = torch.func.functional_call(objective, named, (batch_i,))
            losses[i] = loss.detach()
            aux_rows[i] = {k: v.detach().reshape(()) for k, v in aux.items()}
            if i == rows - 1:
                last_ints[0] = ints
            return leaves, loss

        def backward(i: int, leaves: list[Tensor], loss: Tensor) -> None:
            parts = torch.autograd.grad(loss if loss_scale == 1.0 else loss * loss_scale, leaves, allow_unused=True)
            for g, view in zip(parts, self.param_layout.views(grads[i]).values()):
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)

        if concurrent:
            _concurrent(rows, workers, guards, worker_of, rng, forward, backward)
            if streams[0] is not None:  # where the ordered loop leaves torch's generator: after the last row's draws
                torch.set_rng_state(streams[0].get_state())
        elif workers == 1:
            for i in range(rows):
                backward(i, *forward(i))
        else:
            turn_taking(rows, workers, forward, backward)
        self._store_ints(last_ints[0])
        names = list(aux_rows[0]) if rows else []
        for i, a in enumerate(aux_rows):
            if list(a) != names:
                raise ValueError(f"device {i} logged {sorted(a)} but device 0 logged {sorted(names)}: every device "
                                 f"step must return the same auxiliary values")
        return grads, losses, {k: torch.stack([a[k] for a in aux_rows]) for k in names}


def _module_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose every submodule is a new object with its own ``__dict__`` and its own parameter,
    buffer and submodule tables, holding the same tensors and sharing every other attribute's value: a worker can
    swap its row's tensors into it while another worker runs the original. (``copy.copy`` is not used: classes
    such as LightningModule leave attributes, the trainer, out of their pickling state.)"""
    made: dict[int, nn.Module] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) not in made:
            c = made[id(m)] = object.__new__(type(m))
            c.__dict__.update(m.__dict__)
            c.__dict__["_parameters"] = dict(m._parameters)
            c.__dict__["_buffers"] = dict(m._buffers)
            c.__dict__["_modules"] = {k: None if v is None else copy_of(v) for k, v in m._modules.items()}
        return made[id(m)]

    return copy_of(module)


def _setattr_overriders(module: nn.Module) -> list[str]:
    """The classes among ``module``'s submodules that override ``nn.Module.__setattr__`` (Metric's aside)."""
    metric = metric_class()
    return [type(m).__name__ for m in module.modules()
            if type(m).__setattr__ is not nn.Module.__setattr__ and not (metric and isinstance(m, metric))]


def _seed_row(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the draws of a row on ``device``. On CPU only torch's CPU generator, which is
    all a CPU row draws from: ``torch.manual_seed`` also queues the seeding of every accelerator's generators, which
    made it about 100x slower than seeding the CPU generator alone (bench/RESULTS.md), once per row and step,
    inside the ordered forwards' chain."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _check_concurrent(module: nn.Module) -> None:
    """What ``forwards="concurrent"`` refuses at construction (LoopExecutor's docstring)."""
    overriders = _setattr_overriders(module)
    if overriders:
        raise ValueError(f"forwards='concurrent' needs modules that keep nn.Module.__setattr__, but {overriders[0]} "
                         f"overrides it (it keeps its own view of its weights): use forwards='ordered'")


def _concurrent(rows: int, workers: int, guards: list[StepGuard], worker_of: threading.local, rng: Tensor,
                forward: Callable, backward: Callable) -> None:
    """The rows first-free over the workers, worker k on its module copy inside ``guards[k]``; then the checks that
    the rows did not depend on each other (LoopExecutor's docstring)."""
    try:
        for g in guards:
            g.__enter__()
        if workers == 1:
            for i in range(rows):
                backward(i, *forward(i))
        else:
            first_free(rows, workers, lambda k: setattr(worker_of, "k", k), forward, backward)
    except ConcurrentStepError as err:
        raise ConcurrentStepError(f"forwards='concurrent': {err}: use forwards='ordered'") from None
    finally:
        errors = []
        for g in guards:
            try:
                g.__exit__(None, None, None)
            except ConcurrentStepError as err:
                errors.append(err)
    if errors:
        raise ConcurrentStepError(f"forwards='concurrent': {errors[0]}, whose value would depend on which row ran "
                                  f"last: use forwards='ordered'")
    if not torch.equal(rng, torch.get_rng_state()):
        raise ConcurrentStepError(
            "forwards='concurrent': the training step drew random numbers from torch's global generator, which the "
            "rows would draw in a racing order: with device_rng='global' every draw does (use device_rng='stream', "
            "which gives every row its own stream), with 'stream' a draw that takes no generator and is not a "
            "dropout (lightning_qmlhfl.simulation.row_streams) does; else use forwards='ordered'")


class GuardedVmapExecutor:
    """The vmap executor (whose forward runs inside a :class:`StepGuard`) with the loop executor as fallback
    (``executor="auto"``).

    What cannot run under vmap (torchmetrics updates, ``.item()``, data-dependent Python control flow, assignments
    to module attributes) is detected at the step where it first happens, before any of its effects remain: the
    RNG state, float buffers, integer buffers and module attributes are put back. With a fallback, that step and
    every later one run on the loop executor, after one warning that says why; without one (an explicit
    ``executor="vmap"``), :class:`VmapUnsupportedError` says why and what to use instead.
    """

    def __init__(self, vmap: "VmapExecutor", fallback: "LoopExecutor | None") -> None:
        self.vmap, self.fallback = vmap, fallback
        self.current: _ExecutorBase = vmap
        self.fallback_reason: str | None = None

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def row_seeds(self) -> list[int] | None:
        return None if self.fallback is None else self.fallback.row_seeds

    @row_seeds.setter
    def row_seeds(self, seeds: list[int] | None) -> None:
        """Per-row seeds reach the loop (vmap draws its masks for the whole call from torch's generator)."""
        if self.fallback is not None:
            self.fallback.row_seeds = seeds

    def __call__(self, params: Tensor, buffers: Tensor, batch: Any, loss_scale: float = 1.0):
        if self.current is not self.vmap:
            return self.current(params, buffers, batch, loss_scale)
        devices = [params.device.index or 0] if params.device.type == "cuda" else []
        cpu_rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]
        try:
            return self.vmap(params, buffers, batch, loss_scale)
        except Exception as err:  # noqa: BLE001 - any failure inside the vmapped user code
            reason = f"{type(err).__name__}: {err}"
            if self.fallback is None:
                raise VmapUnsupportedError(
                    f"executor='vmap' cannot run this training step under torch.func.vmap ({reason}). Use "
                    f"executor='loop' (or 'auto', which falls back to the loop by itself)"
                ) from err
            torch.set_rng_state(cpu_rng)
            for d, state in zip(devices, cuda_rng):
                torch.cuda.set_rng_state(state, d)
            out = self.fallback(params, buffers, batch, loss_scale)  # a genuine error of the user's code raises here
            self.current, self.fallback_reason = self.fallback, reason
            warnings.warn(
                f"executor='auto': the training step cannot run under torch.func.vmap ({reason}); running it on "
                f"the loop executor from now on (same numbers up to float rounding; pass executor='loop' to skip "
                f"this check)", RuntimeWarning, stacklevel=2)
            return out


def choose_executor(module: nn.Module, device: torch.device) -> str:
    """The documented automatic rule: ``loop`` for modules with convolutions on CPU and for recurrent modules
    (LSTM/GRU/RNN: torch has no vmap rule for them), ``vmap`` otherwise (with the loop as fallback for steps vmap
    cannot run, :class:`GuardedVmapExecutor`).

    On a CPU vmap is faster than the loop for MLPs but slower for convolutional networks (their convolutions become
    grouped convolutions under vmap); bench/engine.py measures both (bench/RESULTS.md). On CUDA vmap is used
    throughout.
    """
    if any(isinstance(m, nn.RNNBase) for m in module.modules()):
        return "loop"
    if device.type != "cpu":
        return "vmap"
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    has_conv = any(isinstance(m, convs) for m in module.modules())
    return "loop" if has_conv else "vmap"


def make_executor(
    name: str, module: nn.Module, loss_fn: LossFn, param_layout: ParamLayout, buffer_layout: ParamLayout,
    device: torch.device, forwards: str = "ordered",
) -> "_ExecutorBase | GuardedVmapExecutor":
    if name not in ("auto", "vmap", "loop"):
        raise ValueError(f"executor must be 'auto', 'vmap' or 'loop', got {name!r}")
    chosen = choose_executor(module, device) if name == "auto" else name
    if chosen == "loop":
        return LoopExecutor(module, loss_fn, param_layout, buffer_layout, forwards=forwards)
    fallback = LoopExecutor(module, loss_fn, param_layout, buffer_layout, forwards=forwards) if name == "auto" else None
    return GuardedVmapExecutor(VmapExecutor(module, loss_fn, param_layout, buffer_layout), fallback)
