"""Shared machinery of the Hydra recipes: build data, model and strategy from a config, train, evaluate, summarise.

Each run writes into its run directory (Hydra's ``outputs/NAME/DATE/``; a resumed run continues in the directory
of its checkpoint, see :mod:`recipes.resume`):

- ``summary.json``: the final cloud model's and the best-on-validation model's test accuracy, the selection
  (monitored metric, its best value and round), split sizes, per-device statistics, bits per layer against the
  32-bit baseline, simulated time, wall time and the resolved config;
- ``history.json``: one record per global round (the strategy's record: round, local steps, device train loss, bits
  per layer, simulated time, ...; the validation metrics ``val_*``; the test curve ``test_acc`` / ``test_loss``
  every ``eval.test_every`` rounds; the per-device evaluation ``local_*`` every ``eval.every`` rounds);
- ``accuracy.png`` (test and validation accuracy against round and simulated time), ``local_accuracy.png``
  (per-device accuracy distribution per evaluated round, with ``eval.local_fraction > 0``);
- ``config.yaml`` (the resolved config), Hydra's ``.hydra/``, ``last.ckpt`` and ``best.ckpt`` (when checkpointing;
  resumable with ``ckpt_path=``), the logger's files (CSV: ``csv/metrics.csv``; W&B: ``wandb/``).

Model selection never uses the test set unless there is no validation split (``dataset.val_fraction=0``: then the
validation loop runs on the test set, as the recipes did before the split, and the summary says so).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

warnings.filterwarnings("ignore", message=".*LeafSpec.*")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lightning_qmlhfl.compressors import Compressor  # noqa: E402
from lightning_qmlhfl.simulation.stacked import upload_dims  # noqa: E402
from lightning_qmlhfl.strategy import QMLHFLDDPStrategy, QMLHFLStrategy  # noqa: E402
from lightning_qmlhfl.theory.latency import LatencyModel, default_uplink_rates, downlink_bits, upload_bits  # noqa: E402
from recipes.building import (build_availability, build_compressors, build_hierarchy,  # noqa: E402
                              build_mobility, build_model_from_cfg, build_participation, build_partitioner,
                              build_server_optimizers, instantiate_node, model_label)
from recipes.callbacks import LocalEvaluator, LRPlateau, RunRecorder, monitor_mode  # noqa: E402
from recipes.datamodules import ImageDataModule  # noqa: E402
from recipes.evaluation import HoldoutPartitioner, device_summary, evaluate_loader, plot_device_accuracy  # noqa: E402
from recipes.resume import (AtomicCheckpointIO, continue_csv_logger, read_csv_rows, resolve_ckpt_path,  # noqa: E402
                            warn_config_changes, write_run_config)
from recipes.options import check_fraction, int_option  # noqa: E402
from recipes.report import key_under  # noqa: E402

__all__ = ["run", "build_compressors", "build_hierarchy", "build_latency", "rounds_for", "build_datamodule",
           "wandb_group_and_name"]

WANDB_ID_FILE = "wandb_run_id"
STRATEGIES = ("qmlhfl", "qmlhfl_ddp")  # trainer.strategy: one process, or one simulation over trainer.devices ranks
_NAME_SKIP = ("logger", "trainer.progress_bar", "hydra", "ckpt_path", "data_dir", "dataset.download", "dataset.mirror")


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its run (a single process is): Lightning's DDP launcher starts the other
    ranks as copies of the command with ``LOCAL_RANK`` / ``NODE_RANK`` set; only rank 0 writes the run's files."""
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def check_strategy(tr: DictConfig, sweep: str | None, local_fraction: float) -> tuple[str, int]:
    """``trainer.strategy`` and ``trainer.devices``, checked: (name, devices)."""
    name = str(tr.get("strategy", "qmlhfl"))
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    devices = tr.get("devices", 1)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices must be an integer >= 1 (processes or GPUs), got {devices!r}")
    if name == "qmlhfl" and devices != 1:
        raise ValueError(f"trainer.devices={devices} needs trainer.strategy=qmlhfl_ddp (one simulation over "
                         f"{devices} processes); trainer.strategy=qmlhfl runs in one process")
    if name == "qmlhfl_ddp":
        if sweep is not None:
            raise ValueError("trainer.strategy=qmlhfl_ddp cannot run inside a Hydra multirun (-m): Lightning's DDP "
                             "launcher restarts the command for every rank; run the sweep's points one at a time")
        if local_fraction > 0:
            raise ValueError("eval.local_fraction > 0 (per-device evaluation) needs every device's data in one "
                             "process: use trainer.strategy=qmlhfl")
    return name, int(devices)


