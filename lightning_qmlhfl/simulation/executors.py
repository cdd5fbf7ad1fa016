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

import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .stacked import ParamLayout

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
        return all(type(m).__setattr__ is nn.Module.__setattr__ for m in module.modules())

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
        self._guard = _VmapGuard(self.objective.inner)

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
        # [N_tot, P] zero tensor and add into it: measured 64% of an MLP step on a 2-core CPU.
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
    states, ``self.log``) happens exactly as in a plain loop; a backward pass and its gradient copy (about 55% of
    a LeNet step) overlaps with the next forward. Since the forwards form a chain, more than two workers do not
    help (bench/RESULTS.md compares one, two and three workers). Autocast (mixed precision) is thread-local, so
    under autocast the loop runs in the calling thread only.
    """

    name = "loop"

    def __init__(self, *args: Any, threads: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        self.threads = threads
        # with per-device random streams (the engine's device_rng="stream"): the seed of every row of the next
        # call, set before each forward so that the draws do not depend on which rows a call holds
        self.row_seeds: list[int] | None = None
        inner = self.objective.inner
        self._swap = _DirectSwap(inner) if _DirectSwap.applicable(inner) else None

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

        def forward(i: int) -> tuple[list[Tensor], Tensor]:
            if seeds is not None:
                torch.manual_seed(seeds[i])
            # one leaf per parameter, each a view of row i of the stacked buffer (no copies)
            leaves = [v.detach().requires_grad_(True) for v in self.param_layout.views(params[i]).values()]
            batch_i = tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
            ints = self._int_copies()
            pars = dict(zip(self.param_layout.names, leaves))
            with torch.enable_grad():
                if self._swap is not None:
                    saved = self._swap.swap(pars, self.buffer_layout.views(buffers[i]), ints)
                    try:
                        loss, aux = self.objective(batch_i)
                    finally:
                        self._swap.restore(saved)
                else:
                    named = self._named(pars, self.buffer_layout.views(buffers[i]), ints)
                    loss, aux = torch.func.functional_call(self.objective, named, (batch_i,))
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

        workers = self._workers(params)
        if workers == 1:
            for i in range(rows):
                backward(i, *forward(i))
        else:
            _turn_taking(rows, workers, forward, backward)
        self._store_ints(last_ints[0])
        names = list(aux_rows[0]) if rows else []
        for i, a in enumerate(aux_rows):
            if list(a) != names:
                raise ValueError(f"device {i} logged {sorted(a)} but device 0 logged {sorted(names)}: every device "
                                 f"step must return the same auxiliary values")
        return grads, losses, {k: torch.stack([a[k] for a in aux_rows]) for k in names}


_POOL: ThreadPoolExecutor | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The loop executor's worker threads (torch operators and autograd release the GIL, so they run on separate
    cores), created once and grown when more workers are asked for."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmlhfl-loop")
    return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL
    _POOL = None  # a forked child (a DataLoader worker) has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _turn_taking(rows: int, workers: int, forward: Callable, backward: Callable) -> None:
    """Rows i = k, k + workers, ... on worker k; forward(i) starts only after forward(i - 1) has returned (so the
    forwards run in row order), backward(i, *forward(i)) overlaps with the other workers' forwards. The first
    exception stops every worker and is re-raised here."""
    cond = threading.Condition()
    turn = [0]
    failed = [False]
    intra_op = torch.get_num_threads()

    def work(k: int) -> None:
        # An equal share of the intra-op threads per worker. With torch's default each worker would start its own
        # OpenMP team as wide as the machine, and the oversubscribed teams made the step 2-3x slower than the
        # plain loop (measured, 2 workers on 2 cores). The count is per thread; it is put back before returning.
        torch.set_num_threads(max(1, intra_op // workers))
        try:
            for i in range(k, rows, workers):
                with cond:
                    cond.wait_for(lambda: turn[0] == i or failed[0])
                    if failed[0]:
                        return
                out = forward(i)
                with cond:
                    turn[0] = i + 1
                    cond.notify_all()
                backward(i, *out)
        except BaseException:
            with cond:
                failed[0] = True
                cond.notify_all()
            raise
        finally:
            torch.set_num_threads(intra_op)

    futures = [_thread_pool(workers).submit(work, k) for k in range(workers)]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


class VmapUnsupportedError(RuntimeError):
    """The user's step cannot run under ``torch.func.vmap`` (``executor="vmap"`` was asked for explicitly)."""


