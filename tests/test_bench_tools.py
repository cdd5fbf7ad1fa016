"""The benchmark tooling: bench/gpu_check.sh (its --dry-run, on this machine with or without a GPU),
scripts/setup.sh's options, and a tiny run of bench/engine.py with its GFLOP/s and GEMM-peak fields."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_engine():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "bench" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(WANDB_MODE="disabled", **extra)
    return env


STEPS = ("versions", "tests", "kernels_fp32", "kernels_bf16", "kernels_bucket512", "kernels_blocks", "engine",
         "main_job", "cifar_job")


def test_gpu_check_dry_run_passes(tmp_path: Path, data_root: Path) -> None:
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--python", sys.executable], cwd=REPO,
                         capture_output=True, text=True, timeout=200,
                         env=_env(OUT=str(tmp_path), QMLHFL_DATA=str(data_root)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "all checks passed" in out.stdout
    assert "MISSING" not in out.stdout
    for step in STEPS:
        assert f"  {step} " in out.stdout, f"step {step} not in the plan"
    assert "constraints-cuda.txt consistent" in out.stdout
    assert f"CIFAR job data: CIFAR-10 from {data_root.resolve()}/cifar-10-batches-py" in out.stdout
    assert "ok       carried size: tree" in out.stdout and "within the 64 MiB limit" in out.stdout
    assert (tmp_path / "dry_run" / "main_job_config.log").read_text().count("accelerator: gpu") == 1
    assert not (tmp_path / "steps.tsv").exists(), "a dry run must not run the steps"


def test_gpu_check_dry_run_with_wheels_and_the_cifar_excerpt(tmp_path: Path, data_root: Path) -> None:
    """The GPU machine's way: --wheels (a complete closure of metadata-only wheels, installed offline for real)
    and a data folder holding MNIST and the CIFAR-10 excerpt instead of CIFAR-10."""
    from bench.gpu.cifar_excerpt import write_excerpt
    from test_gpu_carry import CLOSURE, fake_wheel

    wheels, data = tmp_path / "wheels", tmp_path / "data"
    wheels.mkdir()
    for name, version, reqs in CLOSURE:
        fake_wheel(wheels, name, version, reqs)
    data.mkdir()
    (data / "MNIST").symlink_to(data_root.resolve() / "MNIST")
    write_excerpt(data_root, data / "cifar10_excerpt.npz", train=300, test=50)
    args = ["--dry-run", "--python", sys.executable, "--wheels", str(wheels), "--data", str(data), "--out",
            str(tmp_path / "out")]
    out = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=200, env=_env())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "closure complete for CPython 3.12 on Linux x86_64" in out.stdout
    assert f"ok       offline install of {wheels}" in out.stdout
    assert "datamodule._target_=bench.gpu.cifar_excerpt.CifarExcerpt" in out.stdout
    log = (tmp_path / "out" / "dry_run" / "cifar_data.log").read_text()
    assert "excerpt {'train': 270, 'val': 30, 'test': 50}" in log
    # an incomplete folder is named, with what is missing
    (wheels / "omegaconf-2.3.1-py3-none-any.whl").unlink()
    out = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=200, env=_env())
    assert out.returncode == 1 and "MISSING  wheels for Python 3.12" in out.stdout
    assert "PROBLEM omegaconf<2.4,>=2.2: required by hydra-core, not on the image and no wheel" in out.stdout


def test_gpu_check_dry_run_fails_when_something_is_missing(tmp_path: Path) -> None:
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=_env(OUT=str(tmp_path), QMLHFL_PYTHON=str(tmp_path / "no-python"),
                                              QMLHFL_DATA=str(tmp_path / "no-data")))
    assert out.returncode == 1
    assert f"MISSING  python {tmp_path / 'no-python'}" in out.stdout
    assert f"MISSING  data {tmp_path / 'no-data'}/MNIST/raw" in out.stdout
    assert "cifar10_excerpt.npz (python bench/gpu/prepare.py writes the excerpt)" in out.stdout
    for args, message in ((["--wheels"], "option --wheels needs a value"),
                          (["--steps", "tests,nope"], "--steps: unknown step 'nope'"),
                          (["--timeouts", "engine=0"], "--timeouts: expected NAME=SECONDS with SECONDS >= 1"),
                          (["--steps", "tests", "--timeouts", "engine=9"], "--timeouts: no step 'engine' in this run")):
        out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=30, env=_env(OUT=str(tmp_path)))
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_gpu_check_steps_and_timeouts_select_the_plan(tmp_path: Path, data_root: Path) -> None:
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--python", sys.executable, "--steps",
                          "main_job,tests", "--timeouts", "tests=61", "--engine-configs", "mlp100:vmap"], cwd=REPO,
                         capture_output=True, text=True, timeout=200,
                         env=_env(OUT=str(tmp_path), QMLHFL_DATA=str(data_root)))
    assert out.returncode == 0, out.stdout[-3000:]
    plan = [line.split()[0] for line in out.stdout.split("would run:")[1].split("(step timeouts")[0].splitlines()
            if line.strip()]
    assert plan == ["main_job", "tests"]
    assert "tests              timeout   61s" in out.stdout


def test_scripts_reject_unknown_options() -> None:
    for script in ("bench/gpu_check.sh", "scripts/setup.sh"):
        out = subprocess.run(["bash", script, "--no-such-option"], cwd=REPO, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2 and "--no-such-option" in out.stderr, (script, out.stderr)
    out = subprocess.run(["bash", "scripts/setup.sh", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--cuda" in out.stdout


def test_bench_models_and_flop_count() -> None:
    engine = _bench_engine()
    counts = {name: sum(p.numel() for p in cls().parameters()) for name, cls in engine.MODELS.items()}
    assert counts == {"lenet": 21_840, "mlp": 159_010, "cifar_small": 225_034}
    x = torch.randn(2, *engine.INPUTS["cifar_small"][1])
    assert engine.CifarSmall()(x).shape == (2, 10)
    # MLP 784-200-10, batch 32: forward 2*32*(784*200 + 200*10); backward: both weight gradients (the same) plus
    # the input gradient of fc2 (2*32*10*200); the input of fc1 needs no gradient
    fwd = 2 * 32 * (784 * 200 + 200 * 10)
    assert engine.count_flops("mlp") == 2 * fwd + 2 * 32 * 10 * 200
    # the default set (no --configs) is the one the RESULTS tables compare across sessions
    assert engine.DEFAULT == ["mlp100:naive", "mlp100:vmap", "mlp100:loop", "lenet100:naive", "lenet100:vmap",
                              "lenet100:loop", "mlp1000:naive", "mlp1000:vmap"]


def test_engine_bench_smoke_reports_gflops(tmp_path: Path) -> None:
    jsonl = tmp_path / "engine.jsonl"
    cmd = [sys.executable, "bench/engine.py", "--configs", "mlp100:naive,mlp100:vmap,mlp100:vmap+bf16",
           "--branching", "2,2,2",
           "--rounds", "1", "--warm", "2", "--gemm-size", "512", "--gemm-reps", "2", "--jsonl", str(jsonl)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout, out.stdout[-3000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["name"] for r in records] == ["mlp100:naive", "mlp100:vmap", "mlp100:vmap+bf16"]
    assert [r["precision"] for r in records] == ["32-true", "32-true", "bf16-mixed"]
    for r in records:
        assert r["devices"] == 8 and r["device"] == "cpu"
        assert r["flops_per_device_step"] > 0
        assert r["gflops_per_s"] > 0 and r["best_gflops_per_s"] >= r["gflops_per_s"]
        assert r["fp32_peak_gflops"] > 0 and r["frac_fp32_peak"] > 0
        assert r["gflops_per_s"] == pytest.approx(r["flops_per_device_step"] * r["device_steps_per_s"] / 1e9)
        if r["bf16_peak_gflops"] is None:  # measured, not assumed: bf16 only counts when it beats fp32
            assert r["frac_bf16_peak"] is None and "not" in r["bf16_note"]
        else:
            assert r["bf16_peak_gflops"] > r["fp32_peak_gflops"] and r["frac_bf16_peak"] > 0
    assert records[0]["fp32_peak_gflops"] == records[1]["fp32_peak_gflops"], "one peak measurement per run"
    assert "| GFLOP/s | of fp32 peak | of bf16 peak |" in out.stdout
    assert "GEMM peaks (this run, 512x512 matmul" in out.stdout


def test_scaleout_fit_and_projection_arithmetic() -> None:
    spec = importlib.util.spec_from_file_location("bench_scaleout", REPO / "bench" / "scaleout.py")
    so = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(so)
    pts = [(b, 2e-4 + 1e-9 * b) for b in (8, 1024, 2**20, 2**26)]
    fit = so.fit_alpha_beta(pts)
    assert abs(fit["alpha_s"] - 2e-4) < 1e-9 and abs(fit["beta_s_per_byte"] - 1e-9) < 1e-15
    # the projection: compute a + b n from the two single-process runs, comm interpolated from the points
    d = 1000
    points = [{"kind": k, "bytes": b, "seconds": 2e-4 + 1e-9 * b} for k in ("all_gather", "all_reduce")
              for b in (8, 1024, 2**20, 2**26)]
    assert abs(so.interpolate_time([(p["bytes"], p["seconds"]) for p in points[:4]], 2**20) - (2e-4 + 1e-9 * 2**20)) < 1e-15
    scaling = {"config": "mlp100-cut0", "t1_s": 2.2, "t_half_s": 1.2, "t2_s": None, "single": {"num_params": d},
               "half": {"devices": 50},
               "ranks": [{"per_round": {"all_gather": [4, 4 * 50 * d * 4], "sizes": [4, 32],
                                        "all_reduce_max": [7, 112]}}]}
    comm = {"points": points}
    t = so.interpolate_time
    pts = [(p["bytes"], p["seconds"]) for p in points[:4]]
    expected_comm = 4 * t(pts, 50 * d * 4) + 4 * t(pts, 8) + 7 * t(pts, 16)
    scaling["t2_s"] = 1.2 + expected_comm
    proj = so.project(scaling, comm, [2, 4])
    assert proj[0]["world"] == 2 and abs(proj[0]["error"]) < 1e-12
    assert abs(proj[0]["fixed_s"] - 0.2) < 1e-12 and abs(proj[1]["compute_s"] - (0.2 + 0.02 * 25)) < 1e-12
    # at W = 4 a rank contributes a quarter of the uploads, three times
    assert abs(proj[1]["comm_s"] - 3 * (4 * t(pts, 25 * d * 4) + 4 * t(pts, 8) + 7 * t(pts, 16))) < 1e-12


def test_fit_bench_smoke_compares_trainer_fit_with_the_engine() -> None:
    cmd = [sys.executable, "bench/fit.py", "--configs", "mlp100:vmap+bf16", "--branching", "2,2,2", "--rounds", "1",
           "--warm", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| mlp100:vmap+bf16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    engine, fit = (float(c.replace(",", "")) for c in cells[1:3])
    # the table rounds the rates to whole steps/s and computes the ratio from the unrounded ones
    assert engine > 0 and fit > 0 and cells[3].endswith("x")
    # printed to 2 decimals, from rates that the table shows rounded to whole steps/s (at a few dozen steps/s on a
    # loaded machine the rounding alone moves the ratio by more than 1 %)
    low, high = (fit - 0.5) / (engine + 0.5), (fit + 0.5) / (engine - 0.5)
    assert low - 0.005 <= float(cells[3][:-1]) <= high + 0.005, (cells, low, high)
    modes = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("  {")]
    assert [m["mode"] for m in modes] == ["engine", "fit", "fit"]
    bad = subprocess.run([sys.executable, "bench/fit.py", "--configs", "mlp100:naive"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=_env())
    assert bad.returncode != 0 and "naive configuration" in bad.stderr


def test_participation_breakdown_parts_add_up_to_the_round() -> None:
    """bench/participation_fit.py --breakdown: the parts are disjoint (they add up to the round) and each one was
    timed (the module logs, so self.log is not empty; the loop around the strategy's hooks takes some time)."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "participation_fit.py"), "--one", "50of50",
                          "--warm", "0", "--rounds", "1", "--threads", "1", "--breakdown"],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    parts = rec["parts_s"]
    assert set(parts) == {"fwd+bwd", "update", "aggregate", "batches", "self.log", "strategy other",
                          "Lightning loop"}
    assert sum(parts.values()) == pytest.approx(rec["round_seconds"][0], rel=1e-9)
    assert all(v > 0 for v in parts.values()), parts


def test_profile_core_mlp_forms_agree_and_run():
    """bench/profile_core.py's two forms of the MLP's layers (one F.linear per client; one baddbmm per layer over
    the stacked clients) compute the same gradients, and the MLP profile runs end to end on a small round."""
    spec = importlib.util.spec_from_file_location("bench_profile_core", REPO / "bench" / "profile_core.py")
    profile_core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_core)

    per_client, batched = profile_core.mlp_forms(clients=3)
    for a, b in zip(per_client(), batched()):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    buf, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            profile_core.main(["--model", "mlp", "--rounds", "1", "--executors", "vmap", "--no-fit",
                               "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    out = buf.getvalue()
    assert "mlp client-step (batch 32): 20.45 MFLOP" in out
    assert "one baddbmm per layer (stacked)" in out and "engine, vmap executor" in out