def _uplink_rates(cfg: DictConfig, num_layers: int) -> list[float]:
    rates = cfg.hierarchy.get("uplink_rates")
    if rates is None:
        return default_uplink_rates(num_layers)
    rates = list(rates)
    if len(rates) != num_layers:
        raise ValueError(f"hierarchy.uplink_rates has {len(rates)} entries, the hierarchy has N = {num_layers}")
    return [float(r) for r in rates]


def build_latency(cfg: DictConfig, num_layers: int, hierarchy: Any = None) -> LatencyModel:
    """The simulated clock: compute time per local step from ``latency.compute_time``, uplink rates from the
    hierarchy preset; heterogeneous devices and links with ``latency.compute_sigma`` / ``latency.rate_sigma``
    (lognormal factors, drawn with ``latency.seed``) or per-node times from ``latency.file``; stragglers with
    ``latency.deadlines`` (one per layer, null entries: none) and ``latency.straggler`` (wait | drop)."""
    lat = cfg.latency
    extra = dict(deadlines=None if lat.get("deadlines") is None else list(lat.deadlines),
                 straggler=str(lat.get("straggler") or "wait"))
    if lat.get("file"):
        return LatencyModel.from_file(lat.file, **extra)
    sigma_c, sigma_r = float(lat.get("compute_sigma") or 0.0), float(lat.get("rate_sigma") or 0.0)
    if sigma_c or sigma_r:
        if hierarchy is None:
            hierarchy = build_hierarchy(cfg)
        return LatencyModel.lognormal(hierarchy, float(lat.compute_time), _uplink_rates(cfg, num_layers),
                                      compute_sigma=sigma_c, rate_sigma=sigma_r, seed=int(lat.get("seed") or 0),
                                      **extra)
    return LatencyModel(compute_time=float(lat.compute_time), uplink_rates=_uplink_rates(cfg, num_layers), **extra)


def rounds_for(cfg: DictConfig, latency: LatencyModel, quantizers: list[Compressor], d: int, buffers: int = 0) -> int:
    """``trainer.rounds``, or with ``trainer.deadline`` = T_d (simulated seconds) T = floor(T_d / T_glob(tau)),
    with the engine's bits per upload (d parameters and ``buffers`` float buffer entries)."""
    deadline = cfg.trainer.get("deadline")
    if deadline is None:
        rounds = int(cfg.trainer.rounds)
        if rounds < 1:
            raise ValueError(f"trainer.rounds must be an integer >= 1, got {rounds}")
        return rounds
    hierarchy = build_hierarchy(cfg)
    t_glob = latency.round_time(list(cfg.hierarchy.taus), upload_bits(quantizers, d, buffers),
                                downlink_bits(d + buffers) if latency.slowest_downlink_rates else None,
                                hierarchy=hierarchy).total
    rounds = math.floor(float(deadline) / t_glob + 1e-9)
    if rounds < 1:
        raise ValueError(
            f"trainer.deadline={deadline} s is shorter than one global round T_glob = {t_glob:.4g} s for taus "
            f"{list(cfg.hierarchy.taus)}: raise the deadline or lower tau (python -m recipes.plan finds a tau)"
        )
    return rounds


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """``datamodule._target_`` (a user's LightningDataModule, with the node's other keys as arguments), else the
    built-in :class:`~recipes.datamodules.ImageDataModule` from the ``dataset`` group."""
    dm_cfg = cfg.get("datamodule")
    if dm_cfg is not None and dm_cfg.get("_target_"):
        dm = instantiate_node(dm_cfg, "datamodule")
        if not isinstance(dm, L.LightningDataModule):
            raise TypeError(f"datamodule._target_={dm_cfg._target_!r} built a {type(dm).__name__}, not a "
                            f"LightningDataModule")
        return dm
    d = cfg.dataset
    return ImageDataModule(
        name=str(d.name), data_dir=cfg.get("data_dir"), download=bool(d.get("download", True)), mirror=d.get("mirror"),
        batch_size=d.batch_size, val_fraction=d.get("val_fraction", 0.0), split_seed=int(d.get("split_seed", 0)),
        train_subset=d.get("train_subset"), test_subset=d.get("test_subset"), augment=bool(d.get("augment")),
        eval_batch_size=cfg.get("eval", {}).get("batch_size", 1000))


