"""bench/peers (this project against Flower and pfl-research): the driver runs on the tiny configuration and writes a
sound record per system; bad options are refused with one line. A benchmark, not a timed test: nothing here
checks a speed.

This project always runs. A peer runs only when its venv exists under bench/peers/.envs/ (built by
``python bench/peers/run.py --build-only``, or by the first benchmark run); otherwise its test is skipped with the
reason. With ``QMLHFL_PEERS_BUILD=1`` the driver builds a missing venv instead (downloads from PyPI, ~1-3 min per
peer); without it nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "bench" / "peers"


def _load(name: str):
    sys.path.insert(0, str(PEERS_DIR))
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """One driver invocation, tiny configuration, one core: {system: record} plus the skip reasons."""
    envs = _load("envs")
    build = os.environ.get("QMLHFL_PEERS_BUILD") == "1"
    peers, skipped = [], {}
    for peer in ("pfl", "flower"):
        if envs.env_info(peer, cuda=False) is not None or build:
            peers.append(peer)
        else:
            skipped[peer] = (f"no {peer} venv at {envs.env_dir(peer, False)}: build it with "
                             f"`python bench/peers/run.py --build-only` or set QMLHFL_PEERS_BUILD=1")
    tmp = tmp_path_factory.mktemp("peers")
    cmd = [sys.executable, str(PEERS_DIR / "run.py"), "--tiny", "--threads", "1",
           "--peers", ",".join(peers) or "none", "--out", str(tmp / "out"), "--logs", str(tmp / "logs"),
           "--cache", str(tmp / "cache"), "--data", str(data_root)]
    if not build:
        cmd.append("--no-build")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800 if build else 600)
    lines = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()] \
        if (tmp / "out.jsonl").exists() else []
    meta = lines[0] if lines else {}
    for peer, reason in meta.get("skipped_peers", {}).items():
        skipped[peer] = reason
    return {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr, "meta": meta, "skipped": skipped,
            "runs": {r["system"]: r for r in lines[1:]}, "cache": tmp / "cache", "md": tmp / "out.md"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_record(run: dict, system: str) -> None:
    common = _load("common")
    if system in run["skipped"]:
        pytest.skip(run["skipped"][system])
    assert system in run["runs"], f"no record of {system}; rc {run['rc']}\n{run['stderr'][-3000:]}"
    rec = run["runs"][system]
    assert rec["status"] == "ok", f"{rec['status']}\nlog: {Path(rec['log']).read_text()[-3000:]}"
    missing = [k for k in (*common.RECORD_FIELDS, "wall_s", "peak_rss_mb", "peak_pss_mb", "peak_procs",
                           "load_before", "load_after", "startup_s", "workload_check") if k not in rec]
    assert not missing, f"{system} record lacks {missing}"
    assert (rec["workload"], rec["clients"], rec["per_round"], rec["rounds"]) == ("tiny", 4, 4, 2)
    assert rec["workload_check"] == "ok", rec["workload_check"]
    assert len(rec["round_s"]) == 2 and all(t > 0 for t in rec["round_s"])
    assert rec["steady_client_steps_per_s"] > 0 and rec["train_s"] > 0
    assert rec["wall_s"] > rec["train_s"]
    # 2 rounds x 10 steps of 4 clients from the shared initial weights: above chance, far below convergence
    assert 0.15 < rec["accuracy"] <= 1.0 and math.isfinite(rec["test_loss"])
    assert rec["peak_rss_mb"] > 50 and rec["peak_procs"] >= 1 and rec["memory_samples"] >= 1
    assert rec["pinned_cores"] == sorted(os.sched_getaffinity(0))[:1]
    cache = run["cache"]
    assert rec["partition_sha256"] == _sha256(common.partition_file(cache, 4, 0))
    assert rec["init_sha256"] == _sha256(common.init_file(cache, "lenet", 0))
    assert rec["data_sha256"] == _sha256(common.data_file(cache))


def test_this_project_tiny(tiny_run: dict) -> None:
    _check_record(tiny_run, "qmlhfl")
    rec = tiny_run["runs"]["qmlhfl"]
    assert rec["executor"] == "loop" and rec["upload_bits_per_parameter"] == 32.0
    assert rec["forwards"] == "ordered"  # run.py's default: the project's own
    assert "| tiny | lenet | 1 |" in tiny_run["md"].read_text()


@pytest.mark.parametrize("peer", ["pfl", "flower"])
def test_peer_tiny(tiny_run: dict, peer: str) -> None:
    _check_record(tiny_run, peer)
    rec = tiny_run["runs"][peer]
    if peer == "flower":
        assert rec["peak_procs"] > 1, "Ray's processes must be in the measured tree"
        assert rec["framework_version"].startswith("1.42.")
    else:
        assert rec["framework_version"].startswith("0.6.")
    q = tiny_run["runs"]["qmlhfl"]
    for key in ("partition_sha256", "init_sha256", "data_sha256"):
        assert rec[key] == q[key], f"{peer} read another {key.split('_')[0]} file than this project"
    assert "x pfl" in tiny_run["md"].read_text()


@pytest.mark.parametrize("argv, named", [
    (["--workloads", "100of10"], "'100of10'"),
    (["--models", "resnet"], "'resnet'"),
    (["--threads", "0"], "--threads 0"),
    (["--threads", "two"], "'two'"),
    (["--peers", "fedml"], "'fedml'"),
    (["--pfl-modes", "horovod"], "'horovod'"),
    (["--device", "tpu"], "'tpu'"),
    (["--rounds", "0"], "--rounds 0"),
    (["--threads", "4096"], "--threads 4096"),
    (["--competing-load", "sometimes"], "'sometimes'"),
    (["--forwards", "parallel"], "'parallel'"),
])
def test_bad_options_one_line(argv: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    run = _load("run")
    with pytest.raises(SystemExit) as e:
        run.parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and ("allowed" in err[0] or "must" in err[0] or "use at most"
                                                  in err[0]), err