def _metric_class() -> type | tuple:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return ()
    return Metric


def _refuse_metric(metric: nn.Module, *args: Any, **kwargs: Any) -> Any:
    raise VmapUnsupportedError(
        f"the step updates the torchmetrics {type(metric).__name__} (its states are plain tensors updated in place, "
        f"which vmap cannot batch)"
    )


class _VmapGuard:
    """Around one vmapped step: makes torchmetrics updates raise before they touch any state, records every module
    attribute the user's code assigns (a tensor stored on the module under vmap would be a batched tensor that
    escapes the transform) and puts all of them back. A step that assigned attributes raises VmapUnsupportedError
    on exit, after the restore, so that nothing of it survives."""

    def __init__(self, module: nn.Module) -> None:
        metric = _metric_class()
        self.modules = list(module.named_modules())
        self.metrics = [m for _, m in self.modules if metric and isinstance(m, metric)]

    def __enter__(self) -> "_VmapGuard":
        self._methods = []
        for m in self.metrics:
            for attr in ("forward", "update"):
                self._methods.append((m, attr, m.__dict__.get(attr, _MISSING)))
                m.__dict__[attr] = functools.partial(_refuse_metric, m)
        metric_ids = {id(m) for m in self.metrics}
        self._snapshot = [(name, m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                          for name, m in self.modules if id(m) not in metric_ids]
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        changed = []
        for name, m, d, params, bufs, mods in self._snapshot:
            for table, old, what in ((m.__dict__, d, ""), (m._parameters, params, " (parameter)"),
                                     (m._buffers, bufs, " (buffer)"), (m._modules, mods, " (submodule)")):
                if table.keys() == old.keys() and all(table[k] is v for k, v in old.items()):
                    continue
                keys = sorted(set(table) ^ set(old) | {k for k in set(table) & set(old) if table[k] is not old[k]})
                changed += [f"{name + '.' if name else ''}{k}{what}" for k in keys]
                table.clear()
                table.update(old)
        for m, attr, old in self._methods:
            if old is _MISSING:
                m.__dict__.pop(attr, None)
            else:
                m.__dict__[attr] = old
        if changed and exc_type is None:
            raise VmapUnsupportedError(f"the step assigns module attribute(s) {changed}")


_MISSING = object()


class GuardedVmapExecutor:
    """The vmap executor (whose forward runs inside a :class:`_VmapGuard`) with the loop executor as fallback
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

    Measured on a 2-core CPU (bench/engine.py, 100 devices; bench/RESULTS.md): vmap is 2.2x the loop's speed for a
    784-200-10 MLP, but 0.70x for LeNet (its convolutions become grouped convolutions under vmap), and 0.6x for the
    225k-parameter CIFAR CNN (16 devices). On CUDA vmap is used throughout.
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
    device: torch.device,
) -> "_ExecutorBase | GuardedVmapExecutor":
    if name not in ("auto", "vmap", "loop"):
        raise ValueError(f"executor must be 'auto', 'vmap' or 'loop', got {name!r}")
    chosen = choose_executor(module, device) if name == "auto" else name
    if chosen == "loop":
        return LoopExecutor(module, loss_fn, param_layout, buffer_layout)
    fallback = LoopExecutor(module, loss_fn, param_layout, buffer_layout) if name == "auto" else None
    return GuardedVmapExecutor(VmapExecutor(module, loss_fn, param_layout, buffer_layout), fallback)
