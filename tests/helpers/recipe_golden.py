"""Golden recipe runs: small command lines that together exercise the recipes' features, their outputs saved under
``tests/golden/recipes/NAME/`` and compared number for number by ``tests/test_recipes_golden.py``.

    python tests/helpers/recipe_golden.py --write [NAME ...]   # (re)make the golden files (only on purpose)
    python tests/helpers/recipe_golden.py --write --this-machine   # another machine's: tests/golden/machines/KEY/
    python tests/helpers/recipe_golden.py [NAME ...]           # rerun and compare, printing what differs

A run is one or more commands (``python -m recipes.X ...``) into a scratch directory; what is compared is
``history.json`` and ``summary.json`` of the run directory, minus what is not a result of the computation (wall
times, the resolved config, absolute paths), or the standard output for ``recipes.plan``. Equal means equal: the
same floats, bit for bit (same torch build and CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
GOLDEN = TESTS / "golden" / "recipes"  # made on the base machine of tests/golden/common.py
USER = "helpers.user_modules"

MNIST_TINY = ["dataset.train_subset=1500", "dataset.test_subset=300", "hierarchy.branching=[2,2,2]",
              "trainer.progress_bar=false"]

# name -> list of (module, overrides, run directory name below the scratch directory); the last command's run
# directory (or the one named by "result") holds the outputs compared.
RUNS: dict[str, dict[str, Any]] = {
    "mnist_lenet": {"cmds": [("recipes.mnist", [*MNIST_TINY, "hierarchy.taus=[2,1,1]", "trainer.rounds=2",
                                                "logger=csv"], "outputs/mnist/a")]},
    "mnist_four_layer": {"cmds": [("recipes.mnist", [
        "hierarchy=four_layer", "quantizer.levels=[4,8,8,8]", "partition.alpha=0.1", "model=mlp",
        "dataset.train_subset=1500", "dataset.test_subset=300", "hierarchy.branching=[2,1,2,2]",
        "hierarchy.taus=[2,1,2,1]", "trainer.rounds=2", "logger=wandb", "trainer.progress_bar=false"],
        "outputs/mnist/a")]},
    "mnist_eval": {"cmds": [("recipes.mnist", [
        *MNIST_TINY, "model=mlp", "hierarchy.taus=[2,1,1]", "trainer.rounds=6", "trainer.early_stopping.patience=1",
        "trainer.lr_plateau.patience=0", "eval.local_fraction=0.2", "eval.every=2", "eval.personalized=true",
        "eval.test_every=2", "model.lr=0.5", "logger=none"], "outputs/mnist/a")]},
    "mnist_features": {"cmds": [("recipes.mnist", [
        *MNIST_TINY, "model=mlp", "hierarchy.taus=[2,1,2]", "trainer.deadline=4.0",
        "server_optim.layers=[fedavgm,average,fedadam]", "server_optim.lr=[1.0,null,0.02]",
        "participation.layers=[fraction,full,full]", "participation.f=0.5", "availability.dropout=0.1",
        "mobility.model=random", "mobility.p=0.2", "latency.compute_sigma=0.5", "latency.rate_sigma=0.5",
        "compressor.layers=[topk,qsgd,sign]", "compressor.error_feedback=[ef,null,ef21]",
        "model.optimizer={_target_:torch.optim.AdamW,_partial_:true,weight_decay:0.01}", "model.lr=0.003",
        "trainer.val_every_n_rounds=2", "trainer.monitor=val_loss", "logger=none"], "outputs/mnist/a")]},
    "custom_module": {"cmds": [("recipes.mnist", [
        "trainer.progress_bar=false", "logger=none", "trainer.rounds=2", f"datamodule._target_={USER}.BlobsDataModule",
        f"model._target_={USER}.TinyNet", "+model.hidden=16", "hierarchy=four_layer", "hierarchy.branching=[2,1,2,2]",
        "hierarchy.taus=[2,1,1,1]", "partition=shards",
        f"compressor.layers=[topk,qsgd,sign,{{_target_:{USER}.coarse_qsgd,levels:3}}]",
        "participation.layers=[fraction,full,full,full]", "participation.f=0.5", "eval.local_fraction=0.2",
        "eval.personalized=true", "trainer.callbacks=[{_target_:lightning.pytorch.callbacks.Timer}]"],
        "outputs/mnist/a")]},
    "dict_batches": {"cmds": [("recipes.mnist", [
        "trainer.progress_bar=false", "logger=none", "trainer.rounds=2", f"datamodule._target_={USER}.BlobsDataModule",
        f"model._target_={USER}.DictBatchNet", "+datamodule.dict_batches=true", "partition=iid",
        "hierarchy.branching=[2,2,2]", "hierarchy.taus=[1,1,1]", "eval.local_fraction=0.1",
        "trainer.checkpoint=false"], "outputs/mnist/a")]},
    "cifar_bf16": {"cmds": [("recipes.cifar", [
        "dataset.train_subset=512", "dataset.test_subset=256", "hierarchy.branching=[2,2]", "hierarchy.taus=[2,1]",
        "quantizer.levels=[4,null]", "trainer.rounds=2", "trainer.precision=bf16-mixed", "trainer.checkpoint=false",
        "trainer.progress_bar=false"], "outputs/cifar/a")]},
    "experiment_depth": {"cmds": [("recipes.mnist", [
        "+experiment=depth", "hierarchy=three_layer", *MNIST_TINY, "trainer.rounds=2"], "outputs/depth/a")]},
    "experiment_stragglers": {"cmds": [("recipes.mnist", [
        "+experiment=stragglers", "+straggler_policy=drop", "dataset.train_subset=1500", "dataset.test_subset=300",
        "hierarchy.branching=[2,4,2]", "hierarchy.taus=[2,1,1]", "trainer.rounds=2"], "outputs/stragglers/a")]},
    "resume_last": {"cmds": [
        ("recipes.mnist", [*MNIST_TINY, "model=mlp", "hierarchy.taus=[2,1,2]", "trainer.rounds=2",
                           "eval.local_fraction=0.2", "trainer.lr_plateau.patience=0", "logger=csv", "seed=3"],
         "outputs/mnist/a"),
        ("recipes.mnist", [*MNIST_TINY, "model=mlp", "hierarchy.taus=[2,1,2]", "trainer.rounds=3",
                           "eval.local_fraction=0.2", "trainer.lr_plateau.patience=0", "logger=csv", "seed=3",
                           "ckpt_path=last"], "outputs/mnist/b")],
        "result": "outputs/mnist/a"},
    "ddp_two_processes": {"cmds": [("recipes.mnist", [
        *MNIST_TINY, "model=mlp", "hierarchy.taus=[2,2,1]", "trainer.rounds=2", "logger=csv",
        "trainer.device_rng=stream", "trainer.strategy=qmlhfl_ddp", "trainer.devices=2"], "outputs/mnist/a")],
        "env": {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29637", "OMP_NUM_THREADS": "1"}},
    "plan": {"cmds": [("recipes.plan", ["deadline=30", "quantizer.levels=[4,8,8]"], "outputs/plan/a")],
             "stdout": True},
}

DROP_SUMMARY = ("wall_time_s", "config")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", QMLHFL_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("LOCAL_RANK", None)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra or {})
    return env


def normalise_summary(summary: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The summary without wall time and resolved config; paths made relative to the scratch directory."""
    out = {k: v for k, v in summary.items() if k not in DROP_SUMMARY}
    sessions = []
    for s in out.get("sessions", []):
        s = dict(s)
        if s.get("resumed_from"):
            s["resumed_from"] = os.path.relpath(s["resumed_from"], scratch)
        sessions.append(s)
    if "sessions" in out:
        out["sessions"] = sessions
    return out


