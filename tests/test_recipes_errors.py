"""A bad config value on the command line: one line naming the key, the value and what is allowed, exit status 1,
no traceback (a traceback only with HYDRA_FULL_ERROR=1); nothing is trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


BLOBS = ("datamodule._target_=helpers.user_modules.BlobsDataModule", "model._target_=helpers.user_modules.TinyNet",
         "hierarchy=two_layer", "hierarchy.branching=[2,2]", "hierarchy.taus=[1,1]")


def _cli(tmp_path: Path, *overrides: str, full_error: bool = False, base: tuple[str, ...] = BLOBS
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", QMLHFL_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "-m", "recipes.mnist", f"hydra.run.dir={tmp_path / 'run'}", *base,
                           *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, line", [
    (["trainer.rounds=2.5"], "error: trainer.rounds must be an integer >= 1, got 2.5"),  # was: 2 rounds, silently
    (["rounds=2.5"], "error: rounds must be an integer >= 1, got 2.5"),
    (["trainer.rounds=abc"], "error: trainer.rounds must be an integer >= 1, got 'abc'"),
    (["seed=xyz"], "error: seed must be an integer >= 0, got 'xyz'"),
    (["hierarchy.taus=[1,x]"], "error: hierarchy.taus[1] must be an integer >= 1, got 'x'"),
    (["latency.compute_time=-1"], "error: latency.compute_time must be a finite number > 0, got -1"),
    (["deadline=soon"], "error: deadline must be a finite number > 0, got 'soon'"),
    (["monitor_mode=up"], "error: monitor_mode must be auto, max or min, got 'up'"),
    (["eval.test_every=-1"], "error: eval.test_every must be an integer >= 0, got -1"),
    (["partition.alpha=abc"], "error: partition.alpha='abc': Dirichlet alpha must be a finite number > 0 (large values approach an IID split; use IID() for one), got 'abc'"),
    (["compressor.layers=topk", "compressor.ratio=abc"], "error: compressor.ratio='abc': TopK ratio must be"),
    (["trainer.devices=2"], "error: trainer.devices=2 needs strategy=qmlhfl_ddp"),
    (["+model.hiden=7"], "error: model._target_=helpers.user_modules.TinyNet does not take hiden (model.hiden=7)"),
])
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, overrides, line):
    out = _cli(tmp_path, *overrides)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(line), last
    assert not (tmp_path / "run" / "last.ckpt").exists() and not (tmp_path / "run" / "history.json").exists()


def test_a_learning_rate_that_is_not_a_number_is_named(tmp_path):
    out = _cli(tmp_path, "model.lr=fast", base=())  # the built-in LeNet; refused before any data is read
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: model.lr must be a number, got 'fast'"


def test_a_schedule_file_key_that_is_not_an_integer_is_named(tmp_path):
    schedule = tmp_path / "moves.json"
    schedule.write_text(json.dumps({"boundaries": {"0": [0, 0, 1, 1], "x": [1, 1, 0, 0]}}))
    out = _cli(tmp_path, "mobility.model=schedule", f"mobility.file={schedule}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: mobility.file={schedule}: the key 'x' of \"boundaries\" is not an integer (keys are boundary "
        f"indices: \"0\", \"1\", ...)")


def test_renamed_keys_warn_in_one_line_each(tmp_path):
    out = _cli(tmp_path, "trainer.rounds=abc", "trainer.progress_bar=false")
    warnings = sorted(ln for ln in out.stderr.splitlines() if "FutureWarning" in ln)
    assert warnings == [
        "FutureWarning: trainer.progress_bar=False: this key has moved, use trainer.enable_progress_bar (the old "
        "name works for now)",
        "FutureWarning: trainer.rounds='abc': this key has moved, use rounds (the old name works for now)"]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    out = _cli(tmp_path, "seed=xyz", full_error=True)
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "ConfigError: seed must be an integer >= 0, got 'xyz'" in out.stderr
