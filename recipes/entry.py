"""The command-line entry of the recipes (``python -m recipes.mnist`` / ``recipes.cifar``): Hydra over the configs
shipped inside the package (``recipes/conf/``, found from this file, so an installed copy works from any directory).
Nothing heavy is imported before Hydra has parsed the command line (``--cfg job`` / ``--help`` stay fast).

Before Hydra starts: renamed keys are rewritten (:func:`recipes.config.rewrite_overrides`), ``ckpt_path=...`` is
resolved (:func:`recipes.resume.resume_argv`: continue in the checkpoint's run directory), and a run directory given
on the command line (``hydra.run.dir=...``) is claimed, so that a second run into a directory in use stops before
Hydra writes anything there. A bad config value, a directory in use, missing data, training stopped by a NaN: one
line on stderr and exit status 1, without a traceback (``HYDRA_FULL_ERROR=1`` shows it). Warnings of renamed keys
are one line each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from recipes.config import CONF_DIR

__all__ = ["CONF_DIR", "hydra_entry", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user fixes by changing the command line or the environment (printed as one line)."""
    from lightning_qmlhfl.data import EmptyPartitionError
    from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError
    from recipes.datasets import DatasetError
    from recipes.options import ConfigError
    from recipes.rundir import RunDirectoryInUse

    return (ConfigError, RunDirectoryInUse, DatasetError, FileNotFoundError, NonFiniteUpdateError, EmptyPartitionError)


def _one_line(error: BaseException) -> SystemExit:
    """``error`` as the one line the command line prints (exit status 1), or raised with its traceback under
    ``HYDRA_FULL_ERROR=1``."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    from lightning_qmlhfl.data import EmptyPartitionError
    from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError

    library = isinstance(error, (NonFiniteUpdateError, EmptyPartitionError))  # its name says what happened
    return SystemExit(f"error: {type(error).__name__ + ': ' if library else ''}{error}")


def hydra_entry(config_name: str) -> Callable[[], Any]:
    """The ``main()`` of a recipe: Hydra over ``recipes/conf/<config_name>.yaml``, then :func:`recipes.train.run` in
    the run directory; returns the final cloud test accuracy (the objective for Hydra sweepers)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def task(cfg: DictConfig) -> float | None:
        from hydra.types import RunMode

        from recipes.train import run

        hc = HydraConfig.get()
        sweep = f"{cfg.name}/{Path(str(hc.sweep.dir)).name}" if hc.mode == RunMode.MULTIRUN else None
        try:
            summary = run(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task), sweep=sweep)
        except user_errors() as e:
            raise _one_line(e) from None
        return summary.get("final_test_acc")  # None on the other ranks of a multi-process run

    def main() -> Any:
        import warnings

        from recipes.config import rewrite_overrides

        show = warnings.formatwarning
        warnings.formatwarning = lambda message, category, *a, **k: (  # renamed keys: one line each
            f"{category.__name__}: {message}\n" if category is FutureWarning else show(message, category, *a, **k))
        from recipes.resume import resume_argv
        from recipes.rundir import RunLock, is_global_zero

        try:
            argv = resume_argv(rewrite_overrides(sys.argv[1:]), CONF_DIR, config_name)
            run_dir = next((a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("hydra.run.dir=")), None)
            if run_dir and is_global_zero() and not any(a in ("-m", "--multirun", "--cfg", "-c", "--help", "-h",
                                                              "--hydra-help", "--info") for a in argv):
                RunLock.claim(Path(run_dir))
        except user_errors() as e:
            raise _one_line(e) from None
        sys.argv = [sys.argv[0], *argv]
        return task()

    main.__doc__ = task.__doc__
    return main