def _override_items(overrides: Sequence[str] | None) -> list[str]:
    out = []
    for o in overrides or []:
        key = o.lstrip("+~").split("=", 1)[0]
        if key_under(key, _NAME_SKIP):
            continue
        out.append(o.lstrip("+"))
    return out


def wandb_group_and_name(cfg: DictConfig, overrides: Sequence[str] | None = None, sweep: str | None = None
                         ) -> tuple[str | None, str]:
    """The W&B group and run name: ``logger.group`` / ``logger.run_name`` when set; else the group is the W&B
    sweep (``sweep-$WANDB_SWEEP_ID`` under ``wandb agent``) or the Hydra multirun (``NAME/SWEEP_DIR``), and the name
    is the run's overrides (``hierarchy=two_layer,seed=1``; logger, progress bar, data and resume settings left
    out), or ``name`` without overrides."""
    lg = cfg.logger
    group = lg.get("group") or (f"sweep-{os.environ['WANDB_SWEEP_ID']}" if os.environ.get("WANDB_SWEEP_ID") else sweep)
    name = lg.get("run_name") or ",".join(_override_items(overrides)) or str(cfg.name)
    return group, name


def _make_logger(cfg: DictConfig, run_dir: Path, resuming: bool, overrides: Sequence[str] | None,
                 sweep: str | None) -> Any:
    lg = cfg.logger
    if lg.get("_target_"):
        return instantiate_node(lg, "logger", defaults={"save_dir": str(run_dir)})
    name = lg.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        # flushed at every log call (a few rows per round), so a killed run's file holds everything logged so far
        return CSVLogger(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = os.environ.get("WANDB_MODE", lg.get("mode", "offline"))
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        if run_id is None:  # kept in the run directory, so that a resumed run continues the same W&B run
            import secrets
            import string

            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        group, run_name = wandb_group_and_name(cfg, overrides, sweep)
        return WandbLogger(project=lg.project, entity=lg.get("entity"), save_dir=str(run_dir), mode=mode,
                           tags=list(lg.get("tags") or []), group=group, name=run_name, id=run_id, resume="allow",
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise ValueError(f"logger.name must be none, csv or wandb (or give logger._target_), got {name!r}")


class _LazyTestLoader:
    """The datamodule's test dataloader, made at its first use (after Lightning set the datamodule up for fit;
    a user's datamodule gets ``setup("test")`` first, as ``trainer.test`` would)."""

    def __init__(self, dm: L.LightningDataModule) -> None:
        self.dm, self.loader = dm, None

    def __iter__(self):
        if self.loader is None:
            if not isinstance(self.dm, ImageDataModule):
                self.dm.setup("test")
            self.loader = self.dm.test_dataloader()
        return iter(self.loader)


def _checkpoint_epoch(path: Path) -> int:
    """The (0-based) epoch a Lightning checkpoint was written in, read without loading its tensors."""
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ck.get("epoch", -1))


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None, overrides: Sequence[str] | None = None,
        sweep: str | None = None) -> dict[str, Any]:
    """Train one configuration; write summary.json, history.json, the plots and checkpoints into the run directory.

    Args:
        cfg: the composed recipe config (``recipes/conf/mnist.yaml`` or ``recipes/conf/cifar.yaml`` with overrides).
        run_dir: where to write (default: the working directory). With ``cfg.ckpt_path`` set the run resumes that
            checkpoint and writes into the checkpoint's directory (``ckpt_path=last``: the newest matching
            ``last.ckpt`` below the parent of ``run_dir``).
        overrides: the command-line overrides (name the W&B run).
        sweep: the Hydra multirun this run belongs to (groups W&B runs).

    Returns:
        The summary dict (also written to ``summary.json`` and printed).
    """
    t_start = time.time()
    run_dir = Path(run_dir or os.getcwd()).resolve()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), resolved, [run_dir.parent])
    if ckpt is not None:
        if ckpt.parent != run_dir:
            print(f"resuming {ckpt}: writing into its run directory {ckpt.parent}")
        run_dir = ckpt.parent
        warn_config_changes(ckpt, resolved)
    rank0 = is_global_zero()
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, resolved, overwrite=ckpt is None)
    torch.manual_seed(int(cfg.seed))
    threads = os.environ.get("QMLHFL_THREADS")
    if threads:
        torch.set_num_threads(int(threads))

    tr, ev = cfg.trainer, cfg.get("eval") or OmegaConf.create({})
    dm = build_datamodule(cfg)
    model = build_model_from_cfg(cfg)
    hierarchy = build_hierarchy(cfg)
    N = hierarchy.num_layers
    compressors = build_compressors(cfg, N)
    latency = build_latency(cfg, N, hierarchy)
    rounds = rounds_for(cfg, latency, compressors, *upload_dims(model))

    partitioner = build_partitioner(cfg)
    local_fraction = check_fraction(ev.get("local_fraction", 0.0) or 0.0, "eval.local_fraction")
    holdout = HoldoutPartitioner(partitioner, local_fraction) if local_fraction > 0 else None
    strategy_name, devices = check_strategy(tr, sweep, local_fraction)
    extra: dict[str, Any] = {}
    if tr.get("device_rng") is not None:
        extra["device_rng"] = str(tr.device_rng)
    if strategy_name == "qmlhfl_ddp":
        extra["checkpoint"] = str(tr.get("ddp_checkpoint", "full"))
    elif str(tr.accelerator) in ("cpu", "gpu", "cuda"):  # the simulation lives where the accelerator says
        extra["device"] = "cpu" if str(tr.accelerator) == "cpu" else "cuda"
    strategy = (QMLHFLDDPStrategy if strategy_name == "qmlhfl_ddp" else QMLHFLStrategy)(
        hierarchy=hierarchy, taus=list(cfg.hierarchy.taus), compressors=compressors,
        server_optimizers=build_server_optimizers(cfg, N), participation=build_participation(cfg, N),
        availability=build_availability(cfg), mobility=build_mobility(cfg, hierarchy),
        partition=holdout or partitioner, seed=int(cfg.seed),
        executor=tr.executor, weighting=tr.weighting, global_rounds=rounds,
        latency=latency, smoothness=tr.get("smoothness"), train_transform=getattr(dm, "train_transform", None),
        backend=tr.backend, **extra,
    )

    # validation, selection, early stopping, LR plateau
    has_val = is_overridden("val_dataloader", dm)
    val_is_test = bool(getattr(dm, "validation_is_test", False))
    monitor = tr.get("monitor") if has_val else None
    mode = monitor_mode(str(monitor), tr.get("monitor_mode", "auto")) if monitor else "max"
    val_every = int_option(tr.get("val_every_n_rounds", 1), "trainer.val_every_n_rounds", 1, allow_none=False)
    es_cfg, lp_cfg = tr.get("early_stopping") or {}, tr.get("lr_plateau") or {}
    es_patience = int_option(es_cfg.get("patience"), "trainer.early_stopping.patience", 0)
    lp_patience = int_option(lp_cfg.get("patience"), "trainer.lr_plateau.patience", 0)
    if (es_patience is not None or lp_patience is not None) and not monitor:
        raise ValueError("trainer.early_stopping / trainer.lr_plateau need a validation metric: set trainer.monitor "
                         "(e.g. val_acc) and give the datamodule a val_dataloader" if has_val else
                         "trainer.early_stopping / trainer.lr_plateau need validation, but the datamodule has no "
                         "val_dataloader")
    if monitor and val_is_test:
        warnings.warn(f"dataset.val_fraction=0: there is no validation split, so trainer.monitor={monitor} selects "
                      f"the best model on the TEST set (the recipes before the validation split); "
                      f"dataset.val_fraction=0.1 holds out a validation split", UserWarning, stacklevel=2)
    plateau = None
    if lp_patience is not None:
        plateau = LRPlateau(str(monitor), mode, float(lp_cfg.get("factor", 0.5)), lp_patience,
                            float(lp_cfg.get("min_lr", 0.0)))
        plateau.attach(model)

    test_loader = _LazyTestLoader(dm) if is_overridden("test_dataloader", dm) else None
    local = None
    if holdout is not None:
        steps = int_option(ev.get("personal_steps"), "eval.personal_steps", 1) or int(cfg.hierarchy.taus[0])
        local = LocalEvaluator(holdout, bool(ev.get("personalized", False)), steps, int(cfg.seed),
                               ev.get("batch_size", 1000))
    recorder = RunRecorder(monitor=monitor, mode=mode, rounds=rounds, test_loader=test_loader,
                           test_every=ev.get("test_every", 1), local=local, eval_every=ev.get("every", 1),
                           session_start=t_start)
    recorder.resumed_from = None if ckpt is None else str(ckpt)
    callbacks: list[Callback] = [recorder] + ([plateau] if plateau is not None else [])
    for i, cb_cfg in enumerate(tr.get("callbacks") or []):
        cb = instantiate_node(cb_cfg, "trainer.callbacks")
        if not isinstance(cb, Callback):
            raise TypeError(f"trainer.callbacks[{i}] built a {type(cb).__name__}, not a Lightning Callback")
        callbacks.append(cb)
    if es_patience is not None:
        callbacks.append(EarlyStopping(monitor=str(monitor), mode=mode, patience=es_patience,
                                       min_delta=float(es_cfg.get("min_delta", 0.0)), check_on_train_epoch_end=False))
    checkpointing = bool(tr.get("checkpoint", True))
    if checkpointing:
        # Both at the end of every round, after the recorder and the LR plateau (checkpoint callbacks run last, in
        # this order): best.ckpt first, so that last.ckpt holds the best-checkpoint state of this round too.
        if monitor and tr.get("save_best", True):
            callbacks.append(ModelCheckpoint(dirpath=str(run_dir), filename="best", monitor=str(monitor), mode=mode,
                                             save_top_k=1, save_on_train_epoch_end=True,
                                             enable_version_counter=False, auto_insert_metric_name=False))
        # last.ckpt (save_last=True would, in Lightning >= 2.5, write it only alongside another checkpoint): a
        # top-1 checkpoint without a monitor, named "last", overwritten every round
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir), filename="last", save_top_k=1,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
    logger = _make_logger(cfg, run_dir, ckpt is not None, overrides, sweep)
    if ckpt is not None and cfg.logger.get("name") == "csv" and not cfg.logger.get("_target_"):
        continue_csv_logger(logger, read_csv_rows(run_dir / "csv" / "metrics.csv", _checkpoint_epoch(ckpt)))
    trainer = L.Trainer(
        strategy=strategy, accelerator=tr.accelerator, precision=str(tr.get("precision", "32-true")),
        max_steps=int(tr.max_steps), max_epochs=rounds,
        **({"devices": devices} if strategy_name == "qmlhfl_ddp" else {}),
        check_val_every_n_epoch=val_every, num_sanity_val_steps=0, logger=logger, callbacks=callbacks,
        enable_progress_bar=bool(tr.progress_bar), enable_model_summary=False, enable_checkpointing=checkpointing,
        log_every_n_steps=max(1, math.prod(cfg.hierarchy.taus)), plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=None if ckpt is None else str(ckpt))
    if not trainer.is_global_zero:  # the other ranks of a multi-process run: rank 0 evaluates and writes
        return {}

    # the test set, at the end: the final cloud model and the best-on-validation model
    final = evaluate_loader(model, test_loader) if test_loader is not None else None
    if final is not None:
        recorder.attach_final({"test_acc": final["acc"], "test_loss": final["loss"]})
    if local is not None and recorder.records and "local_cloud_acc" not in recorder.records[-1]:
        recorder.records[-1].update(local.evaluate(strategy, model, int(recorder.records[-1]["round"])))
    best = None
    if recorder.best is not None and test_loader is not None:
        final_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        model.load_state_dict(recorder.best["state_dict"])
        best = evaluate_loader(model, test_loader)
        model.load_state_dict(final_state)
    summary = summarise(cfg, strategy, recorder, dm, final, best, monitor, mode, val_is_test, trainer)
    write_outputs(run_dir, cfg, summary, recorder.records)
    _log_plots(trainer, run_dir)
    print(format_summary(summary))
    return summary


