"""Resuming a recipe run: ``python -m recipes.mnist ckpt_path=PATH`` or ``ckpt_path=last``.

Choice: a resumed run **continues in the directory of the checkpoint it resumes**. Before Hydra starts,
:func:`resume_argv` resolves ``ckpt_path`` and points ``hydra.run.dir`` at the checkpoint's directory (Hydra's own
records of the resumed session go to ``.hydra/resume-K/``, the first session's stay in ``.hydra/``). Everything the
run writes then continues there: ``history.json`` / ``summary.json`` / the plots are rewritten from the complete
history (the per-round records travel in the checkpoint), ``last.ckpt`` / ``best.ckpt`` are updated, the CSV logger's
``metrics.csv`` keeps the rows of the rounds the checkpoint covers and appends the rest (rows the killed session
logged after its last checkpoint are dropped: those rounds run again), and a W&B run is resumed under its id.

``ckpt_path=last``: the newest ``last.ckpt`` (by modification time) among the runs of the same ``name`` (below the
parent of ``hydra.run.dir``, i.e. ``outputs/NAME/``, and of ``hydra.sweep.dir``, ``multirun/NAME/``) whose
``config.yaml`` matches the current configuration except for the keys in :data:`RESUME_IGNORED` (more rounds, a
different logger or data directory are allowed). An explicit ``ckpt_path=PATH`` is taken as given; differences
from that run's configuration are printed as a warning.

Checkpoints are written atomically (:class:`recipes.checkpoint_io.AtomicCheckpointIO`: a temporary file in the same
directory, fsync, rename), so a run killed while saving leaves the previous complete ``last.ckpt``. Directories held
by a running run (:func:`recipes.rundir.in_use`) are never resumed by ``ckpt_path=last``. A ``last.ckpt`` that is
corrupt or incomplete (unreadable, or its tensors do not match the checksum written with it) is passed over for
the newest intact checkpoint in its directory (``best.ckpt``, ...), with a warning that names both.
"""

from __future__ import annotations

import csv
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from recipes.runs import flatten_config, key_under

__all__ = ["CONFIG_FILE", "RESUME_IGNORED", "resume_ignored", "checkpoint_epoch", "config_diff", "continue_csv_logger", "continue_logger",
           "find_last_checkpoint", "read_csv_rows", "resolve_ckpt_path", "resume_argv", "write_run_config"]

CONFIG_FILE = "config.yaml"
"""The resolved configuration of a run, written into its directory when it starts (used by ``ckpt_path=last``)."""

RESUME_IGNORED: tuple[str, ...] = ("ckpt_path", "data_dir", "trainer.enable_progress_bar", "rounds", "trainer.max_steps",
                                   "deadline", "logger", "hydra", "paths", "dataset.download", "dataset.mirror",
                                   "eval.every", "eval.test_every", "eval.metrics", "eval.personalized",
                                   "eval.personal_steps", "eval.batch_size", "trainer.callbacks",
                                   # their names before the recipes' redesign (configs of older runs)
                                   "trainer.progress_bar", "trainer.rounds", "trainer.deadline")
"""Config keys (and key prefixes) that may differ between a run and its resumption. A key whose value is an
interpolation of another (``strategy.seed: ${seed}``) follows that key (:func:`resume_ignored`)."""


def resume_ignored(cfg: Any) -> tuple[str, ...]:
    """:data:`RESUME_IGNORED` and every key of ``cfg`` (a DictConfig) whose value is an interpolation: such a key
    differs exactly when the key it copies does, which is compared (or ignored) itself."""
    from omegaconf import OmegaConf

    raw = flatten_config(OmegaConf.to_container(cfg, resolve=False))
    copies = tuple(k for k, v in raw.items() if isinstance(v, str) and re.fullmatch(r"\$\{[^}]*\}", v.strip()))
    return RESUME_IGNORED + copies


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = RESUME_IGNORED
                ) -> list[str]:
    """``"key: old -> new"`` for every dotted leaf key whose value differs (keys under ``ignore`` skipped)."""
    a, b = flatten_config(old), flatten_config(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key_under(key, ignore):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def write_run_config(run_dir: Path, config: Mapping[str, Any], overwrite: bool = True) -> Path:
    """Write the resolved ``config`` to ``run_dir/config.yaml`` (kept as it is when resuming: ``overwrite=False``)."""
    from omegaconf import OmegaConf

    from recipes.files import write_text_atomic

    path = Path(run_dir) / CONFIG_FILE
    if overwrite or not path.exists():
        write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(dict(config))))
    return path


