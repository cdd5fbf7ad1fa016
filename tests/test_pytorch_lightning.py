"""The strategy with the standalone ``pytorch_lightning`` package: the whole compatibility matrix
(tests/test_compat.py) runs against its Trainer, LightningModules, callbacks and strategy registry, in a
subprocess (a test module imports one Lightning package for its module definitions)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="pytorch_lightning is not installed")
def test_the_compatibility_matrix_passes_with_pytorch_lightning():
    env = {**os.environ, "QMLHFL_TEST_LIGHTNING": "pytorch_lightning", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_compat.py"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary.split("passed")[0], summary


def test_each_package_has_its_own_strategy_classes():
    """A Trainer takes only strategies derived from its own package's classes: lightning_qmlhfl has one set for
    each (lightning_qmlhfl.QMLHFLStrategy and lightning_qmlhfl.pytorch_lightning.QMLHFLStrategy)."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        pytest.skip("pytorch_lightning is not installed")
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    from lightning_qmlhfl import QMLHFLStrategy
    from lightning_qmlhfl.pytorch_lightning import QMLHFLStrategy as PLStrategy

    assert issubclass(QMLHFLStrategy, lp.strategies.SingleDeviceStrategy)
    assert issubclass(PLStrategy, pl.strategies.SingleDeviceStrategy)
    assert not issubclass(PLStrategy, lp.strategies.Strategy)
