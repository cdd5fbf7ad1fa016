"""Finished runs as the report reads them: a run directory's ``summary.json`` and ``history.json`` (checked), its
flattened config, and the search for run directories below given paths (:func:`collect_runs`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HISTORY", "SUMMARY", "Run", "collect_runs", "flatten_config", "is_number", "key_under", "load_run"]

SUMMARY = "summary.json"
HISTORY = "history.json"
_REQUIRED_NUMBERS = ("rounds", "bits_total", "baseline_bits_total", "sim_time_s", "wall_time_s")
_OPTIONAL_ACCURACIES = ("final_test_acc", "best_test_acc")


@dataclass
class Run:
    """One finished run: its directory, ``summary.json``, ``history.json`` and flattened config."""

    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    flat_config: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        """The run's seed (``summary["seed"]``, else ``config["seed"]``, else None)."""
        if "seed" in self.summary:
            return self.summary["seed"]
        return self.summary["config"].get("seed")

    @property
    def final_sim_time(self) -> float:
        """Simulated seconds at the end of the run (``summary["sim_time_s"]``)."""
        return float(self.summary["sim_time_s"])


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested dict: ``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``.

    Lists (and empty dicts) are leaves.
    """
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def key_under(key: str, prefixes: Sequence[str]) -> bool:
    """Whether the dotted config ``key`` is one of ``prefixes`` or lies below one (``"logger"`` covers
    ``"logger.mode"``, not ``"loggers"``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from e


def _validate_summary(summary: Any, path: Path) -> dict[str, Any]:
    if not isinstance(summary, dict):
        raise ValueError(f"malformed {path}: expected a JSON object, got {type(summary).__name__}")
    if not isinstance(summary.get("config"), dict):
        raise ValueError(f"malformed {path}: 'config' must be an object (the resolved run config), "
                         f"got {summary.get('config')!r}")
    for key in _REQUIRED_NUMBERS:
        if key not in summary:
            raise ValueError(f"malformed {path}: missing key {key!r}")
        if not is_number(summary[key]):
            raise ValueError(f"malformed {path}: {key!r} must be a number, got {summary[key]!r}")
    for key in _OPTIONAL_ACCURACIES:
        if key not in summary:
            raise ValueError(f"malformed {path}: missing key {key!r}")
        if summary[key] is not None and not is_number(summary[key]):
            raise ValueError(f"malformed {path}: {key!r} must be a number or null, got {summary[key]!r}")
    return summary


def _validate_history(history: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(history, list):
        raise ValueError(f"malformed {path}: expected a JSON list of per-round records, got {type(history).__name__}")
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            raise ValueError(f"malformed {path}: record {i} must be an object, got {rec!r}")
        if not is_number(rec.get("round")):
            raise ValueError(f"malformed {path}: record {i} has no numeric 'round' (got {rec.get('round')!r})")
        for key in ("test_acc", "sim_time", "bits_total"):
            if key in rec and rec[key] is not None and not is_number(rec[key]):
                raise ValueError(f"malformed {path}: record {i} has {key!r} = {rec[key]!r}, expected a number")
    return history


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read and validate ``summary.json`` and ``history.json`` of one run directory.

    Raises:
        ValueError: a file is missing or malformed; the message names the file.
    """
    run_dir = Path(run_dir)
    summary_path, history_path = run_dir / SUMMARY, run_dir / HISTORY
    if not summary_path.is_file():
        raise ValueError(f"no {SUMMARY} in run directory {run_dir}")
    if not history_path.is_file():
        raise ValueError(f"run directory {run_dir} has a {SUMMARY} but no {HISTORY} ({history_path})")
    summary = _validate_summary(_read_json(summary_path), summary_path)
    history = _validate_history(_read_json(history_path), history_path)
    return Run(path=run_dir, summary=summary, history=history, flat_config=flatten_config(summary["config"]))


def collect_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run below ``paths``: each path is a run directory or a directory searched recursively for them.

    Runs are returned sorted by path (numbers in names numerically: job ``2/`` before ``10/``), each once.

    Raises:
        ValueError: a path does not exist, a path holds no run, or a run's files are malformed.
    """
    found: dict[Path, Path] = {}
    paths = list(paths)
    if not paths:
        raise ValueError("no run directories given")
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ValueError(f"run directory {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory (give run directories or their parents)")
        hits: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if SUMMARY in filenames:
                hits.append(Path(dirpath))
        if not hits:
            raise ValueError(f"no {SUMMARY} found in {root} or any directory below it")
        for h in hits:
            found.setdefault(h.resolve(), h)
    return [load_run(found[key]) for key in sorted(found, key=_natural_key)]


def _natural_key(path: Path) -> tuple:
    """Sort key of a path with numbers compared numerically, so Hydra job ``2/`` comes before ``10/``."""
    return tuple(tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.split(r"(\d+)", part) if c)
                 for part in path.parts)