def _read_run_config(run_dir: Path) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception:
        return None


def find_last_checkpoint(roots: Sequence[Path], config: Mapping[str, Any], ignore: Sequence[str] = RESUME_IGNORED
                         ) -> Path:
    """The newest ``last.ckpt`` below ``roots`` (one or two directory levels) of a run whose ``config.yaml``
    matches ``config`` up to :data:`RESUME_IGNORED` and whose directory no running run holds.

    Raises:
        FileNotFoundError: no checkpoint, or none of a matching run; the message names the searched directories
            and, for the newest candidates, the keys that differ.
    """
    seen: set[Path] = set()
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for pattern in ("*/last.ckpt", "*/*/last.ckpt"):
            for p in root.glob(pattern):
                rp = p.resolve()
                if rp not in seen and p.is_file():
                    seen.add(rp)
                    found.append(rp)
    where = ", ".join(str(r) for r in roots)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no last.ckpt below {where} (runs of name "
                                f"{config.get('name')!r}); give ckpt_path=PATH to a checkpoint")
    from recipes.rundir import in_use

    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    mismatches = []
    for p in found:
        holder = in_use(p.parent)
        if holder is not None:
            mismatches.append(f"{p} (in use by a running run: {holder})")
            continue
        old = _read_run_config(p.parent)
        if old is None:
            mismatches.append(f"{p} (no {CONFIG_FILE})")
            continue
        diff = config_diff(old, config, ignore)
        if not diff:
            good = _intact_checkpoint(p)
            if good is not None:
                return good
            mismatches.append(f"{p} (corrupt or incomplete, and no intact checkpoint beside it)")
            continue
        mismatches.append(f"{p} ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})")
    shown = "\n  ".join(mismatches[:5])
    raise FileNotFoundError(
        f"ckpt_path=last: none of the {len(found)} last.ckpt below {where} is of a run with this configuration "
        f"that no running run holds "
        f"(keys that may differ: {', '.join(RESUME_IGNORED)}); newest candidates and what differs:\n  {shown}\n"
        f"Repeat the run's overrides, or give ckpt_path=PATH")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint file ``path`` cannot be resumed from (unreadable, or its tensors do not match the
    checksum written with it), or None when it is intact."""
    import torch

    from lightning_qmlhfl import CorruptCheckpointError
    from lightning_qmlhfl.strategy.integrity import read_error, verify_checksum

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (any failure to read is the answer)
        return read_error(path, e).reason
    try:
        if not isinstance(ckpt, dict):
            return f"it holds a {type(ckpt).__name__}, not a checkpoint"
        verify_checksum(ckpt, path)
    except CorruptCheckpointError as e:
        return e.reason
    return None


def _intact_checkpoint(last: Path) -> Path | None:
    """``last`` when it is intact; else the newest intact checkpoint in its directory (with a warning that names
    both), else None."""
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    others = sorted((p for p in last.parent.glob("*.ckpt") if p.resolve() != last.resolve() and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        if checkpoint_problem(other) is None:
            warnings.warn(f"ckpt_path=last: checkpoint {last} is corrupt or incomplete ({problem}); resuming from "
                          f"the previous good checkpoint {other.resolve()} instead", stacklevel=2)
            return other.resolve()
    return None


def resolve_ckpt_path(value: Any, config: Mapping[str, Any], roots: Sequence[Path],
                      ignore: Sequence[str] = RESUME_IGNORED) -> Path | None:
    """``ckpt_path`` as an absolute path: None for null / empty, :func:`find_last_checkpoint` for ``last``, else the
    given file, which must exist."""
    if value is None or str(value).strip().lower() in ("", "null", "none"):
        return None
    if str(value).strip() == "last":
        return find_last_checkpoint(roots, config, ignore)
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such checkpoint file (give a path to a .ckpt file, e.g. "
                                f"outputs/NAME/DATE/last.ckpt, or ckpt_path=last)")
    return path.resolve()


def warn_config_changes(ckpt: Path, config: Mapping[str, Any], ignore: Sequence[str] = RESUME_IGNORED) -> list[str]:
    """Warn (and return) the differences between the resumed run's ``config.yaml`` and ``config``."""
    old = _read_run_config(ckpt.parent)
    diff = [] if old is None else config_diff(old, config, ignore)
    if diff:
        warnings.warn(f"resuming {ckpt} with a configuration that differs from the run's {CONFIG_FILE} in: "
                      f"{'; '.join(diff)}; the continuation is not the run it was", UserWarning, stacklevel=2)
    return diff


