"""Compare finished runs: ``python -m recipes.report RUN_DIR... [--out DIR] [--group-by KEY ...]``.

Every ``RUN_DIR`` is either a run directory written by :mod:`recipes.train` (it holds ``summary.json`` and
``history.json``) or a directory above such runs, e.g. a Hydra multirun directory
``multirun/depth/2026-11-30_10-00-00/`` with numbered job subdirectories: it is searched recursively and every
directory holding a ``summary.json`` is one run.

Runs that differ only by their seed form one *setting*. Settings are told apart by dotted config keys: the ones given
with ``--group-by`` (e.g. ``hierarchy.branching partition.alpha quantizer.levels``), or, by default, every config
leaf whose value differs across the runs, except seeds, the run ``name``, name-like fields that embed a timestamp,
``data_dir``, ``ckpt_path`` (a resumed run is the same setting) and anything under ``hydra``.

Written into ``--out`` (default ``./report``):

- ``report.md``: one table row per setting: seeds, final/best cloud test accuracy (mean ± sample std over seeds; "best"
  is the summary's ``best_test_acc``: the test accuracy of the model best on validation),
  accuracy at a common simulated-time budget, rounds, simulated time, bits sent against the 32-bit baseline and
  wall time; the run directories used;
- ``report.json``: the same numbers, machine-readable;
- ``accuracy_vs_round.png``, ``accuracy_vs_sim_time.png``, ``accuracy_vs_bits.png``: per setting the mean accuracy
  curve over seeds with a shaded band (± 1 sample std, or min-max with ``--band minmax``). Seeds are aligned on the
  rounds they all evaluated; for simulated time and bits each seed is linearly interpolated onto the knots of all
  seeds inside the x range every seed covers.

The accuracy at the budget ``T`` (``--budget-sim-time``) of a run is the test accuracy of its last evaluated round
with simulated time <= T; by default ``T`` is the smallest final simulated time over all runs, a time every run
reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Run",
    "Curve",
    "X_AXES",
    "collect_runs",
    "load_run",
    "flatten_config",
    "key_under",
    "auto_group_keys",
    "group_runs",
    "default_budget",
    "accuracy_at_sim_time",
    "run_curve",
    "interpolate_common",
    "align_rounds",
    "aggregate_curve",
    "mean_std",
    "summarize",
    "write_report",
    "plot_curves",
    "main",
]

from recipes.curves import (BANDS, X_AXES, Curve, record_x, aggregate_curve, align_rounds, interpolate_common,
                            run_curve)
from recipes.runs import Run, is_number, collect_runs, flatten_config, key_under, load_run

_BITS_PER_MB = 8e6
_REL_TOL = 1e-9  # tolerance of the budget comparison, so a run whose final time equals T counts as having reached T
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}[-_:]\d{2}[-_:]\d{2}")


# ===================================================================================================== grouping
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _display(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _sort_key(value: Any) -> tuple:
    """Orders config values naturally: null < numbers (numerically) < strings < lists < objects."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, float(value))
    if is_number(value):
        return (1, float(value))
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, (list, tuple)):
        return (3, tuple(_sort_key(v) for v in value))
    return (4, _canonical(value))


_MISSING = "<unset>"


def _is_excluded(key: str, values: Sequence[Any], extra: Sequence[str]) -> bool:
    last = key.rsplit(".", 1)[-1]
    if last == "seed" or key in ("name", "ckpt_path") or last == "data_dir" or key.split(".", 1)[0] == "hydra":
        return True
    if key_under(key, extra):
        return True
    if "name" in last and any(isinstance(v, str) and _TIMESTAMP.search(v) for v in values):
        return True
    return False


def auto_group_keys(runs: Sequence[Run], exclude: Sequence[str] = ()) -> list[str]:
    """Dotted config keys whose value differs across ``runs`` (a key absent from some runs differs), sorted.

    Seeds, the top-level ``name``, name-like fields holding a timestamp, ``data_dir``, ``ckpt_path``, ``hydra.*`` and
    the keys (or key prefixes) in ``exclude`` are left out.
    """
    all_keys = sorted({k for r in runs for k in r.flat_config})
    keys = []
    for key in all_keys:
        values = [r.flat_config.get(key, _MISSING) for r in runs]
        if len({_canonical(v) for v in values}) > 1 and not _is_excluded(key, values, exclude):
            keys.append(key)
    return keys


