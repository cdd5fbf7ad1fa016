"""The run's logger, from the ``logger`` node (``logger=csv``: Lightning's CSVLogger; ``logger=wandb``:
:func:`wandb_logger`; ``logger=none``; or a user's ``logger._target_``).

W&B runs are grouped by their sweep (``sweep-ID`` under ``wandb agent``, ``NAME/DATE`` for a Hydra multirun; or
``logger.group``) and named from their overrides (``hierarchy=two_layer,seed=1``; or ``logger.run_name``); a
resumed run continues the W&B run of its directory (its id is kept in ``wandb_run_id``).
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from recipes.options import ConfigError, check_choice
from recipes.runs import key_under

__all__ = ["WANDB_ID_FILE", "finish_loggers", "make_logger", "wandb_group_and_name", "wandb_logger"]

WANDB_ID_FILE = "wandb_run_id"
_NAME_SKIP = ("logger", "trainer.progress_bar", "trainer.enable_progress_bar", "hydra", "ckpt_path", "data_dir",
              "dataset.download", "dataset.mirror")


def _override_items(overrides: Sequence[str] | None) -> list[str]:
    out = []
    for o in overrides or []:
        key = o.lstrip("+~").split("=", 1)[0]
        if key_under(key, _NAME_SKIP):
            continue
        out.append(o.lstrip("+"))
    return out


def wandb_group_and_name(cfg: DictConfig, overrides: Sequence[str] | None = None, sweep: str | None = None
                         ) -> tuple[str | None, str]:
    """The W&B group and run name: ``logger.group`` / ``logger.run_name`` when set; else the group is the W&B
    sweep (``sweep-$WANDB_SWEEP_ID`` under ``wandb agent``) or the Hydra multirun (``NAME/SWEEP_DIR``), and the name
    is the run's overrides (``hierarchy=two_layer,seed=1``; logger, progress bar, data and resume settings left
    out), or ``name`` without overrides."""
    lg = cfg.logger
    group = lg.get("group") or (f"sweep-{os.environ['WANDB_SWEEP_ID']}" if os.environ.get("WANDB_SWEEP_ID") else sweep)
    name = lg.get("run_name") or ",".join(_override_items(overrides)) or str(cfg.name)
    return group, name


def wandb_logger(save_dir: str, name: str = "wandb", project: str = "lightning-qmlhfl", entity: str | None = None,
                 mode: str = "offline", tags: Sequence[str] = (), group: str | None = None,
                 run_name: str | None = None, run_id: str | None = None, config: dict | None = None) -> Any:
    """Lightning's WandbLogger for a recipe run. ``name`` is the preset's label (``logger=wandb``); the W&B run's
    display name is ``run_name``. ``mode``: online, offline or disabled (``$WANDB_MODE`` wins). A run continues
    the W&B run ``run_id`` when it exists (``resume="allow"``)."""
    from lightning.pytorch.loggers import WandbLogger

    from recipes.flavor import counterpart

    WandbLogger = counterpart(WandbLogger)  # noqa: N806 (pytorch_lightning's for a pytorch_lightning model)
    mode = os.environ.get("WANDB_MODE") or mode
    check_choice(mode, "logger.mode", ("online", "offline", "disabled"))
    return WandbLogger(project=project, entity=entity, save_dir=str(save_dir), mode=mode, tags=list(tags or []),
                       group=group, name=run_name, id=run_id, resume="allow", config=config)


def _wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id kept in the run directory, so that a resumed run continues the same W&B run."""
    id_file = run_dir / WANDB_ID_FILE
    if resuming and id_file.is_file():
        return id_file.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    id_file.write_text(run_id + "\n")
    return run_id


def make_logger(cfg: DictConfig, run_dir: Path, resuming: bool, overrides: Sequence[str] | None = None,
                sweep: str | None = None) -> Any:
    """The logger of ``cfg.logger`` writing into ``run_dir`` (False for ``logger=none``)."""
    from recipes.components import instantiate_node

    lg = cfg.logger
    if not lg.get("_target_"):
        if lg.get("name") == "none":
            return False
        raise ConfigError(f"logger.name={lg.get('name')!r} has no _target_: use logger=none, csv or wandb, or give "
                          f"logger._target_")
    kwargs: dict[str, Any] = {}
    if "save_dir" in lg:
        kwargs["save_dir"] = str(run_dir)
    if str(lg._target_) == f"{__name__}.wandb_logger":
        group, run_name = wandb_group_and_name(cfg, overrides, sweep)
        kwargs.update(group=group, run_name=run_name, run_id=_wandb_run_id(Path(run_dir), resuming),
                      config=OmegaConf.to_container(cfg, resolve=True))
    return instantiate_node(lg, "logger", **kwargs)


def finish_loggers(trainer: Any) -> None:
    """Finish every W&B run of the Trainer (its files are complete on disk afterwards)."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()
