"""The three-seed tables of docs/local_solvers/README.md: seed 0 from report.json (its run directories were not
kept), seeds 1 and 2 from runs/alpha{ALPHA}_seed{1,2}/ (summary.json, history.json, overrides).

    python docs/local_solvers/three_seeds.py            # alpha 0.5
    python docs/local_solvers/three_seeds.py 0.1
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics as st
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
BRANCHING = {"two_layer": "[8, 8]", "three_layer": "[4, 4, 4]", "four_layer": "[2, 2, 4, 4]"}
ORDER = ["fedavg/all", "fedprox/devices", "fedprox/all", "scaffold/devices", "scaffold/all", "admm/devices", "admm/all"]


def collect(alpha: str) -> dict[tuple[str, str], dict[str, list]]:
    """(tree, "solver/layers") -> the final and best accuracies (%) over the seeds, and how many stopped on NaN."""
    cells: dict[tuple[str, str], dict[str, list]] = {}
    seen: set[tuple[str, str, int]] = set()

    def add(branching: str, solver: str, at: str, final, best, stopped: bool, seed: int) -> None:
        if (branching, f"{solver}/{at}", seed) in seen:  # a job run again by hand after a skipped multirun job
            return
        seen.add((branching, f"{solver}/{at}", seed))
        c = cells.setdefault((branching, f"{solver}/{at}"), {"final": [], "best": [], "stopped": 0})
        c["final"].append(final)
        c["best"].append(best)
        c["stopped"] += int(stopped)

    for s in json.load(open(os.path.join(HERE, "report.json")))["settings"]:
        opts = dict(re.findall(r"([\w.]+)=(\[[^\]]*\]|[^,]+)", s["setting"]))
        if opts["partition.alpha"] != alpha:
            continue
        final, best = s["final_test_acc_pct"]["values"][0], s["best_test_acc_pct"]["values"][0]
        add(opts["hierarchy.branching"], opts["local_solver.layers"], opts["local_solver.at"], final, best,
            final is None, 0)
    for d in sorted(glob.glob(os.path.join(HERE, "runs", f"alpha{alpha}_seed*", "*", "[0-9]*"))):
        summary = json.load(open(f"{d}/summary.json"))
        o = dict(x.split("=", 1) for x in yaml.safe_load(open(f"{d}/overrides.yaml")) if "=" in x)
        final = summary.get("final_test_acc")
        history = json.load(open(f"{d}/history.json"))
        best = max((r["test_acc"] for r in history if "test_acc" in r), default=None)
        add(BRANCHING[o["hierarchy"]], o["local_solver"], o["local_solver.at"],
            None if final is None else 100 * final, None if best is None else 100 * best,
            bool(summary.get("stop_reason")), int(o["seed"]))
    return cells


def fmt(vals: list) -> str:
    """mean ± std over the seeds that finished (n when not 3)."""
    v = [x for x in vals if x is not None]
    if not v:
        return "n/a"
    s = f"{st.mean(v):.2f}" + (f" ± {st.stdev(v):.2f}" if len(v) > 1 else "")
    return s + (f" (n={len(v)})" if len(v) != 3 else "")


def main(alpha: str) -> None:
    cells = collect(alpha)
    print("| tree | solver / layers | final acc % | best acc % over rounds | runs stopped on NaN |")
    print("|---|---|---:|---:|---:|")
    for branching in BRANCHING.values():
        for key in ORDER:
            c = cells.get((branching, key))
            if c is None:
                continue
            print(f"| {branching} | {key} | {fmt(c['final'])} | {fmt(c['best'])} | {c['stopped']} of {len(c['final'])} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "0.5")