def group_runs(runs: Sequence[Run], keys: Sequence[str] | None = None,
               exclude: Sequence[str] = ()) -> dict[str, list[Run]]:
    """Group runs into settings by the values of dotted config ``keys`` (default: :func:`auto_group_keys`).

    Returns ``{label: runs}`` with labels like ``"hierarchy.branching=[8, 8], partition.alpha=0.5"`` (or
    ``"all runs"`` when no key tells runs apart), in a stable order: sorted by the key values, numbers numerically.
    Runs inside a setting keep their (path) order.

    Raises:
        ValueError: a key given explicitly is in no run's config.
    """
    if not runs:
        raise ValueError("no runs to group")
    if keys is None:
        keys = auto_group_keys(runs, exclude)
    else:
        keys = list(keys)
        for key in keys:
            if not any(key in r.flat_config for r in runs):
                available = sorted({k for r in runs for k in r.flat_config})
                raise ValueError(f"--group-by key {key!r} is in no run's config; available keys: "
                                 f"{', '.join(available)}")
    buckets: dict[tuple[str, ...], list[Run]] = {}
    values_of: dict[tuple[str, ...], list[Any]] = {}
    for r in runs:
        values = [r.flat_config.get(k, _MISSING) for k in keys]
        ident = tuple(_canonical(v) for v in values)
        buckets.setdefault(ident, []).append(r)
        values_of[ident] = values
    order = sorted(buckets, key=lambda ident: tuple(_sort_key(v) for v in values_of[ident]))
    groups: dict[str, list[Run]] = {}
    for ident in order:
        label = ", ".join(f"{k}={_display(v)}" for k, v in zip(keys, values_of[ident])) or "all runs"
        groups[label] = buckets[ident]
    return groups


# ================================================================================================== statistics
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof = 1; None for fewer than 2 values) and count of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if len(vals) >= 2 else None
    return mean, std, len(vals)


def accuracy_at_sim_time(run: Run, budget: float) -> float | None:
    """Test accuracy of the last evaluated record of ``run`` with ``sim_time <= budget`` (None if none)."""
    limit = budget + _REL_TOL * max(1.0, abs(budget))
    acc = None
    best_t = -math.inf
    for rec in run.history:
        if rec.get("test_acc") is None:
            continue
        t = record_x(rec, "sim_time")
        if t is not None and t <= limit and t >= best_t:
            best_t, acc = t, float(rec["test_acc"])
    return acc


def default_budget(runs: Sequence[Run]) -> float:
    """The smallest final simulated time over ``runs``: a time every run reached."""
    if not runs:
        raise ValueError("no runs to take a simulated-time budget from")
    return min(r.final_sim_time for r in runs)


def summarize(groups: Mapping[str, Sequence[Run]], budget: float | None = None) -> list[dict[str, Any]]:
    """One row of numbers per setting, in the order of ``groups``.

    Accuracies are in percent with mean, sample std over seeds (None for one seed), the number of seeds that had a
    value, and the per-seed values. ``budget`` is the simulated time (s) of the common-budget accuracy; None: the
    smallest final simulated time over all runs.
    """
    all_runs = [r for rs in groups.values() for r in rs]
    if budget is None:
        budget = default_budget(all_runs)
    rows: list[dict[str, Any]] = []

    def acc_stats(values: list[float | None]) -> dict[str, Any]:
        pct = [None if v is None else 100.0 * v for v in values]
        mean, std, n = mean_std(pct)
        return {"mean": mean, "std": std, "n": n, "values": pct}

    for label, runs in groups.items():
        s = [r.summary for r in runs]
        rounds = [int(x["rounds"]) for x in s]
        ratios = [x["bits_total"] / x["baseline_bits_total"] if x["baseline_bits_total"] else None for x in s]
        seeds = [r.seed for r in runs]
        rows.append({
            "setting": label,
            "n_seeds": len(runs),
            "seeds": seeds,
            "duplicate_seeds": len(set(map(_canonical, seeds))) < len(seeds),
            "run_dirs": [str(r.path) for r in runs],
            "final_test_acc_pct": acc_stats([x["final_test_acc"] for x in s]),
            "best_test_acc_pct": acc_stats([x["best_test_acc"] for x in s]),
            "budget_sim_time_s": float(budget),
            "budget_test_acc_pct": acc_stats([accuracy_at_sim_time(r, budget) for r in runs]),
            "rounds": {"mean": float(np.mean(rounds)), "min": min(rounds), "max": max(rounds)},
            "sim_time_s_mean": float(np.mean([x["sim_time_s"] for x in s])),
            "bits_total_mb_mean": float(np.mean([x["bits_total"] for x in s])) / _BITS_PER_MB,
            "baseline_bits_total_mb_mean": float(np.mean([x["baseline_bits_total"] for x in s])) / _BITS_PER_MB,
            "bits_ratio_to_32bit_mean": mean_std(ratios)[0],
            "wall_time_s_mean": float(np.mean([x["wall_time_s"] for x in s])),
        })
    return rows


