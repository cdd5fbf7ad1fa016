"""Hydra configs (every group option, every experiment preset, the W&B sweep files) and end-to-end recipe runs."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)
import yaml
from omegaconf import OmegaConf

from recipes.config import compose
from recipes.simulation import build_hierarchy, build_latency, build_compressors, rounds_for

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "recipes" / "conf"  # shipped inside the package (package data)
GROUPS = ["dataset", "model", "hierarchy", "quantizer", "partition", "trainer", "logger", "eval"]


def _compose(config: str, overrides: list[str], hydra_cfg: bool = False):
    return compose(config, overrides, return_hydra_config=hydra_cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    for config in ("mnist", "cifar"):
        cfg = _compose(config, [f"{group}={option}"])
        assert cfg[group] is not None
        h = build_hierarchy(cfg)
        qs = build_compressors(cfg, h.num_layers)
        assert len(qs) == h.num_layers == len(cfg.hierarchy.taus)
        build_latency(cfg, h.num_layers)
        if group in ("dataset", "model", "partition", "logger"):
            assert cfg[group].name == option


def test_hierarchy_presets_share_devices_and_prod_tau():
    """The depth experiment compares these: same 64 devices and the same prod(tau) = 40; lower links faster."""
    seen = set()
    for option in ("two_layer", "three_layer", "four_layer"):
        cfg = _compose("mnist", [f"hierarchy={option}"])
        h = build_hierarchy(cfg)
        seen.add((h.num_devices, math.prod(cfg.hierarchy.taus)))
        rates = list(cfg.hierarchy.uplink_rates)
        assert len(rates) == h.num_layers and rates == sorted(rates, reverse=True)
    assert seen == {(64, 40)}
    assert {build_hierarchy(_compose("mnist", [f"hierarchy={o}"])).num_layers
            for o in ("two_layer", "three_layer", "four_layer")} == {2, 3, 4}


def test_main_job_defaults_match_the_issue():
    """Non-IID MNIST with Dirichlet alpha = 0.5, >= 50 devices, >= 3 layers, quantized links."""
    cfg = _compose("mnist", [])
    h = build_hierarchy(cfg)
    assert cfg.dataset.name == "mnist" and cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.5
    assert h.num_devices >= 50 and h.num_layers >= 3
    assert all(q.__class__.__name__ == "QSGD" for q in build_compressors(cfg, h.num_layers))


@pytest.mark.parametrize("config,preset", [("mnist", "depth"), ("cifar", "quant_sensitivity"), ("mnist", "planning")])
def test_experiment_presets_compose_with_every_sweep_point(config, preset):
    cfg = _compose(config, [f"+experiment={preset}"], hydra_cfg=True)
    assert cfg.name == preset
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    axes = [[f"{k}={v}" for v in _split_values(str(vals))] for k, vals in (params or {}).items()]
    points = list(itertools.product(*axes)) or [()]
    for point in points:
        c = _compose(config, [f"+experiment={preset}", *point])
        h = build_hierarchy(c)
        build_compressors(c, h.num_layers)
    if preset == "depth":
        assert len(points) == 18  # 3 hierarchies x 2 alphas x 3 seeds
    if preset == "quant_sensitivity":
        levels = {str(OmegaConf.to_container(_compose(config, [f"+experiment={preset}", *p]).quantizer)["levels"])
                  for p in points}
        assert levels == {"[4, 8]", "[8, 8]", "[8, 4]", "None"}
        assert cfg.hierarchy.branching and len(cfg.hierarchy.branching) == 2
    if preset == "planning":
        assert cfg.deadline > 0 and cfg.planning.random_taus >= 5 and len(cfg.planning.seeds) >= 3


def _split_values(s: str) -> list[str]:
    """Split a Hydra sweep value list on top-level commas ("[4,8],[8,8],null" -> three values)."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