def read_csv_rows(path: Path, last_epoch: int) -> list[tuple[int, dict[str, float]]]:
    """The rows ``(step, {metric: value})`` of a CSVLogger ``metrics.csv`` logged in epochs ``<= last_epoch``
    (rows without an epoch are kept when their step is not after the last kept row)."""
    if not path.is_file():
        return []
    rows: list[tuple[int, dict[str, float]]] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            try:
                if epoch not in (None, "") and float(epoch) > last_epoch:
                    continue
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            values = {}
            for k, v in row.items():
                if k in ("step",) or v in (None, ""):
                    continue
                try:
                    values[k] = int(v) if re.fullmatch(r"-?\d+", v) else float(v)
                except ValueError:
                    pass
            rows.append((step, values))
    return rows


def checkpoint_epoch(path: Path) -> int:
    """The (0-based) epoch a Lightning checkpoint was written in, read without loading its tensors."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ck.get("epoch", -1))


def continue_logger(logger: Any, checkpoint: Path | None) -> None:
    """For a resumed run with a CSVLogger: put back the rows of the rounds the checkpoint covers (see the module
    docstring); other loggers continue by themselves (W&B under its run id)."""
    if checkpoint is None or type(logger).__name__ != "CSVLogger":
        return
    continue_csv_logger(logger, read_csv_rows(Path(logger.log_dir) / "metrics.csv", checkpoint_epoch(checkpoint)))


def continue_csv_logger(logger: Any, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Put the kept rows of the resumed run back into a (new) CSVLogger before it logs anything: Lightning's CSV
    writer empties an existing ``metrics.csv`` when it starts."""
    experiment = logger.experiment  # creates the writer (which removes the old file)
    for step, values in rows:
        experiment.log_metrics(values, step)


def _quote(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_CKPT_ARG = re.compile(r"^\+{0,2}ckpt_path=(.*)$")


def resume_argv(argv: Sequence[str], config_dir: str | Path | None, config_name: str) -> list[str]:
    """Rewrite a recipe's command line for ``ckpt_path=...`` (before Hydra parses it): resolve the checkpoint
    (``last`` included), continue in its directory (``hydra.run.dir``), keep Hydra's records of this session apart
    (``hydra.output_subdir=.hydra/resume-K``). Without ``ckpt_path`` (or with ``ckpt_path=null``) ``argv`` is
    returned unchanged.

    Raises:
        SystemExit: ``ckpt_path`` with ``--multirun`` (resume each job with its own command).
        FileNotFoundError: see :func:`resolve_ckpt_path`.
    """
    argv = list(argv)
    hits = [a for a in argv if _CKPT_ARG.match(a)]
    if not hits or any(a in ("-h", "--help", "--hydra-help", "--info") for a in argv):
        return argv
    value = _CKPT_ARG.match(hits[-1]).group(1).strip().strip("'\"")  # type: ignore[union-attr]
    if value.lower() in ("", "null", "none"):
        return argv
    if any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv):
        raise SystemExit(f"ckpt_path={value} cannot be combined with --multirun: every job of a sweep has its own "
                         f"checkpoint; resume a job with its own command, e.g. python -m recipes.{config_name} "
                         f"<the job's overrides> ckpt_path=last")
    from omegaconf import OmegaConf

    from recipes.config import compose

    others = [a for a in argv if a not in hits and not a.startswith("-")]
    cfg = compose(config_name, others, return_hydra_config=True)
    run_dir, sweep_dir = Path(str(cfg.hydra.run.dir)), Path(str(cfg.hydra.sweep.dir))
    job = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
           for k in cfg if k != "hydra"}
    ckpt = resolve_ckpt_path(value, job, [run_dir.parent, sweep_dir.parent], resume_ignored(cfg))
    assert ckpt is not None
    target = ckpt.parent
    k = 1 + sum(1 for _ in (target / ".hydra").glob("resume-*")) if (target / ".hydra").is_dir() else 1
    kept = [a for a in argv if a not in hits and not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    print(f"resuming from {ckpt}: the run continues in {target}", file=sys.stderr)
    return [*kept, f"ckpt_path={_quote(str(ckpt))}", f"hydra.run.dir={_quote(str(target))}",
            f"hydra.output_subdir=.hydra/resume-{k}"]
