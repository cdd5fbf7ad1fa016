"""Run directories: unique when runs start together, locked while a run lives (a second run into it stops at once
naming the holder; ``ckpt_path=last`` passes it over), cleaned of the temporary files of killed writes; summary.json
and history.json written atomically, also when training stops on a NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipes.config import compose
from recipes.rundir import LOCK_FILE, RunDirectory, RunDirectoryInUse, RunLock, in_use

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
USER = "helpers.user_modules"
BLOBS = ["trainer.enable_progress_bar=false", "logger=csv", f"datamodule._target_={USER}.BlobsDataModule",
         f"model._target_={USER}.TinyNet", "hierarchy=two_layer", "hierarchy.branching=[2,2]",
         "hierarchy.taus=[1,1]"]


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", QMLHFL_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipes.mnist", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append((p.returncode, stdout, stderr))
    return out


def test_two_runs_into_one_directory_the_second_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "shared"
    procs = [_start([*BLOBS, "rounds=3", f"seed={s}", f"hydra.run.dir={run_dir}"], tmp_path) for s in (1, 2)]
    results = _finish(procs)
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], [(r[0], r[2][-2000:]) for r in results]
    winner, loser = (results[0], results[1]) if results[0][0] == 0 else (results[1], results[0])
    seed = 1 if winner is results[0] else 2
    error = loser[2].strip().splitlines()[-1]
    assert error.startswith(f"error: run directory {run_dir.resolve()} is in use by another run (pid ")
    assert "recipes.mnist" in error and "Traceback" not in loser[2]
    assert OmegaConf.load(run_dir / "config.yaml").seed == seed  # the survivor's own config
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == seed


def test_runs_started_together_get_directories_of_their_own(tmp_path):
    procs = [_start([*BLOBS, "rounds=1", f"seed={s}"], tmp_path) for s in (1, 2, 3)]
    results = _finish(procs)
    assert [r[0] for r in results] == [0, 0, 0], [r[2][-2000:] for r in results]
    dirs = sorted((tmp_path / "outputs" / "mnist").iterdir())
    assert len(dirs) == 3
    assert sorted(OmegaConf.load(d / "config.yaml").seed for d in dirs) == [1, 2, 3]
    for d in dirs:
        seed = OmegaConf.load(d / "config.yaml").seed
        assert json.loads((d / "summary.json").read_text())["seed"] == seed and (d / "csv" / "metrics.csv").is_file()


@pytest.fixture
def held_elsewhere():
    """Hold a directory's run lock from another process (as a running run would)."""
    procs = []

    def hold(directory: Path) -> int:
        directory.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'here', "
                "'since': 'now', 'command': 'recipes.mnist seed=5'}).encode()); print('held', flush=True); "
                "time.sleep(120)")
        p = subprocess.Popen([sys.executable, "-c", code, str(directory / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_directory_in_use_is_refused_and_passed_over_by_ckpt_path_last(tmp_path, held_elsewhere):
    from recipes.resume import find_last_checkpoint, write_run_config
    from recipes.train import run

    outputs = tmp_path / "outputs" / "mnist"
    cfg = compose("mnist", [*BLOBS, "rounds=1", "logger=none"])
    run(cfg, outputs / "a")
    config = OmegaConf.to_container(compose("mnist", [*BLOBS, "rounds=1", "logger=none"]), resolve=True)
    assert find_last_checkpoint([outputs], config) == outputs / "a" / "last.ckpt"
    pid = held_elsewhere(outputs / "a")
    assert in_use(outputs / "a") == f"pid {pid} on here, since now: recipes.mnist seed=5"
    with pytest.raises(RunDirectoryInUse, match=f"is in use by another run \\(pid {pid} on here"):
        RunLock.claim(outputs / "a")
    with pytest.raises(FileNotFoundError, match=f"(?s)that no running run holds.*in use by a running run: pid {pid}"):
        find_last_checkpoint([outputs], config)
    (outputs / "b").mkdir()  # a free run of the same config: taken instead, although older
    torch.save({"state_dict": {"w": torch.ones(2)}}, outputs / "b" / "last.ckpt")  # (an intact checkpoint)
    write_run_config(outputs / "b", config)
    os.utime(outputs / "b" / "last.ckpt", (1, 1))
    assert find_last_checkpoint([outputs], config) == outputs / "b" / "last.ckpt"


def test_a_lock_is_free_again_once_its_process_is_gone(tmp_path, held_elsewhere):
    held_elsewhere(tmp_path / "run")
    assert in_use(tmp_path / "run") is not None
    subprocess.run([sys.executable, "-c", "pass"])  # (unrelated processes change nothing)
    assert in_use(tmp_path / "run") is not None
    lock = RunLock.claim(tmp_path / "free")
    assert in_use(tmp_path / "free") is None  # this process's own lock is not "another run"
    lock.release()


def test_stale_temporary_files_are_removed_when_a_run_starts_in_the_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [run_dir / ".last.ckpt.k2j4h6g8.tmp", run_dir / ".summary.json.a1b2c3d4.tmp",
             run_dir / ".history.json.zz_9yy8x.tmp"]
    kept = [run_dir / "notes.tmp", run_dir / "last.ckpt"]
    for p in stale + kept:
        p.write_bytes(b"half")
    cfg = compose("mnist", BLOBS)
    with RunDirectory(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True)) as rd:
        assert rd.path == run_dir.resolve() and in_use(run_dir) is None
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert ".last.ckpt.k2j4h6g8.tmp: the temporary file of a write that did not finish" in capsys.readouterr().err
    assert (run_dir / "config.yaml").is_file()


def test_json_outputs_are_written_atomically(tmp_path, monkeypatch):
    from recipes import files

    path = tmp_path / "summary.json"
    files.write_json_atomic(path, {"rounds": 1})

    def dies(fd):  # killed while the new file is being written
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        files.write_json_atomic(path, {"rounds": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"rounds": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_outputs_go_through_the_atomic_writer(tmp_path, monkeypatch):
    from recipes import outputs
    from recipes.train import run

    written = []
    real = outputs.write_json_atomic
    monkeypatch.setattr(outputs, "write_json_atomic", lambda p, d: (written.append(Path(p).name), real(p, d)))
    run(compose("mnist", [*BLOBS, "rounds=1", "logger=none"]), tmp_path)
    assert written == ["summary.json", "history.json"]


def test_a_nan_stop_writes_summary_and_history_with_the_reason(tmp_path):
    from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError
    from recipes.train import run

    cfg = compose("mnist", [*BLOBS, "rounds=4", f"model._target_={USER}.NaNAt", "+model.nan_step=3"])
    with pytest.raises(NonFiniteUpdateError):
        run(cfg, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    h = json.loads((tmp_path / "history.json").read_text())
    assert s["stop_reason"].startswith("NonFiniteUpdateError: ") and "global round 2 (0-based)" in s["stop_reason"]
    assert s["stopped_early"] and s["rounds"] == 2 and [r["round"] for r in h] == [1, 2]


def test_a_nan_stop_on_the_command_line_is_one_line_and_a_failure(tmp_path):
    p = _start([*BLOBS, "rounds=4", f"model._target_={USER}.NaNAt", "+model.nan_step=3",
                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    code, out, err = _finish([p])[0]
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: NonFiniteUpdateError: ")
    assert "stopped: NonFiniteUpdateError" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stop_reason"]