def summarise(cfg: DictConfig, strategy: QMLHFLStrategy, recorder: RunRecorder, dm: Any,
              final: dict[str, float] | None, best: dict[str, float] | None, monitor: str | None, mode: str,
              val_is_test: bool, trainer: L.Trainer) -> dict[str, Any]:
    e = strategy.engine
    records = recorder.records
    curve = [r["test_acc"] for r in records if "test_acc" in r]
    sizes = dm.sizes() if hasattr(dm, "sizes") else {}
    last_local = next((r for r in reversed(records) if "local_cloud_acc" in r), None)
    local: dict[str, Any] | None = None
    if last_local is not None:
        local = {"round": last_local["round"], "cloud": device_summary(last_local["local_cloud_acc"])}
        if last_local.get("local_personal_acc"):
            local["personalized"] = device_summary(last_local["local_personal_acc"])
    b = recorder.best
    return {
        "name": cfg.name,
        "dataset": cfg.dataset.name if not (cfg.get("datamodule") or {}).get("_target_") else cfg.datamodule._target_,
        "model": model_label(cfg),
        "num_params": e.num_params,
        "layers": e.N,
        "devices": strategy.hierarchy.num_devices,
        "taus": list(e.taus),
        "compressors": [repr(q) for q in e.compressors],
        "server_optimizers": [repr(o) for o in e.server_optimizers],
        "participation": [repr(p) for p in e.participation],
        "mobility": repr(e.mobility),
        "partition": repr(strategy.partitioner),
        "seed": int(cfg.seed),
        "rounds": e.round,
        "local_steps": e.total_steps,
        "stopped_early": bool(trainer.should_stop and e.round < int(trainer.max_epochs or e.round)),
        "executor": e.executor_name,
        "precision": str(trainer.precision),
        "final_test_acc": None if final is None else final["acc"],
        "final_test_loss": None if final is None else final["loss"],
        "best_test_acc": None if best is None else best["acc"],
        "best_test_loss": None if best is None else best["loss"],
        "best_round": None if b is None else b["round"],
        "monitor": monitor,
        "monitor_mode": mode if monitor else None,
        "best_monitor_value": None if b is None else b["value"],
        "selection_set": None if not monitor else ("test" if val_is_test else "validation"),
        "test_acc_max_over_rounds": max(curve) if curve else None,
        "split_sizes": sizes,
        "val_fraction": getattr(dm, "val_fraction", None),
        "local_eval": local,
        "bits_per_layer": list(e.bits_sent),
        "baseline_bits_per_layer": list(e.baseline_bits),
        "bits_total": sum(e.bits_sent),
        "baseline_bits_total": sum(e.baseline_bits),
        "sim_time_s": strategy.sim_time,
        "wall_time_s": recorder.wall_time(),
        "sessions": [{"resumed_from": None, "at_round": 0}] + list(recorder.sessions),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def format_summary(s: dict[str, Any]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    sizes = s.get("split_sizes") or {}
    lines = [
        f"== {s['name']}: {s['dataset']} / {s['model']} ({s['num_params']:,} params), {s['devices']} devices, "
        f"N = {s['layers']}, taus {s['taus']}, {s['compressors']}",
        f"   rounds {s['rounds']} ({s['local_steps']} local steps){' (stopped early)' if s['stopped_early'] else ''},"
        f" executor {s['executor']}, wall {s['wall_time_s']:.1f} s"
        + (f", resumed {len(s['sessions']) - 1}x" if len(s["sessions"]) > 1 else ""),
    ]
    if sizes:
        lines.append(f"   data: {sizes.get('train', 0):,} train / {sizes.get('val', 0):,} validation / "
                     f"{sizes.get('test', 0):,} test samples")
    best = ""
    if s["best_round"] is not None:
        best = (f", best on {s['selection_set']} ({s['monitor']} {s['best_monitor_value']:.4f} at round "
                f"{s['best_round']}) {pct(s['best_test_acc'])}")
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


def write_outputs(run_dir: Path, cfg: DictConfig, summary: dict[str, Any], records: list[dict]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "history.json").write_text(json.dumps(records, indent=2))
    plot_history(records, run_dir / "accuracy.png", title=f"{summary['name']}: {summary['compressors']}")
    plot_device_accuracy(records, run_dir / "local_accuracy.png",
                         title=f"{summary['name']}: per-device accuracy on held-out local data")


def _log_plots(trainer: L.Trainer, run_dir: Path) -> None:
    """Log the plots as images to every W&B logger, then finish its run."""
    for lg in trainer.loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        for png in ("accuracy.png", "local_accuracy.png"):
            if (run_dir / png).is_file():
                lg.log_image(key=f"plots/{png[:-4]}", images=[str(run_dir / png)], step=trainer.global_step)
        lg.experiment.finish()


def plot_history(records: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy (and validation accuracy, where recorded) of the cloud model against global round and
    simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("test_acc", "test"), ("val_acc", "validation")):
        rec = [r for r in records if key in r]
        if not rec:
            continue
        acc = [100 * r[key] for r in rec]
        axes[0].plot([r["round"] for r in rec], acc, marker=".", label=label)
        axes[1].plot([r.get("sim_time", 0.0) for r in rec], acc, marker=".", label=label)
    axes[0].set_xlabel("global round")
    axes[1].set_xlabel("simulated time [s]")
    for ax in axes:
        ax.set_ylabel("cloud model accuracy [%]")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
