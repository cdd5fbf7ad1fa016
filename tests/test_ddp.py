"""QMLHFLDDPStrategy across real processes (Lightning's DDP launcher, gloo on CPU, explicit ports, timeouts)
against the single-process strategy: the same run, number for number, and checkpoints that cross world sizes.

Every run is a subprocess of ``helpers/ddp_run.py``; independent runs start together to share the wall time.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.multiprocess

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "helpers", "ddp_run.py")
LIMIT_S = 240


def _launch(out: str, *args: str, port: int) -> subprocess.Popen:
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("LOCAL_RANK", None)
    log = open(os.path.join(out, "log.txt"), "w")
    return subprocess.Popen([sys.executable, SCRIPT, out, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    deadline = time.monotonic() + LIMIT_S
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            codes[name] = "timeout"
    return codes


def _log(out: str) -> str:
    with open(os.path.join(out, "log.txt")) as f:
        return f.read()


def _first_round_ckpt(out: str) -> str:
    found = sorted(glob.glob(os.path.join(out, "ckpt", "epoch=1-*.ckpt")))
    assert found, os.listdir(os.path.join(out, "ckpt"))
    return found[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    names = ("single", "full", "sharded", "kill", "from_full", "from_sharded", "after_kill", "nan")
    d = {k: str(root / k) for k in names}
    first = {"single": _launch(d["single"], "single", port=29611),
             "full": _launch(d["full"], "ddp", "full", port=29612),
             "sharded": _launch(d["sharded"], "ddp", "sharded", port=29613),
             "kill": _launch(d["kill"], "ddp", "full", "kill", port=29614)}
    codes = _wait(first)
    for name in ("single", "full", "sharded"):
        assert codes[name] == 0, f"{name} exited {codes[name]}:\n{_log(d[name])[-3000:]}"
    second = {"from_full": _launch(d["from_full"], "single", _first_round_ckpt(d["full"]), port=29615),
              "from_sharded": _launch(d["from_sharded"], "single", _first_round_ckpt(d["sharded"]), port=29616),
              "after_kill": _launch(d["after_kill"], "ddp", "full", _first_round_ckpt(d["kill"]), port=29617),
              "nan": _launch(d["nan"], "ddp", "full", "nan", port=29618)}
    codes.update(_wait(second))
    return d, codes


def _final(out: str) -> dict:
    return torch.load(os.path.join(out, "final.pt"), weights_only=False)


def _assert_same_run(a: dict, b: dict) -> None:
    ea, eb = a["engine"]["state"], b["engine"]["state"]
    for key in ("params", "buffers"):
        for m, (x, y) in enumerate(zip(*([v for k, v in e.items() if k.startswith(f"{key}/")] for e in (ea, eb)))):
            assert torch.equal(x, y), (key, m)
    memories = [[(k, v) for k, v in e.items() if k.startswith("memory/")] for e in (ea, eb)]
    assert [k for k, _ in memories[0]] == [k for k, _ in memories[1]]
    for (m, x), (_, y) in zip(*memories):
        assert torch.equal(x, y), ("memory", m)
    oa, ob = ea["optimizer"], eb["optimizer"]
    assert oa.keys() == ob.keys()
    for k in oa:
        if isinstance(oa[k], torch.Tensor):
            assert torch.equal(oa[k], ob[k]), ("optimizer", k)
    assert a["history"] == b["history"]
    assert a["val_acc"] == b["val_acc"] and a["train_loss"] == b["train_loss"]


def test_two_processes_train_exactly_like_one(runs):
    d, _ = runs
    one = _final(d["single"])
    assert one["val_acc"] > 0.3  # it learns: 4 rounds of 12 devices on 600 MNIST images
    _assert_same_run(one, _final(d["full"]))
    _assert_same_run(one, _final(d["sharded"]))


def test_a_full_ddp_checkpoint_resumes_in_one_process(runs):
    d, codes = runs
    assert codes["from_full"] == 0, _log(d["from_full"])[-3000:]
    _assert_same_run(_final(d["single"]), _final(d["from_full"]))


def test_a_sharded_checkpoint_resumes_in_one_process(runs):
    d, codes = runs
    shards = glob.glob(os.path.join(d["sharded"], "ckpt", "*.shards"))
    assert shards, "the sharded checkpoint writes its tensors beside the file"
    assert codes["from_sharded"] == 0, _log(d["from_sharded"])[-3000:]
    _assert_same_run(_final(d["single"]), _final(d["from_sharded"]))


def test_a_non_finite_update_on_one_rank_stops_both_with_the_same_error(runs):
    d, codes = runs
    assert codes["nan"] not in (0, "timeout"), codes["nan"]
    log = _log(d["nan"])
    assert log.count("NonFiniteUpdateError") >= 2, log[-3000:]  # raised on rank 0 and on rank 1


def test_a_dead_rank_fails_the_run_instead_of_hanging_it_and_the_run_resumes_bit_for_bit(runs):
    d, codes = runs
    assert codes["kill"] not in (0, "timeout"), codes["kill"]
    assert not os.path.exists(os.path.join(d["kill"], "final.pt"))
    # the checkpoint written before the SIGKILL continues on two processes exactly like the uninterrupted run
    assert codes["after_kill"] == 0, _log(d["after_kill"])[-3000:]
    _assert_same_run(_final(d["single"]), _final(d["after_kill"]))


RECIPE = ["model=mlp", "hierarchy.branching=[2,2,2]", "hierarchy.taus=[2,2,1]", "trainer.rounds=2",
          "dataset.train_subset=3000", "dataset.test_subset=1000", "trainer.progress_bar=false", "logger=csv",
          "trainer.device_rng=stream"]


def test_the_recipe_on_two_processes_writes_what_one_process_writes(tmp_path, data_root):
    """``python -m recipes.mnist trainer.strategy=qmlhfl_ddp trainer.devices=2``: rank 0 writes the run's files,
    equal to the single-process run's (validation loss to float tolerance: the mean of the ranks' means). SCAFFOLD at
    every layer: its variates are sharded with their rows, and the drift logged per layer is the mean over every
    rank's uploads (float tolerance: the ranks' partial sums are added)."""
    env = dict(os.environ, QMLHFL_DATA=str(data_root.resolve()), WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29621", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("LOCAL_RANK", None)
    procs = {}
    for name, extra in (("ddp", ["trainer.strategy=qmlhfl_ddp", "trainer.devices=2"]), ("single", [])):
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "recipes.mnist", *RECIPE, *extra, "local_solver=scaffold", "local_solver.at=all", f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    codes = _wait(procs)
    for name, code in codes.items():
        assert code == 0, (name, (tmp_path / f"{name}.log").read_text()[-3000:])
    import json

    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    one = json.loads((tmp_path / "single" / "history.json").read_text())
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        assert a.keys() == b.keys()
        assert {"drift_layer1", "drift_layer2", "drift_layer3"} <= a.keys()
        for k in a:
            if k == "val_loss":
                assert a[k] == pytest.approx(b[k], rel=1e-6)
            elif k.startswith("drift_"):
                assert a[k] == pytest.approx(b[k], rel=1e-12), k
            elif "wall" not in k:
                assert a[k] == b[k], k
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "single" / "summary.json").read_text())
    for k in ("final_test_acc", "best_test_acc", "bits_per_layer", "sim_time_s", "rounds"):
        assert s_ddp[k] == s_one[k], k
    assert (tmp_path / "ddp" / "last.ckpt").is_file()


def test_the_recipe_refuses_ddp_where_it_cannot_run():
    from recipes.simulation import check_strategy

    with pytest.raises(ValueError, match="trainer.devices=2 needs strategy=qmlhfl_ddp"):
        check_strategy("qmlhfl", 2, None, 0.0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        check_strategy("ddp", 1, None, 0.0)
    with pytest.raises(ValueError, match="Hydra multirun"):
        check_strategy("qmlhfl_ddp", 2, "mnist/2026", 0.0)
    with pytest.raises(ValueError, match="per-device evaluation"):
        check_strategy("qmlhfl_ddp", 2, None, 0.1)
    assert check_strategy("qmlhfl_ddp", 2, None, 0.0) == ("qmlhfl_ddp", 2)