def run_golden(name: str, scratch: Path) -> dict[str, Any]:
    """Run one golden configuration in ``scratch``; returns ``{"history": ..., "summary": ...}`` (or ``{"stdout"}``)."""
    spec = RUNS[name]
    env = _env(spec.get("env"))
    last_out = None
    for module, overrides, run_dir in spec["cmds"]:
        out = subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={scratch / run_dir}", *overrides],
                             cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"golden run {name}: {module} {' '.join(overrides)} failed ({out.returncode}):\n"
                               f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        last_out = out
    if spec.get("stdout"):
        return {"stdout": last_out.stdout}
    result = scratch / spec.get("result", spec["cmds"][-1][2])
    return {"history": json.loads((result / "history.json").read_text()),
            "summary": normalise_summary(json.loads((result / "summary.json").read_text()), scratch)}


def golden_dir(this_machine: bool = False) -> Path | None:
    """Where this machine's golden recipe outputs are: ``tests/golden/recipes/`` on the base machine, else
    ``recipes/`` in this machine's directory (tests/golden/machines/KEY/) if it was written (or ``this_machine``,
    to write it), else None: bit for bit needs the same torch build, CPU instruction set and vendor."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from golden.common import machine_dir, on_base_machine

    if on_base_machine():
        return GOLDEN
    d = machine_dir() / "recipes"
    return d if this_machine or d.is_dir() else None


def load_golden(name: str, root: Path = GOLDEN) -> dict[str, Any]:
    d = root / name
    if RUNS[name].get("stdout"):
        return {"stdout": (d / "stdout.txt").read_text()}
    return {"history": json.loads((d / "history.json").read_text()),
            "summary": json.loads((d / "summary.json").read_text())}


def write_golden(name: str, result: dict[str, Any], root: Path = GOLDEN) -> None:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if "stdout" in result:
        (d / "stdout.txt").write_text(result["stdout"])
        return
    (d / "history.json").write_text(json.dumps(result["history"], indent=1) + "\n")
    (d / "summary.json").write_text(json.dumps(result["summary"], indent=1) + "\n")


def differences(golden: Any, new: Any, where: str = "") -> list[str]:
    """Every place where ``new`` differs from ``golden`` (exact equality of numbers; keys new in ``new`` that the
    golden lacks are not differences: outputs may grow)."""
    if isinstance(golden, dict) and isinstance(new, dict):
        out = []
        for k in golden:
            if k not in new:
                out.append(f"{where}.{k}: missing")
            else:
                out += differences(golden[k], new[k], f"{where}.{k}")
        return out
    if isinstance(golden, list) and isinstance(new, list):
        if len(golden) != len(new):
            return [f"{where}: {len(golden)} entries -> {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(golden, new)) for d in differences(a, b, f"{where}[{i}]")]
    if type(golden) is not type(new) or golden != new:
        if isinstance(golden, float) and isinstance(new, float) and golden != golden and new != new:
            return []  # NaN == NaN here
        return [f"{where}: {golden!r} -> {new!r}"]
    return []


def main(argv: list[str]) -> int:
    write = "--write" in argv
    names = [a for a in argv if not a.startswith("--")] or list(RUNS)
    # writing: the base files, or this machine's with --this-machine; comparing: this machine's
    if "--this-machine" in argv and not write:
        raise SystemExit("--this-machine goes with --write (comparing always uses this machine's golden outputs)")
    if "--this-machine" in argv and golden_dir() == GOLDEN:
        raise SystemExit("this is the machine of tests/golden/recipes/: rewrite those (--write alone) or leave them")
    root = golden_dir(this_machine=True) if "--this-machine" in argv else GOLDEN if write else golden_dir()
    if root is None:
        raise SystemExit("no golden recipe outputs for this machine (write them with --write --this-machine)")
    bad = 0
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
            result = run_golden(name, Path(tmp))
        if write:
            write_golden(name, result, root)
            print(f"{name}: written to {root / name}")
            continue
        diff = differences(load_golden(name, root), result)
        bad += bool(diff)
        print(f"{name}: {'equal' if not diff else 'DIFFERENT'}")
        for d in diff[:20]:
            print("   ", d)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
