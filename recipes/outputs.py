"""A run's results in its directory, as a Lightning callback (:class:`RunOutputs`):

- ``summary.json``: the final cloud model's and the best-on-validation model's test results, the selection
  (monitored metric, its best value and round), split sizes, per-device statistics, bits per layer against the
  32-bit baseline, simulated time, wall time, why the run stopped (``stop_reason``) and the resolved config;
- ``history.json``: one record per global round (:class:`~recipes.recorder.RunRecorder`);
- ``accuracy.png`` and ``local_accuracy.png`` (:mod:`recipes.plots`), logged as images to W&B.

Written at the end of fit (on rank 0), again after the module's own tests (``trainer.test``), and, when training
stops on a non-finite update (NaN/Inf), with what is known and the reason. Both JSON files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_qmlhfl.optimizers.local_solvers import LocalSGD
from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError
from lightning_qmlhfl.theory.measured import summarize
from recipes.files import write_json_atomic
from recipes.local_eval import device_summary
from recipes.plots import plot_device_accuracy, plot_history
from recipes.recorder import RunRecorder
from recipes.testing import TestEvaluation

__all__ = ["RunOutputs", "format_summary"]


def _theory_summary(config: Any, engine: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The constants the run measured (``theory=measure``; docs/algorithm.md#measured-constants), for
    ``python -m recipes.plan calibrate_from=RUN_DIR``; absent when they were not measured."""
    if config.theory is None or engine is None:
        return {}
    measured = summarize([{k[len("theory/"):]: v for k, v in r.items() if k.startswith("theory/")} for r in records],
                         [c.variance_bound(engine.num_params) for c in config.compressors])
    return {} if measured is None else {"theory": measured.to_dict()}


def _trust_summary(config: Any, engine: Any) -> dict[str, Any]:
    """Privacy, robust aggregation and attacks of the run (absent when off: summaries of earlier runs), with the
    final (epsilon, delta) guarantee."""
    out: dict[str, Any] = {}
    for key, values, off in (("privacy", config.privacy, lambda x: x.is_off), ("robust", config.robust,
                                                                                lambda x: x.is_mean),
                             ("attacks", config.attacks, lambda x: x.is_none)):
        if not all(off(x) for x in values):
            out[key] = [repr(x) for x in values]
    if "privacy" in out:
        stats = {} if engine is None else engine.privacy_stats()  # (inf, no noise: null)
        out.update({"dp_delta": config.dp_delta, **{k: None if v == float("inf") else v for k, v in stats.items()}})
    return out


