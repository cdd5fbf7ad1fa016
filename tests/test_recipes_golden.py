"""The recipes give exactly the numbers they gave before their redesign: small command lines exercising every
feature (tests/helpers/recipe_golden.py), rerun and compared with tests/golden/recipes/ number for number."""

from __future__ import annotations

import pytest
from helpers.offline import data_env, offline_mirrors  # noqa: F401 (fixtures)
from helpers.recipe_golden import RUNS, differences, golden_dir, load_golden, run_golden

ROOT = golden_dir()  # this machine's golden outputs, or None


@pytest.mark.skipif(ROOT is None, reason="no golden recipe outputs for this machine: bit for bit needs the same "
                                         "torch build, CPU instruction set and vendor (tests/golden/common.py)")
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.usefixtures("data_env")
def test_recipe_run_gives_the_golden_numbers(name, tmp_path):
    diff = differences(load_golden(name, ROOT), run_golden(name, tmp_path))
    assert not diff, f"{name}: {len(diff)} differences, first: " + "; ".join(diff[:10])