@pytest.mark.parametrize("path", sorted((CONF / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_files_drive_the_recipes_through_hydra_overrides(path):
    sweep = yaml.safe_load(path.read_text())
    cmd = sweep["command"]
    assert "${args_no_hyphens}" in cmd and "-m" in cmd
    recipe = cmd[cmd.index("-m") + 1]
    assert recipe in ("recipes.mnist", "recipes.cifar")
    config = recipe.split(".")[1]
    fixed = [c for c in cmd if "=" in c and not c.startswith("$")]
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec.get("min")]
        for v in values:
            _compose(config, [*fixed, f"{key}={v}"])  # every value is a valid Hydra override


def test_deadline_sets_the_number_of_rounds():
    cfg = _compose("mnist", ["+experiment=planning", "hierarchy.taus=[5,4,2]"])
    h = build_hierarchy(cfg)
    qs = build_compressors(cfg, h.num_layers)
    lat = build_latency(cfg, h.num_layers)
    t_glob = lat.round_time_for([5, 4, 2], qs, 21840).total
    assert rounds_for(cfg, lat, qs, 21840) == math.floor(cfg.deadline / t_glob)
    short = _compose("mnist", ["+experiment=planning", "trainer.deadline=0.01"])
    with pytest.raises(ValueError, match="shorter than one global round"):
        rounds_for(short, lat, qs, 21840)


def test_bad_quantizer_levels_length():
    cfg = _compose("mnist", ["quantizer.levels=[4,8]"])
    with pytest.raises(ValueError, match="N = 3"):
        build_compressors(cfg, 3)


def _run_recipe(module: str, tmp_path: Path, *overrides: str, wandb_mode: str = "disabled"):
    env = dict(os.environ, WANDB_MODE=wandb_mode, QMLHFL_THREADS="2", WANDB_DIR=str(tmp_path))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={tmp_path}/run", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_outputs(run: Path, out: subprocess.CompletedProcess, rounds: int) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert summary["rounds"] == rounds and len([r for r in history if "test_acc" in r]) == rounds
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cloud test accuracy: final" in out.stdout and "simulated time" in out.stdout
    assert all(0 < b <= base for b, base in zip(summary["bits_per_layer"], summary["baseline_bits_per_layer"]))
    assert summary["final_test_acc"] == history[-1]["test_acc"]
    return summary


def test_mnist_recipe_end_to_end(tmp_path, data_env):
    out = _run_recipe("recipes.mnist", tmp_path, "dataset.train_subset=2000", "dataset.test_subset=500",
                      "hierarchy=four_layer", "hierarchy.branching=[2,1,2,2]", "hierarchy.taus=[2,1,2,1]",
                      "quantizer.levels=[4,8,8,8]", "partition.alpha=0.1", "trainer.rounds=5", "logger=csv",
                      "trainer.progress_bar=false")
    s = _check_outputs(tmp_path / "run", out, 5)
    assert s["layers"] == 4 and s["devices"] == 8 and s["local_steps"] == 20
    assert all(b < base for b, base in zip(s["bits_per_layer"], s["baseline_bits_per_layer"]))
    assert s["compressors"][0].startswith("QSGD(4") and (tmp_path / "run" / "last.ckpt").exists()
    assert (tmp_path / "run" / "csv" / "metrics.csv").exists()
    assert s["final_test_acc"] > 0.3  # chance is 0.1; 20 local steps of 8 devices on 2000 images
    assert s["precision"] == "32-true"


def test_cifar_recipe_end_to_end_with_wandb_offline(tmp_path, data_env):
    out = _run_recipe("recipes.cifar", tmp_path, "dataset.train_subset=512", "dataset.test_subset=256",
                      "hierarchy.branching=[2,2]", "hierarchy.taus=[2,1]", "quantizer.levels=[4,null]",
                      "trainer.rounds=1", "logger=wandb", "logger.mode=offline", "trainer.checkpoint=false",
                      "trainer.precision=bf16-mixed",
                      wandb_mode="offline")  # offline: W&B writes its run files locally and reaches nothing
    s = _check_outputs(tmp_path / "run", out, 1)
    assert s["precision"] == "bf16-mixed"
    assert s["compressors"] == ["QSGD(4)", "Identity()"]
    assert s["bits_per_layer"][1] == s["baseline_bits_per_layer"][1]
    runs = list((tmp_path / "run").rglob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    # the plots were logged as images, the run is named from its overrides, the resolved config and metrics logged
    assert list(runs[0].rglob("media/images/plots/accuracy_*.png"))
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"dataset.train_subset=512,dataset.test_subset=256,hierarchy.branching=[2,2]" in log
    assert b"val_fraction" in log and b"val_acc" in log and b"test_acc" in log and b"fl/round" in log
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() in runs[0].name


def test_wandb_runs_are_grouped_by_sweep_and_named_from_their_overrides(tmp_path, monkeypatch):
    from recipes.loggers import make_logger as _make_logger, wandb_group_and_name

    cfg = _compose("mnist", ["logger=wandb"])
    overrides = ["hierarchy=two_layer", "seed=1", "logger=wandb", "logger.mode=online", "trainer.progress_bar=false",
                 "+experiment=depth"]
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert wandb_group_and_name(cfg, overrides, sweep="depth/2026-12-01_10-00-00") == (
        "depth/2026-12-01_10-00-00", "hierarchy=two_layer,seed=1,experiment=depth")
    assert wandb_group_and_name(cfg, [], None) == (None, "mnist")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # under `wandb agent`
    assert wandb_group_and_name(cfg, overrides)[0] == "sweep-abc123"
    named = _compose("mnist", ["logger=wandb", "logger.group=mine", "logger.run_name=first"])
    assert wandb_group_and_name(named, overrides) == ("mine", "first")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = _make_logger(cfg, tmp_path, False, overrides, None)
    init = logger._wandb_init
    assert init["group"] == "sweep-abc123" and init["name"] == "hierarchy=two_layer,seed=1,experiment=depth"
    assert init["mode"] == "disabled" and init["config"]["dataset"]["val_fraction"] == 0.1
    assert init["id"] == (tmp_path / "wandb_run_id").read_text().strip() and init["resume"] == "allow"
    again = _make_logger(cfg, tmp_path, True, overrides, None)  # a resumed run continues the same W&B run
    assert again._wandb_init["id"] == init["id"]
    monkeypatch.delenv("WANDB_MODE")
    assert _compose("mnist", ["logger=wandb"]).logger.mode == "offline"  # offline unless logger.mode=online


def test_planning_candidates_are_feasible_and_scored_like_the_planner():
    from recipes.planning import candidates, compose_cfg

    cfg = compose_cfg([])
    plan, randoms, setting = candidates(cfg)
    assert plan.feasible and len(randoms) == cfg.planning.random_taus >= 5
    taus = [tuple(plan.taus)] + [tuple(r.taus) for r in randoms]
    assert len(set(taus)) == len(taus)  # distinct, none equal to the plan
    for r in randoms:
        assert r.feasible and r.rounds >= 1 and r.objective <= plan.objective + 1e-12
        assert r.rounds == math.floor(setting["deadline"] / r.round_time.total + 1e-9)


def test_planning_driver_end_to_end(tmp_path, data_env):
    from recipes.planning import main

    out, runs = tmp_path / "out", tmp_path / "runs"
    rc = main(["dataset.train_subset=1500", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
               "trainer.deadline=1.5", "planning.random_taus=1", "planning.seeds=[0,1]", "planning.tau_max=3",
               f"planning.out={out}", f"planning.runs_dir={runs}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["planner", "random"]
    for row in res["rows"]:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for r in row["runs"]:
            assert r["rounds"] == row["rounds"] and r["sim_time"] <= 1.5 + 1e-9
    md = (out / "results.md").read_text()
    assert "| planner |" in md and "ranks" in md
    assert (out / "accuracy_at_deadline.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(runs.glob("*/summary.json"))) == 4


def test_compressor_group_from_the_command_line():
    cfg = _compose("mnist", ["compressor.layers=[topk,qsgd,sign]", "compressor.ratio=0.01",
                             "compressor.error_feedback=[ef,null,ef21]", "quantizer.levels=[4,8,8]"])
    from lightning_qmlhfl import QSGD, ScaledSign, TopK

    assert build_compressors(cfg, 3) == [TopK(ratio=0.01, error_feedback="ef"), QSGD(8, 512),
                                         ScaledSign(512, error_feedback="ef21")]
    assert build_compressors(_compose("mnist", []), 3) == [QSGD(8, 512)] * 3  # the main job's default
    with pytest.raises(ValueError, match="compressor.layers\\[1\\] = 'zip' is not a compressor"):
        build_compressors(_compose("mnist", ["compressor.layers=[qsgd,zip,qsgd]"]), 3)


def test_deadline_rounds_and_the_logged_time_count_the_same_bits_for_batchnorm_models():
    """One bits function: the latency model's upload (used for deadline rounds) counts the float buffers as the
    engine does."""
    import torch.nn.functional as F

    from lightning_qmlhfl import QSGD, Hierarchy
    from lightning_qmlhfl.simulation.engine import QMLHFLEngine
    from lightning_qmlhfl.simulation.stacked import upload_dims
    from lightning_qmlhfl.theory.latency import upload_bits
    from recipes.models import build_model

    model = build_model("cifar_cnn3")
    d, b = upload_dims(model)
    assert b > 0
    qs = [QSGD(8, 512), QSGD(4, bucket_size=None)]
    e = QMLHFLEngine(model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), Hierarchy.balanced([2, 2]),
                     [1, 1], qs, device="cpu")
    assert upload_bits(qs, d, b) == [e.upload_bits(1), e.upload_bits(2)]


def test_server_optim_group_from_the_command_line():
    from lightning_qmlhfl import Average, FedAdam, FedAvgM
    from recipes.simulation import build_server_optimizers

    cfg = _compose("mnist", ["server_optim.layers=[fedavgm,average,fedadam]", "server_optim.lr=[1.0,null,0.02]"])
    assert build_server_optimizers(cfg, 3) == [FedAvgM(1.0, 0.9), Average(), FedAdam(0.02)]
    assert build_server_optimizers(_compose("mnist", []), 3) == [Average()] * 3


def test_participation_availability_and_stragglers_from_the_command_line():
    from lightning_qmlhfl.federation.participation import Fraction, Full, UniformK
    from recipes.simulation import build_availability, build_participation

    cfg = _compose("mnist", ["participation.layers=[uniformk,full,full]", "participation.k=2",
                             "participation.over_select=0.5", "availability.unavailable=0.2",
                             "availability.dropout=0.1", "latency.compute_sigma=0.5", "latency.deadlines=[0.5,null,null]",
                             "latency.straggler=drop"])
    assert build_participation(cfg, 3) == [UniformK(2, over_select=0.5), Full(), Full()]
    a = build_availability(cfg)
    assert a.unavailable == 0.2 and a.dropout == 0.1
    lat = build_latency(cfg, 3)
    assert not lat.is_homogeneous and lat.deadline(1) == 0.5 and lat.deadline(2) is None
    default = _compose("mnist", [])
    assert build_participation(default, 3) == [Full()] * 3 and build_availability(default) is None
    assert build_latency(default, 3).is_homogeneous
    frac = _compose("mnist", ["participation.layers=fraction", "participation.f=0.1"])
    assert build_participation(frac, 3) == [Fraction(0.1)] * 3


def test_mobility_group_from_the_command_line():
    from lightning_qmlhfl.federation.mobility import Markov, RandomReassociation, Static
    from recipes.simulation import build_mobility

    h = build_hierarchy(_compose("mnist", []))
    m = build_mobility(_compose("mnist", ["mobility.model=random", "mobility.p=0.2", "mobility.failures.p=0.1",
                                          "mobility.failures.mode=fallback"]), h)
    assert isinstance(m, RandomReassociation) and m.p == 0.2 and m.failures.mode == "fallback"
    ring = build_mobility(_compose("mnist", ["mobility.model=markov", "mobility.ring_p=0.3", "mobility.every=1"]), h)
    assert isinstance(ring, Markov) and ring.transition.shape == (16, 16) and ring.every == 1
    assert build_mobility(_compose("mnist", []), h).is_static and isinstance(build_mobility(_compose("mnist", []), h),
                                                                            Static)
