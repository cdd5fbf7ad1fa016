"""The command-line entry of the recipes (``python -m recipes.mnist`` / ``recipes.cifar``): Hydra over the configs
shipped inside the package (``recipes/conf/``, found from this file, so an installed copy works from any directory).
Nothing heavy is imported before Hydra has parsed the command line (``--cfg job`` / ``--help`` stay fast).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["CONF_DIR", "hydra_entry"]

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The recipes' Hydra config directory (package data of ``recipes``)."""


def hydra_entry(config_name: str) -> Callable[[], Any]:
    """The ``main()`` of a recipe: Hydra over ``recipes/conf/<config_name>.yaml``; rewrites ``ckpt_path=...``
    (:func:`recipes.resume.resume_argv`: continue in the checkpoint's run directory), then runs
    :func:`recipes.common.run` in the run directory and returns the final cloud test accuracy (the objective for
    Hydra sweepers)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def task(cfg: DictConfig) -> float | None:
        from hydra.types import RunMode

        from recipes.common import run

        hc = HydraConfig.get()
        sweep = f"{cfg.name}/{Path(str(hc.sweep.dir)).name}" if hc.mode == RunMode.MULTIRUN else None
        summary = run(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task), sweep=sweep)
        return summary.get("final_test_acc")  # None on the other ranks of a multi-process run

    def main() -> Any:
        from recipes.resume import resume_argv

        try:
            argv = resume_argv(sys.argv[1:], CONF_DIR, config_name)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        sys.argv = [sys.argv[0], *argv]
        return task()

    main.__doc__ = task.__doc__
    return main