class RunOutputs(Callback):
    """Writes ``summary.json``, ``history.json`` and the plots into ``dirpath`` (see the module docstring).

    Args:
        dirpath: the run directory.

    Attributes:
        context: set by the recipe before fit: ``config`` (the resolved config), ``labels`` (``dataset``, ``model``),
            ``participation`` and ``mobility`` (the objects given to the strategy).
        summary: the last summary written (None before).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.context: dict[str, Any] = {}
        self.summary: dict[str, Any] | None = None

    @staticmethod
    def of(callbacks: Any) -> "RunOutputs | None":
        """The :class:`RunOutputs` among ``callbacks`` (a list, or a Trainer), if there is one."""
        return next((cb for cb in getattr(callbacks, "callbacks", callbacks) if isinstance(cb, RunOutputs)), None)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.summary is not None:
            self.write(trainer, plots=False)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteUpdateError) and trainer.is_global_zero:
            self.write(trainer, stop_reason=f"{type(exception).__name__}: {exception}")
            print(format_summary(self.summary))

    def write(self, trainer: L.Trainer, stop_reason: str | None = None, plots: bool = True) -> dict[str, Any]:
        """Summarise and write ``summary.json`` / ``history.json`` (and the plots); returns the summary."""
        recorder = RunRecorder.of(trainer)
        self.summary = summarise(trainer, recorder, TestEvaluation.of(trainer), self.context, stop_reason)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dirpath / "summary.json", self.summary)
        write_json_atomic(self.dirpath / "history.json", recorder.records)
        if plots:
            title = f"{self.summary['name']}: {self.summary['compressors']}"
            plot_history(recorder.records, self.dirpath / "accuracy.png", title=title)
            plot_device_accuracy(recorder.records, self.dirpath / "local_accuracy.png",
                                 title=f"{self.summary['name']}: per-device accuracy on held-out local data")
            self._log_plots(trainer)
        return self.summary

    def _log_plots(self, trainer: L.Trainer) -> None:
        for lg in trainer.loggers:
            if type(lg).__name__ != "WandbLogger":
                continue
            for png in ("accuracy.png", "local_accuracy.png"):
                if (self.dirpath / png).is_file():
                    lg.log_image(key=f"plots/{png[:-4]}", images=[str(self.dirpath / png)], step=trainer.global_step)


def summarise(trainer: L.Trainer, recorder: RunRecorder, testing: TestEvaluation | None, context: Mapping[str, Any],
              stop_reason: str | None = None) -> dict[str, Any]:
    """The run's summary (see the module docstring)."""
    strategy = trainer.strategy
    e = strategy.engine
    dm = trainer.datamodule
    records = recorder.records
    config = dict(context.get("config") or {})
    labels = context.get("labels") or {}
    curve = [r["test_acc"] for r in records if "test_acc" in r]
    sizes = dm.sizes() if hasattr(dm, "sizes") else {}
    last_local = next((r for r in reversed(records) if "local_cloud_acc" in r), None)
    local: dict[str, Any] | None = None
    if last_local is not None:
        local = {"round": last_local["round"], "cloud": device_summary(last_local["local_cloud_acc"])}
        if last_local.get("local_personal_acc"):
            local["personalized"] = device_summary(last_local["local_personal_acc"])
    final = None if testing is None else testing.final
    best = None if testing is None else testing.best
    b = recorder.best
    monitor = recorder.monitor
    val_is_test = bool(getattr(dm, "validation_is_test", False))
    rounds = e.round if e is not None else 0
    out = {
        "name": config.get("name"),
        "dataset": labels.get("dataset"),
        "model": labels.get("model"),
        "num_params": None if e is None else e.num_params,
        "layers": strategy.hierarchy.num_layers,
        "devices": strategy.hierarchy.num_devices,
        "taus": list(strategy.taus),
        "compressors": [repr(q) for q in strategy.compressors],
        "server_optimizers": [repr(o) for o in strategy.server_optimizers],
        **({} if all(x == LocalSGD() for x in strategy.config.local_solvers)  # (absent: summaries of earlier runs)
           else {"local_solvers": [repr(x) for x in strategy.config.local_solvers]}),
        **_trust_summary(strategy.config, e),
        **_theory_summary(strategy.config, e, records),
        "participation": [repr(p) for p in context.get("participation") or []],
        "mobility": repr(context.get("mobility")),
        "partition": repr(strategy.partitioner),
        "seed": config.get("seed"),
        "rounds": rounds,
        "local_steps": None if e is None else e.total_steps,
        "stopped_early": bool(stop_reason) or bool(trainer.should_stop and rounds < int(trainer.max_epochs or rounds)),
        "stop_reason": stop_reason,
        "executor": None if e is None else e.executor_name,
        "precision": str(trainer.precision),
        "test_evaluation": None if testing is None else testing.mode,
        "final_test_acc": None if final is None else final.get("acc"),
        "final_test_loss": None if final is None else final.get("loss"),
        "best_test_acc": None if best is None else best.get("acc"),
        "best_test_loss": None if best is None else best.get("loss"),
        "best_round": None if b is None else b["round"],
        "monitor": monitor,
        "monitor_mode": recorder.mode if monitor else None,
        "best_monitor_value": None if b is None else b["value"],
        "selection_set": None if not monitor else ("test" if val_is_test else "validation"),
        "test_acc_max_over_rounds": max(curve) if curve else None,
        "split_sizes": sizes,
        "val_fraction": getattr(dm, "val_fraction", None),
        "local_eval": local,
        "bits_per_layer": [] if e is None else list(e.bits_sent),
        "baseline_bits_per_layer": [] if e is None else list(e.baseline_bits),
        "bits_total": 0 if e is None else sum(e.bits_sent),
        "baseline_bits_total": 0 if e is None else sum(e.baseline_bits),
        "sim_time_s": strategy.sim_time,
        "wall_time_s": recorder.wall_time(),
        "sessions": [{"resumed_from": None, "at_round": 0}] + list(recorder.sessions),
        "config": config,
    }
    if testing is not None and testing.mode == "module":
        out["final_test_metrics"], out["best_test_metrics"] = final, best
    return out


def format_summary(s: Mapping[str, Any]) -> str:
    """The summary as the few lines the recipes print."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    sizes = s.get("split_sizes") or {}
    lines = [
        f"== {s['name']}: {s['dataset']} / {s['model']} ({s['num_params'] or 0:,} params), {s['devices']} devices, "
        f"N = {s['layers']}, taus {s['taus']}, {s['compressors']}",
        f"   rounds {s['rounds']} ({s['local_steps']} local steps){' (stopped early)' if s['stopped_early'] else ''},"
        f" executor {s['executor']}, wall {s['wall_time_s']:.1f} s"
        + (f", resumed {len(s['sessions']) - 1}x" if len(s["sessions"]) > 1 else ""),
    ]
    if s.get("stop_reason"):
        lines.append(f"   stopped: {s['stop_reason']}")
    if sizes:
        lines.append(f"   data: {sizes.get('train', 0):,} train / {sizes.get('val', 0):,} validation / "
                     f"{sizes.get('test', 0):,} test samples")
    best = ""
    if s["best_round"] is not None:
        best = (f", best on {s['selection_set']} ({s['monitor']} {s['best_monitor_value']:.4f} at round "
                f"{s['best_round']}) {pct(s['best_test_acc'])}")
    if s.get("final_test_metrics") and s.get("final_test_acc") is None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in s["final_test_metrics"].items() if k.startswith("test"))
        lines.append(f"   cloud model's test_step: final {shown or 'logged nothing'}")
    else:
        lines.append(f"   cloud test accuracy: final {pct(s['final_test_acc'])}{best}")
    if s.get("local_eval"):
        le = s["local_eval"]
        for key, label in (("cloud", "cloud model"), ("personalized", "personalised")):
            if key in le:
                d = le[key]
                lines.append(f"   devices' held-out data, {label} (round {le['round']}): mean {pct(d['mean'])}, "
                             f"std {100 * d['std']:.2f}, worst 10% {pct(d['worst10'])}, best {pct(d['best'])}")
    for n, (b, base) in enumerate(zip(s["bits_per_layer"], s["baseline_bits_per_layer"]), start=1):
        ratio = b / base if base else float("nan")
        lines.append(f"   layer {n} uplinks: {b / 8e6:,.2f} MB sent vs {base / 8e6:,.2f} MB at 32 bits ({ratio:.3f}x)")
    lines.append(f"   simulated time: {s['sim_time_s']:.2f} s")
    return "\n".join(lines)
