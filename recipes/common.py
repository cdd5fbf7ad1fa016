"""Shared machinery of the Hydra recipes: build data, model and strategy from a config, train, summarise.

Each run writes into its Hydra run directory:
- ``summary.json``: final and best cloud test accuracy, bits per layer against the 32-bit baseline, simulated time,
  wall time and the resolved config;
- ``history.json``: one record per global round (round, local steps, train loss, test accuracy/loss of the cloud
  model, cumulative bits per layer, simulated time);
- ``accuracy.png``: test accuracy against global round and against simulated time;
- ``config.yaml`` (Hydra's ``.hydra/``), ``last.ckpt`` (if checkpointing), CSV/W&B logs (if enabled).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

warnings.filterwarnings("ignore", message=".*LeafSpec.*")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from recipes.datasets import get_dataset, normalize, random_crop_flip, resolve_data_dir  # noqa: E402
from lightning_qmlhfl.theory.latency import LatencyModel, default_uplink_rates, downlink_bits, upload_bits  # noqa: E402
from recipes.models import build_model  # noqa: E402
from lightning_qmlhfl.data import make_partitioner  # noqa: E402
from lightning_qmlhfl.compressors import Compressor  # noqa: E402
from lightning_qmlhfl.stacked import upload_dims  # noqa: E402
from lightning_qmlhfl.strategy import QMLHFLStrategy  # noqa: E402
from recipes.building import (build_availability, build_compressors, build_hierarchy,  # noqa: E402
                              build_mobility, build_participation, build_server_optimizers)

__all__ = ["run", "build_compressors", "build_hierarchy"]


class _History(Callback):
    """Joins the strategy's per-round records with the cloud model's test metrics and prints nothing."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        strategy = trainer.strategy
        assert isinstance(strategy, QMLHFLStrategy)
        rec = dict(strategy.history[-1]) if strategy.history else {"round": 0, "local_steps": 0}
        m = trainer.callback_metrics
        for key in ("val_acc", "val_loss"):
            if key in m:
                rec[key.replace("val_", "test_")] = float(m[key])
        self.records.append(rec)


def _tensor_dataset(images: torch.Tensor, labels: torch.Tensor, mean, std, subset: int | None) -> TensorDataset:
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be null or an integer >= 1, got {subset}")
        images, labels = images[:subset], labels[:subset]
    return TensorDataset(normalize(images, mean, std), labels)


