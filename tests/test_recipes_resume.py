"""Resuming recipe runs: ``ckpt_path=PATH`` / ``ckpt_path=last`` continue bit for bit, in the resumed run's
directory, with the history, summary, plots and CSV log continued (recipes/resume.py)."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)
import torch

from recipes.checkpoint_io import AtomicCheckpointIO
from recipes.config import CONF_DIR, compose
from recipes.resume import config_diff, find_last_checkpoint, read_csv_rows, resume_argv, write_run_config

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# 8 devices, 4 local steps per round, 4 rounds = 16 steps; MLP (vmap); validation split, per-device evaluation with
# personalisation, an LR plateau (scheduler state must resume too), CSV logging.
TINY = ["model=mlp", "dataset.train_subset=1200", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
        "hierarchy.taus=[2,1,2]", "trainer.rounds=4", "trainer.progress_bar=false", "eval.local_fraction=0.2",
        "eval.personalized=true", "trainer.lr_plateau.patience=0", "logger=csv", "seed=3"]
STEPS_PER_ROUND, ROUNDS = 4, 4


def _compose(overrides: list[str]):
    return compose("mnist", overrides)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.usefixtures("data_env")
def test_sigkill_at_a_random_step_then_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    from recipes.train import run

    monkeypatch.setenv("QMLHFL_THREADS", "2")
    kill = random.Random().randint(STEPS_PER_ROUND + 1, STEPS_PER_ROUND * ROUNDS - 1)
    why = f"(killed after local step {kill})"
    full_dir, runs = tmp_path / "reference" / "run", tmp_path / "outputs"
    full = run(_compose(TINY), full_dir)

    # the same run as a subprocess through the command line, SIGKILLed after local step `kill`
    env = dict(os.environ, QMLHFL_THREADS="2", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    broken = runs / "broken"
    out = subprocess.run([sys.executable, "-m", "recipes.mnist", f"hydra.run.dir={broken}", *TINY,
                          f"trainer.callbacks=[{{_target_:helpers.kill.KillAt,step:{kill}}}]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == -9, (why, out.returncode, out.stderr[-3000:])
    assert (broken / "last.ckpt").is_file() and not (broken / "summary.json").exists(), why
    assert not [p.name for p in broken.iterdir() if p.name.endswith(".tmp")], why  # no half-written checkpoint
    ck = torch.load(broken / "last.ckpt", weights_only=True)
    done = ck["qmlhfl"]["engine"]["state"]["counters"]["round"]
    assert done == (kill - 1) // STEPS_PER_ROUND, why  # the last completed round before the kill

    # resume in another process state: `ckpt_path=last` finds the newest last.ckpt of a run with this config
    resumed = run(_compose([*TINY, "ckpt_path=last"]), runs / "fresh")
    assert not (runs / "fresh").exists(), "a resumed run writes into the resumed run's directory"
    assert resumed["sessions"] == [{"resumed_from": None, "at_round": 0},
                                   {"resumed_from": str(broken / "last.ckpt"), "at_round": done}], why
    for key in full:
        if key not in ("wall_time_s", "sessions", "config"):
            assert resumed[key] == full[key], (key, why)
    assert json.loads((broken / "history.json").read_text()) == json.loads((full_dir / "history.json").read_text())
    a, b = (torch.load(d / "last.ckpt", weights_only=True) for d in (full_dir, broken))
    for x, y in ((a["qmlhfl"]["engine"]["state"][k], b["qmlhfl"]["engine"]["state"][k]) for k in a["qmlhfl"]["engine"]["state"] if k.startswith("params/")):
        assert torch.equal(x, y), why
    assert a["callbacks"]["LRPlateau"] == b["callbacks"]["LRPlateau"], why  # the plateau scheduler's state
    assert a["callbacks"]["LRPlateau"]["scheduler"]["last_epoch"] == ROUNDS
    assert a["optimizer_states"] == b["optimizer_states"], why
    best_a, best_b = (torch.load(d / "best.ckpt", weights_only=True)["state_dict"] for d in (full_dir, broken))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a), why
    # the CSV log continues: the rows of the checkpointed rounds are kept, the rest logged again, none twice
    rows_a, rows_b = _csv(full_dir / "csv" / "metrics.csv"), _csv(broken / "csv" / "metrics.csv")
    assert rows_a == rows_b, why
    for png in ("accuracy.png", "local_accuracy.png"):
        assert (broken / png).read_bytes()[:4] == b"\x89PNG"


def test_resume_argv_points_hydra_at_the_checkpoints_run_directory(tmp_path):
    outputs = tmp_path / "outputs" / "mnist"
    cfg = _compose(["trainer.rounds=3"])
    from omegaconf import OmegaConf

    job = OmegaConf.to_container(cfg, resolve=True)
    old, other, newest_other = outputs / "2026-01-01_00-00-00", outputs / "2026-01-02", outputs / "2026-01-03"
    for d, c in ((old, job), (other, {**job, "seed": 7}), (newest_other, {**job, "seed": 8})):
        d.mkdir(parents=True)
        write_run_config(d, c)
        torch.save({"state_dict": {"w": torch.ones(2)}}, d / "last.ckpt")  # (an intact checkpoint)
    os.utime(old / "last.ckpt", (1, 1))  # the oldest, but the only run with this config
    (old / ".hydra").mkdir()
    (old / ".hydra" / "resume-1").mkdir()
    run_dir = f"hydra.run.dir={outputs}/NEW"
    sweep = f"hydra.sweep.dir={tmp_path}/multirun/mnist/DATE"  # searched too: multirun/mnist/*/*/last.ckpt
    argv = resume_argv([run_dir, sweep, "trainer.rounds=6", "ckpt_path=last"], CONF_DIR, "mnist")  # more rounds: ok
    assert argv == [sweep, "trainer.rounds=6", f"ckpt_path={old / 'last.ckpt'}", f"hydra.run.dir={old}",
                    "hydra.output_subdir=.hydra/resume-2"]
    assert resume_argv([run_dir, "trainer.rounds=3"], CONF_DIR, "mnist") == [run_dir, "trainer.rounds=3"]
    assert resume_argv(["ckpt_path=null"], CONF_DIR, "mnist") == ["ckpt_path=null"]
    explicit = resume_argv([f"ckpt_path={other / 'last.ckpt'}"], CONF_DIR, "mnist")
    assert f"hydra.run.dir={other}" in explicit
    with pytest.raises(FileNotFoundError, match=r"(?s)none of the 3 last.ckpt .*\(seed: 0 -> 9\)"):
        resume_argv([run_dir, sweep, "seed=9", "ckpt_path=last"], CONF_DIR, "mnist")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resume_argv([f"ckpt_path={tmp_path / 'nope.ckpt'}"], CONF_DIR, "mnist")
    with pytest.raises(SystemExit, match="cannot be combined with --multirun"):
        resume_argv(["-m", "seed=0,1", "ckpt_path=last"], CONF_DIR, "mnist")
    with pytest.raises(FileNotFoundError, match="no last.ckpt below"):
        find_last_checkpoint([tmp_path / "empty"], job)


def test_ckpt_path_last_passes_over_a_corrupt_checkpoint_for_the_previous_good_one(tmp_path):
    from lightning_qmlhfl.strategy.integrity import CHECKSUM_KEY, payload_checksum

    config = {"name": "mnist", "seed": 0}
    run = tmp_path / "outputs" / "a"
    run.mkdir(parents=True)
    write_run_config(run, config)
    good = {"state_dict": {"w": torch.arange(4.0)}}
    good[CHECKSUM_KEY] = payload_checksum(good)
    torch.save(good, run / "best.ckpt")
    os.utime(run / "best.ckpt", (1, 1))
    flipped = {"state_dict": {"w": torch.arange(4.0) + 1}, CHECKSUM_KEY: good[CHECKSUM_KEY]}  # tensors changed
    torch.save(flipped, run / "last.ckpt")
    with pytest.warns(UserWarning, match=r"checkpoint .*last\.ckpt is corrupt or incomplete \(its tensors do not "
                                         r"match the checksum.*resuming from the previous good checkpoint "
                                         r".*best\.ckpt instead"):
        assert find_last_checkpoint([tmp_path / "outputs"], config) == run / "best.ckpt"
    (run / "best.ckpt").write_bytes(b"")  # nothing intact left in that run
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt \(corrupt or incomplete, and no intact checkpoint"):
        find_last_checkpoint([tmp_path / "outputs"], config)


def test_a_full_disk_while_writing_a_checkpoint_is_named(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    io = AtomicCheckpointIO()

    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 3998")

    monkeypatch.setattr(torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"round": 2}, tmp_path / "last.ckpt")
    assert info.value.errno == errno.ENOSPC and "no space left on device" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))  # room left: not a full disk
    with pytest.raises(RuntimeError, match="unexpected pos"):
        io.save_checkpoint({"round": 2}, tmp_path / "last.ckpt")


def test_config_diff_ignores_what_may_change_on_resume():
    a = {"seed": 0, "trainer": {"rounds": 3, "executor": "auto"}, "logger": {"name": "csv"}, "ckpt_path": None}
    b = {"seed": 0, "trainer": {"rounds": 9, "executor": "loop"}, "logger": {"name": "wandb"}, "ckpt_path": "x"}
    assert config_diff(a, b) == ["trainer.executor: 'auto' -> 'loop'"]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"round": 1}, path)
    assert torch.load(path, weights_only=True) == {"round": 1}

    def dies(obj, f):  # killed half-way through writing the next one
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"round": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_csv_rows_after_the_checkpoint_are_dropped(tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text("epoch,step,train_loss,val_acc\n0,3,1.5,\n0,3,,0.5\n1,7,1.2,\n1,7,,0.6\n2,9,1.1,\n")
    assert read_csv_rows(f, last_epoch=1) == [(3, {"epoch": 0, "train_loss": 1.5}), (3, {"epoch": 0, "val_acc": 0.5}),
                                              (7, {"epoch": 1, "train_loss": 1.2}), (7, {"epoch": 1, "val_acc": 0.6})]