_X_LABEL = {"round": "global round", "sim_time": "simulated time [s]", "bits": "cumulative bits sent [MB]"}
_X_FILE = {"round": "accuracy_vs_round.png", "sim_time": "accuracy_vs_sim_time.png", "bits": "accuracy_vs_bits.png"}
_LEGEND_WIDTH = 90  # characters per legend line
_BAND_TEXT = {"std": "band: mean ± 1 sample std over seeds", "minmax": "band: min-max over seeds"}


def plot_curves(groups: Mapping[str, Sequence[Run]], x: str, path: Path, band: str = "std",
                title: str = "") -> list[str]:
    """Plot the mean accuracy curve and band of every setting against ``x`` into a PNG (Agg, no pyplot).

    Returns the labels of settings left out because their seeds have no common x range / rounds.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Long setting labels (many overrides) are wrapped and the legend goes below the axes, where it cannot cover
    # the curves or be cut off at the figure's edge.
    wrapped = {label: "\n".join(textwrap.wrap(label, _LEGEND_WIDTH, break_on_hyphens=False)) or label
               for label in groups}
    below = any("\n" in w for w in wrapped.values())
    legend_lines = sum(w.count("\n") + 1 for w in wrapped.values())
    fig = Figure(figsize=(8, 5 + (0.16 * legend_lines if below else 0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    skipped: list[str] = []
    plotted = 0
    for i, (label, runs) in enumerate(groups.items()):
        curve = aggregate_curve(runs, x, band)
        if curve is None:
            skipped.append(label)
            continue
        color = f"C{i % 10}"
        marker = "o" if len(curve.x) == 1 else None
        ax.plot(curve.x, 100 * curve.mean, color=color, marker=marker, label=f"{wrapped[label]} (n={curve.n})")
        if curve.n >= 2:
            ax.fill_between(curve.x, 100 * curve.lo, 100 * curve.hi, color=color, alpha=0.2, linewidth=0)
        plotted += 1
    if plotted == 0:
        ax.text(0.5, 0.5, "no evaluated records in common", ha="center", va="center", transform=ax.transAxes)
    elif below:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), frameon=False)
    else:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(_X_LABEL[x])
    ax.set_ylabel("cloud test accuracy [%]")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title + ': ' if title else ''}accuracy vs {_X_LABEL[x]}\n({_BAND_TEXT[band]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return skipped


# ====================================================================================================== output
def _fmt_acc(stats: Mapping[str, Any]) -> str:
    if stats["mean"] is None:
        return "n/a"
    std = "n/a" if stats["std"] is None else f"{stats['std']:.2f}"
    return f"{stats['mean']:.2f} ± {std}"


def _fmt_rounds(r: Mapping[str, Any]) -> str:
    return str(r["min"]) if r["min"] == r["max"] else f"{r['min']}–{r['max']} (mean {r['mean']:.1f})"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_table(rows: Sequence[Mapping[str, Any]], budget: float) -> str:
    """The Markdown table of :func:`summarize`'s rows."""
    header = ["setting", "seeds", "final acc (%)", "best acc (%)", f"acc @ T = {budget:.2f} s sim. (%)", "rounds",
              "sim. time (s)", "bits sent (MB)", "vs 32-bit", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        ratio = r["bits_ratio_to_32bit_mean"]
        cells = [
            _md_cell(r["setting"]),
            str(r["n_seeds"]),
            _fmt_acc(r["final_test_acc_pct"]),
            _fmt_acc(r["best_test_acc_pct"]),
            _fmt_acc(r["budget_test_acc_pct"]),
            _fmt_rounds(r["rounds"]),
            f"{r['sim_time_s_mean']:.2f}",
            f"{r['bits_total_mb_mean']:.2f}",
            "n/a" if ratio is None else f"{ratio:.3f}x",
            f"{r['wall_time_s_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: str | os.PathLike, groups: Mapping[str, Sequence[Run]], rows: Sequence[Mapping[str, Any]],
                 budget: float, *, title: str = "report", keys: Sequence[str] = (),
                 xs: Sequence[str] = X_AXES, band: str = "std") -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and one ``accuracy_vs_<x>.png`` per entry of ``xs`` into ``out``.

    Returns the written paths by name (``"md"``, ``"json"`` and the x axes).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [str(r.path) for rs in groups.values() for r in rs]
    written: dict[str, Path] = {}
    skipped: dict[str, list[str]] = {}
    for x in xs:
        path = out / _X_FILE[x]
        skipped[x] = plot_curves(groups, x, path, band=band, title=title)
        written[x] = path

    grouped_by = ", ".join(keys) if keys else "(nothing differs: one setting)"
    md = [
        f"# {title}",
        "",
        f"Settings grouped by: {grouped_by}; seeds pooled. Accuracies: mean ± sample std (ddof = 1) over seeds, "
        f"in %. `acc @ T`: test accuracy of the last evaluated round with simulated time <= T = {budget:.2f} s. "
        f"Bits: mean total bits sent over all layers, in MB (bits / 8e6), and their ratio to 32-bit uploads.",
        "",
        format_table(rows, budget),
        "",
    ]
    dups = [r["setting"] for r in rows if r["duplicate_seeds"]]
    if dups:
        md += [f"Warning: repeated seeds within: {'; '.join(dups)}.", ""]
    for x in xs:
        if skipped[x]:
            md += [f"Not in {_X_FILE[x]} (seeds share no {x} range): {'; '.join(skipped[x])}.", ""]
    md += [f"![accuracy vs {x}]({_X_FILE[x]})" for x in xs]
    md += ["", f"Run directories ({len(run_dirs)}): " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    written["md"] = out / "report.md"
    written["md"].write_text("\n".join(md))

    payload = {
        "title": title,
        "group_by": list(keys),
        "budget_sim_time_s": float(budget),
        "band": band,
        "run_dirs": run_dirs,
        "plots": {x: _X_FILE[x] for x in xs},
        "settings": list(rows),
    }
    written["json"] = out / "report.json"
    written["json"].write_text(json.dumps(payload, indent=2))
    return written


# ========================================================================================================= CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.report",
        description="Turn run directories (or directories above them, e.g. a Hydra multirun) into a Markdown table "
                    "and accuracy plots with seed bands.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run directory (holding summary.json) or a directory searched recursively for runs")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: ./report)")
    p.add_argument("--name", default=None,
                   help="report title (default: the runs' config names)")
    p.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                   help="dotted config keys that tell settings apart, e.g. hierarchy.branching partition.alpha "
                        "(default: every config leaf that differs across runs, except seeds, names, data_dir)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="KEY",
                   help="config keys (or key prefixes) to leave out of the automatic grouping, e.g. logger")
    p.add_argument("--x", nargs="+", choices=X_AXES, default=list(X_AXES), dest="xs",
                   help="x axes to plot accuracy against (default: all of round sim_time bits)")
    p.add_argument("--budget-sim-time", type=float, default=None, metavar="T",
                   help="simulated seconds of the common-budget accuracy (default: smallest final simulated "
                        "time over all runs)")
    p.add_argument("--band", choices=BANDS, default="std",
                   help="shaded band of the curves: ± 1 sample std over seeds (default) or min-max")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Command-line entry point; returns the written paths. Errors exit with a message naming the culprit."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.budget_sim_time is not None and not (math.isfinite(args.budget_sim_time) and args.budget_sim_time >= 0):
        parser.error(f"--budget-sim-time must be a finite number >= 0, got {args.budget_sim_time}")
    try:
        runs = collect_runs(args.run_dirs)
        keys = args.group_by if args.group_by is not None else auto_group_keys(runs, args.exclude)
        groups = group_runs(runs, keys)
        budget = args.budget_sim_time if args.budget_sim_time is not None else default_budget(runs)
        rows = summarize(groups, budget)
    except ValueError as e:
        raise SystemExit(f"report: error: {e}") from e
    title = args.name or ", ".join(sorted({str(r.summary.get("name", "runs")) for r in runs}))
    out = args.out if args.out is not None else Path.cwd() / "report"
    written = write_report(out, groups, rows, budget, title=title, keys=keys, xs=args.xs, band=args.band)
    print(format_table(rows, budget))
    print(f"\n{len(runs)} runs in {len(groups)} settings; wrote {', '.join(str(p) for p in written.values())}")
    return written


if __name__ == "__main__":
    main()
