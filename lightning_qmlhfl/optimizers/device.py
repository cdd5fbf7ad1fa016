"""Per-device optimisers on the stacked device buffer (Eq. 3 and its element-wise extensions).

Plain SGD is the paper's optimiser. Element-wise optimisers (SGD with momentum/Nesterov/weight decay, Adam,
AdamW, RMSprop, Adagrad) treat every coordinate independently, so running one torch optimiser over the whole
stacked tensor [N_tot, P] is exactly running one optimiser per device: the state tensors (momentum buffers,
Adam moments) have shape [N_tot, P] and row i is device i's own state. This project's choice (docs/algorithm.md#device-optimizers): that per-device state is kept by the device across aggregations and is never aggregated or reset.

Optimisers that couple coordinates (LBFGS, Adafactor-like factorised ones, anything unknown) are rejected.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ELEMENTWISE_OPTIMIZERS", "DeviceOptimizer", "check_optimizer_class", "trainable_parameters"]

ELEMENTWISE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def check_optimizer_class(cls: Any) -> type[torch.optim.Optimizer]:
    """Return the optimiser class if it is one of the supported element-wise ones, else raise ValueError."""
    if isinstance(cls, str):
        key = cls.lower()
        if key not in ELEMENTWISE_OPTIMIZERS:
            raise ValueError(f"optimizer {cls!r} is not supported; allowed: {sorted(ELEMENTWISE_OPTIMIZERS)}")
        return ELEMENTWISE_OPTIMIZERS[key]
    if isinstance(cls, torch.optim.Optimizer):
        cls = type(cls)
    if cls not in ELEMENTWISE_OPTIMIZERS.values():
        allowed = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS.values())
        name = getattr(cls, "__name__", repr(cls))
        raise ValueError(
            f"optimizer {name} is not supported: QMLHFL runs one optimiser per simulated device on stacked "
            f"weights, which is exact only for element-wise optimisers ({allowed})"
        )
    return cls


# Keys of a torch param_group that describe how, not what, to compute; dropped when rebuilding the optimiser.
_FORBIDDEN = {"params", "fused", "capturable", "differentiable", "foreach"}
CLIP_ALGORITHMS = ("norm", "value")


def check_hyper(hyper: dict[str, Any], where: str) -> dict[str, Any]:
    """A parameter group's hyperparameters without the keys that say how to compute; lr must be a number >= 0."""
    hyper = {k: v for k, v in dict(hyper).items() if k not in _FORBIDDEN}
    if "lr" not in hyper:
        raise ValueError(f"{where} needs a learning rate 'lr' (mu of Eq. 3)")
    lr = hyper["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = hyper["lr"] = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"{where}: learning rate must be a number >= 0, got {lr!r}")
    return hyper


def check_clip(clip: tuple[str, float] | None) -> tuple[str, float] | None:
    """``(algorithm, value)`` of per-device gradient clipping, or None."""
    if clip is None:
        return None
    algorithm, value = clip
    if algorithm not in CLIP_ALGORITHMS:
        raise ValueError(f"gradient clipping algorithm must be 'norm' or 'value', got {algorithm!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"gradient clipping value must be a number > 0, got {value!r}")
    return algorithm, float(value)


class DeviceOptimizer:
    """One torch optimiser over the device stack; ``step(grads)`` applies Eq. 3 (or its extension) to all devices.

    ``params`` must be the engine's device parameter stack [N_tot, P] itself (updated in place, identity kept).
    With ``layout`` (the stack's :class:`~lightning_qmlhfl.simulation.stacked.ParamLayout`) the optimiser runs over one
    [N_tot, *shape] view per model parameter instead of the whole stack, so ``step`` can take the
    per-parameter gradients as the executor produced them, without concatenating them into [N_tot, P] first
    (one full-size copy and allocation per step less). The arithmetic is the same element by element.

    ``groups``: parameter groups with their own hyperparameters, as ``[{"params": [names], "lr": ..., ...}]``
    (names of ``layout``'s slots; every slot in exactly one group); default one group of everything with ``hyper``.
    Each device runs every group's rule on its own rows, as one device of plain training would.

    ``clip``: ``("norm", max_norm)`` or ``("value", clip_value)``: each device's own gradient is clipped before its
    update, as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` would clip one model's (norm: the 2-norm
    over all of the device's trained parameters).
    """

    def __init__(self, params: Tensor, cls: Any = torch.optim.SGD, hyper: dict[str, Any] | None = None,
                 layout: Any = None, groups: Sequence[dict[str, Any]] | None = None,
                 clip: tuple[str, float] | None = None) -> None:
        self.cls = check_optimizer_class(cls)
        self.params = params
        self.clip = check_clip(clip)
        self.layout = layout if layout is not None and layout.slots else None
        if self.layout is None:
            if groups is not None and len(groups) > 1:
                raise ValueError("parameter groups need the stack's layout")
            self.columns = [params]
            hypers = [check_hyper(groups[0] if groups else (hyper or {"lr": 0.01}), "the optimiser")]
            spec = [{"params": self.columns, **hypers[0]}]
        else:
            if sum(s.numel for s in self.layout.slots) != params.shape[1]:
                raise ValueError("the layout does not cover the parameter stack")
            # [N_tot, *shape] views: gradients are used with whatever strides autograd gave them (no reshape copy)
            views = self.layout.views(params)
            self.columns = list(views.values())
            if groups is None:
                groups = [{"params": list(views), **(hyper or {"lr": 0.01})}]
            seen: dict[str, int] = {}
            spec = []
            for i, g in enumerate(groups):
                names = list(g["params"])
                for name in names:
                    if name not in views:
                        raise ValueError(f"parameter group {i} names {name!r}, which is not a trained parameter")
                    if name in seen:
                        raise ValueError(f"parameter {name!r} is in groups {seen[name]} and {i}")
                    seen[name] = i
                spec.append({"params": [views[n] for n in names],
                             **check_hyper({k: v for k, v in g.items() if k != "params"}, f"parameter group {i}")})
            missing = [n for n in views if n not in seen]
            if missing:
                raise ValueError(f"trained parameters {missing} are in no parameter group")
        self.optimizer = self.cls(spec)
        # how many steps each device has taken (they differ under partial participation)
        self.device_steps = torch.zeros(params.shape[0], dtype=torch.int64)
        # a term added to the gradients after unscaling, before clipping (a local solver's correction):
        # f(grads per column, rows or None for all, their parameters [rows, P]); None: nothing added
        self.grad_hook: Callable[[list[Tensor | None], Tensor | None, Tensor], None] | None = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def set_hyperparameters(self, groups: Sequence[dict[str, Any]]) -> None:
        """Copy the current hyperparameters of each group (e.g. a scheduler's lr, momentum or betas) in place."""
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(
                f"the optimiser now has {len(groups)} parameter groups, but the devices were built with "
                f"{len(self.optimizer.param_groups)}: the set of trained parameters and its groups are fixed when "
                f"training starts"
            )
        for mine, theirs in zip(self.optimizer.param_groups, groups):
            for k, v in theirs.items():
                if k not in _FORBIDDEN:
                    mine[k] = v

    @torch.no_grad()
    def _clip_(self, grads: list[Tensor]) -> None:
        algorithm, value = self.clip  # type: ignore[misc]
        if algorithm == "value":
            for g in grads:
                if g is not None:
                    g.clamp_(-value, value)
            return
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        rows = grads[0].shape[0]  # every device (step) or the stepping ones (step_rows)
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(rows, -1), dim=1) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)
        coef = (value / (total + 1e-6)).clamp_(max=1.0)  # as torch.nn.utils.clip_grad_norm_, per device
        for g in grads:
            g.mul_(coef.view(rows, *([1] * (g.dim() - 1))).to(g.dtype))

    def _parts(self, grads: Tensor | Sequence[Tensor | None], rows: int) -> list[Tensor | None]:
        if isinstance(grads, Tensor):
            if grads.shape != (rows, self.params.shape[1]):
                raise ValueError(f"gradient shape {tuple(grads.shape)} != ({rows}, {self.params.shape[1]})")
            return [grads] if self.layout is None else list(self.layout.views(grads).values())
        parts = list(grads)
        if len(parts) != len(self.columns):
            raise ValueError(f"got {len(parts)} gradients for {len(self.columns)} parameters")
        return parts

    @torch.no_grad()
    def step(self, grads: Tensor | Sequence[Tensor | None], scaler: Any = None) -> None:
        """``grads``: the [N_tot, P] gradient stack, or one gradient per model parameter ([N_tot, *shape] each,
        in layout order; ``None`` = zero). With ``scaler`` (a ``torch.amp.GradScaler`` whose scale multiplied the
        losses) the gradients are unscaled first and the step is skipped when any is not finite, as in plain mixed
        precision training."""
        parts = self._parts(grads, self.params.shape[0])
        counts = self.device_steps
        if not bool((counts == counts[0]).all()):  # some devices stepped more often (partial participation)
            self.step_rows(torch.arange(self.params.shape[0], device=self.params.device), self.params, parts,
                           scaler)
            return
        self._sync_step_counts(int(counts[0]))
        for col, g in zip(self.columns, parts):
            col.grad = torch.zeros_like(col) if g is None else g.to(col.dtype)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_hook is not None:
            self.grad_hook([c.grad for c in self.columns], None, self.params)
        if self.clip is not None:
            self._clip_([c.grad for c in self.columns])
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        for col in self.columns:
            col.grad = None
        self.device_steps += 1

    def _sync_step_counts(self, count: int) -> None:
        """Before a step of every device with equal counts: the optimizer's scalar ``step`` states say ``count``."""
        for col in self.columns:
            st = self.optimizer.state.get(col)
            if st and isinstance(st.get("step"), Tensor) and int(st["step"]) != count:
                st["step"] = torch.tensor(float(count), dtype=st["step"].dtype, device=st["step"].device)

    @torch.no_grad()
    def step_rows(self, rows: Tensor, params_c: Tensor, grads: Tensor | Sequence[Tensor | None],
                  scaler: Any = None) -> None:
        """The step of the devices ``rows`` only (int64 [A]), on ``params_c`` = their rows [A, P] (updated in
        place; the caller writes them back) with their gradients (``grads`` as in :meth:`step`, A rows).

        Every device runs exactly its own optimizer: devices are stepped in groups with the same number of past
        steps (a torch optimizer keeps one ``step`` count per parameter, which Adam's bias correction and
        Adagrad's decay read), each group with its rows of the optimizer state; the state of the other devices is
        not touched. With period-wise participation the groups are few."""
        if scaler is not None:
            raise ValueError("16-mixed precision (a GradScaler) with partial participation is not supported: use "
                             "precision='bf16-mixed' or '32-true'")
        parts = self._parts(grads, rows.numel())
        parts = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g.to(p.dtype)
                 for g, p in zip(parts, self.layout.views(params_c).values() if self.layout else [params_c])]
        if self.grad_hook is not None:
            self.grad_hook(parts, rows, params_c)
        if self.clip is not None:
            self._clip_(parts)
        rows_cpu = rows.cpu()
        counts = self._step_groups(self.device_steps[rows_cpu])
        for c in torch.unique(counts).tolist():
            sel = torch.nonzero(counts == c).flatten()
            whole = sel.numel() == rows.numel()  # one group (the usual case): step params_c in place, no copies
            sel_dev = sel.to(params_c.device)
            g_rows = rows[sel_dev]
            block = params_c if whole else params_c.index_select(0, sel_dev)
            views = list(self.layout.views(block).values()) if self.layout else [block]
            by_col = dict(zip(map(id, self.columns), views))
            spec = [{**{k: v for k, v in grp.items() if k != "params"},
                     "params": [by_col[id(col)] for col in grp["params"]]} for grp in self.optimizer.param_groups]
            temp = self.cls(spec)
            for col, view, g in zip(self.columns, views, parts):
                view.grad = g if whole else g.index_select(0, sel_dev)
                st = self.optimizer.state.get(col)
                if st and c > 0:
                    temp.state[view] = {k: (v.index_select(0, g_rows) if isinstance(v, Tensor) and v.dim() >= 1
                                            and v.shape[0] == self.params.shape[0] else
                                            torch.tensor(float(c), dtype=v.dtype, device=v.device) if k == "step"
                                            else v) for k, v in st.items()}
            temp.step()
            for col, view in zip(self.columns, views):
                main = self.optimizer.state.setdefault(col, {})
                for k, v in temp.state[view].items():
                    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == sel.numel() and k != "step":
                        if k not in main or not isinstance(main[k], Tensor) or main[k].shape[1:] != v.shape[1:]:
                            main[k] = torch.zeros((self.params.shape[0], *v.shape[1:]), dtype=v.dtype,
                                                  device=v.device)
                        main[k][g_rows] = v
                    elif k == "step":
                        main[k] = v.clone()
                    elif k not in main:
                        main[k] = v
            if not whole:
                params_c[sel_dev] = block
        self.device_steps[rows_cpu] += 1

    def _step_groups(self, counts: Tensor) -> Tensor:
        """The key by which :meth:`step_rows` groups devices: their step counts where the optimizer's state keeps
        a ``step`` (Adam, Adagrad, ...), else only whether they have stepped before (SGD's momentum buffer starts
        differently), else nothing (no per-row state: one group). Grouping never changes a number (the updates are
        elementwise); fewer groups copy less."""
        states = [st for st in self.optimizer.state.values() if st]
        if any("step" in st for st in states):
            return counts
        return counts.clamp(max=1) if states else torch.zeros_like(counts)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (copies: training on does not change it) and every device's step count."""
        sd = self.optimizer.state_dict()
        sd["state"] = {pid: {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                       for pid, st in sd["state"].items()}
        return {**sd, "device_steps": self.device_steps.clone()}

    def load_state_dict(self, sd: dict[str, Any], steps_taken: int | None = None) -> None:
        """``device_steps`` in ``sd`` may be one count for every device (``steps_taken`` gives it when absent)."""
        sd = dict(sd)
        steps = sd.pop("device_steps", steps_taken)
        self.optimizer.load_state_dict(sd)
        if isinstance(steps, Tensor):
            self.device_steps.copy_(steps)
        elif steps is not None:  # one count for every device (checkpoints from before per-device counts)
            self.device_steps.fill_(int(steps))


def trainable_parameters(module: nn.Module, param_groups: Sequence[dict[str, Any]] | None
               ) -> tuple[set[str], list[dict[str, Any]] | None]:
    """The trained parameters' names and the optimizer's groups restricted to them (parameters in no group and
    those with ``requires_grad=False`` are frozen)."""
    requires = {n for n, p in module.named_parameters() if p.requires_grad}
    if param_groups is None:
        return requires, None
    named = {n for g in param_groups for n in g["params"]}
    unknown = sorted(named - {n for n, _ in module.named_parameters()})
    if unknown:
        raise ValueError(f"param_groups name parameters the module does not have: {unknown}")
    trainable = named & requires
    groups = [{**g, "params": [n for n in g["params"] if n in trainable]} for g in param_groups]
    return trainable, [g for g in groups if g["params"]]