def _make_logger(cfg: DictConfig, run_dir: Path):
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = os.environ.get("WANDB_MODE", cfg.logger.get("mode", "offline"))
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), save_dir=str(run_dir),
                             mode=mode, tags=list(cfg.logger.get("tags") or []), config=OmegaConf.to_container(
                                 cfg, resolve=True))
        return logger
    raise ValueError(f"logger.name must be none, csv or wandb, got {name!r}")


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


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one configuration and write summary.json, history.json and accuracy.png into ``run_dir``."""
    t_start = time.time()
    run_dir = Path(run_dir or os.getcwd())
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    threads = os.environ.get("QMLHFL_THREADS")
    if threads:
        torch.set_num_threads(int(threads))

    ds = get_dataset(cfg.dataset.name, resolve_data_dir(cfg.get("data_dir")), download=bool(cfg.dataset.download))
    train = _tensor_dataset(ds.train_images, ds.train_labels, ds.mean, ds.std, cfg.dataset.get("train_subset"))
    test = _tensor_dataset(ds.test_images, ds.test_labels, ds.mean, ds.std, cfg.dataset.get("test_subset"))
    train_dl = DataLoader(train, batch_size=int(cfg.dataset.batch_size), shuffle=True)
    test_dl = DataLoader(test, batch_size=1000)

    model_kw = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = build_model(cfg.model.name, **model_kw)

    hierarchy = build_hierarchy(cfg)
    N = hierarchy.num_layers
    compressors = build_compressors(cfg, N)
    latency = build_latency(cfg, N, hierarchy)
    rounds = rounds_for(cfg, latency, compressors, *upload_dims(model))
    transform = None
    if cfg.dataset.get("augment"):
        def transform(batch, generator):  # noqa: E306 - stacked [N_tot, B, C, H, W] batches
            x, y = batch
            return [random_crop_flip(x, padding=4, generator=generator), y]

    strategy = QMLHFLStrategy(
        hierarchy=hierarchy, taus=list(cfg.hierarchy.taus), compressors=compressors,
        server_optimizers=build_server_optimizers(cfg, N), participation=build_participation(cfg, N),
        availability=build_availability(cfg), mobility=build_mobility(cfg, hierarchy),
        partition=make_partitioner(OmegaConf.to_container(cfg.partition, resolve=True)), seed=int(cfg.seed),
        executor=cfg.trainer.executor, weighting=cfg.trainer.weighting, global_rounds=rounds,
        latency=latency, smoothness=cfg.trainer.get("smoothness"), train_transform=transform,
        backend=cfg.trainer.backend,
    )
    history = _History()
    callbacks: list[Callback] = [history]
    if cfg.trainer.get("checkpoint", True):
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir), filename="round{epoch}", save_last=True, save_top_k=0))
    trainer = L.Trainer(
        strategy=strategy, accelerator=cfg.trainer.accelerator, max_steps=int(cfg.trainer.max_steps), max_epochs=rounds,
        check_val_every_n_epoch=int(cfg.trainer.val_every_n_rounds), num_sanity_val_steps=0,
        logger=_make_logger(cfg, run_dir), callbacks=callbacks, enable_progress_bar=bool(cfg.trainer.progress_bar),
        enable_model_summary=False, enable_checkpointing=bool(cfg.trainer.get("checkpoint", True)),
        log_every_n_steps=max(1, math.prod(cfg.hierarchy.taus)),
    )
    trainer.fit(model, train_dl, test_dl)
    summary = summarise(cfg, strategy, history.records, time.time() - t_start)
    write_outputs(run_dir, cfg, summary, history.records)
    print(format_summary(summary))
    return summary


def summarise(cfg: DictConfig, strategy: QMLHFLStrategy, records: list[dict], wall: float) -> dict[str, Any]:
    e = strategy.engine
    accs = [r["test_acc"] for r in records if "test_acc" in r]
    N = e.N
    return {
        "name": cfg.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "num_params": e.num_params,
        "layers": N,
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
        "executor": e.executor_name,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "bits_per_layer": list(e.bits_sent),
        "baseline_bits_per_layer": list(e.baseline_bits),
        "bits_total": sum(e.bits_sent),
        "baseline_bits_total": sum(e.baseline_bits),
        "sim_time_s": strategy.sim_time,
        "wall_time_s": wall,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def format_summary(s: dict[str, Any]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"== {s['name']}: {s['dataset']} / {s['model']} ({s['num_params']:,} params), {s['devices']} devices, "
        f"N = {s['layers']}, taus {s['taus']}, {s['compressors']}",
        f"   rounds {s['rounds']} ({s['local_steps']} local steps), executor {s['executor']}, "
        f"wall {s['wall_time_s']:.1f} s",
        f"   cloud test accuracy: final {pct(s['final_test_acc'])}, best {pct(s['best_test_acc'])}",
    ]
    for n, (b, base) in enumerate(zip(s["bits_per_layer"], s["baseline_bits_per_layer"]), start=1):
        ratio = b / base if base else float("nan")
        lines.append(f"   layer {n} uplinks: {b / 8e6:,.2f} MB sent vs {base / 8e6:,.2f} MB at 32 bits ({ratio:.3f}x)")
    lines.append(f"   simulated time: {s['sim_time_s']:.2f} s")
    return "\n".join(lines)


def write_outputs(run_dir: Path, cfg: DictConfig, summary: dict[str, Any], records: list[dict]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "history.json").write_text(json.dumps(records, indent=2))
    plot_history(records, run_dir / "accuracy.png", title=f"{summary['name']}: {summary['compressors']}")


def plot_history(records: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = [r for r in records if "test_acc" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in rec]
    acc = [100 * r["test_acc"] for r in rec]
    axes[0].plot(rounds, acc, marker=".")
    axes[0].set_xlabel("global round")
    axes[1].plot([r.get("sim_time", 0.0) for r in rec], acc, marker=".")
    axes[1].set_xlabel("simulated time [s]")
    for ax in axes:
        ax.set_ylabel("cloud test accuracy [%]")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hydra_entry(config_name: str) -> Callable[[], Any]:
    """The ``main()`` of a recipe: Hydra over ``conf/<config_name>.yaml``; runs :func:`run` in the run directory
    and returns the final cloud test accuracy (the objective for Hydra sweepers)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")

    @hydra.main(config_path=conf_dir, config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> float | None:
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
        return summary["final_test_acc"]

    return main
