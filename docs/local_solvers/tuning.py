"""The tuning table of docs/local_solvers/README.md: every run under runs/tuning/ (summary.json, history.json,
overrides.yaml), grouped by tree, solver, layers and the tuned values (mu, rho, variates, learning rate, quantizer), mean ±
std over the seeds, beside FedAvg at the recipe's lr 0.05 (three seeds: three_seeds.py's sources); then, for the
settings with three seeds and FedAvg (seeds 1 and 2, whose run directories were kept), the rounds, bits and
simulated seconds each needed to first reach a test accuracy (``--reach``, default 91.5 %).

    python docs/local_solvers/tuning.py [--reach 91.5]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics as st

import yaml

from three_seeds import BRANCHING, HERE, collect, fmt

TUNED = ("local_solver.mu", "local_solver.rho", "local_solver.variates", "model.lr", "quantizer")


def _runs(pattern: str):
    for d in sorted(glob.glob(os.path.join(HERE, "runs", *pattern.split("/")))):
        o = dict(x.split("=", 1) for x in yaml.safe_load(open(f"{d}/overrides.yaml")) if "=" in x)
        yield d, o, json.load(open(f"{d}/summary.json")), json.load(open(f"{d}/history.json"))


def reach(level: float) -> None:
    """Rounds, Gbit and simulated seconds to the first round at ``level`` % test accuracy (mean over the seeds that
    got there; how many did)."""
    cells: dict[tuple[str, str], list[tuple[int, float, float] | None]] = {}
    sources = [("alpha0.1_seed*/fedavg/[0-9]*", None), ("tuning/*/[0-9]*", "local_solver.variates")]
    for pattern, needs in sources:
        for _, o, _, history in _runs(pattern):
            if needs is not None and needs not in o:
                continue
            label = f"{o['local_solver']}/{o['local_solver.at']}" + (f", variates {o[needs]}" if needs else ", lr 0.05")
            hit = next((r for r in history if r.get("test_acc", 0) * 100 >= level), None)
            cells.setdefault((BRANCHING[o["hierarchy"]], label), []).append(
                None if hit is None else (hit["round"], hit["bits_total"] / 1e9, hit["sim_time"]))
    print(f"\nFirst round at {level} % test accuracy (mean over the seeds that reached it):\n")
    print("| tree | solver | seeds that reached it | rounds | Gbit sent | simulated s |")
    print("|---|---|---:|---:|---:|---:|")
    for branching in BRANCHING.values():
        for (b, label), hits in sorted(cells.items()):
            if b != branching:
                continue
            got = [h for h in hits if h is not None]
            row = (" | ".join(f"{st.mean(h[k] for h in got):.1f}" for k in range(3)) if got else "- | - | -")
            print(f"| {b} | {label} | {len(got)} of {len(hits)} | {row} |")


def main() -> None:
    cells: dict[tuple[str, str, str], dict[str, list]] = {}
    for d in sorted(glob.glob(os.path.join(HERE, "runs", "tuning", "*", "[0-9]*"))):
        summary = json.load(open(f"{d}/summary.json"))
        o = dict(x.split("=", 1) for x in yaml.safe_load(open(f"{d}/overrides.yaml")) if "=" in x)
        history = json.load(open(f"{d}/history.json"))
        best = max((r["test_acc"] for r in history if "test_acc" in r), default=None)
        final = summary.get("final_test_acc")
        setting = ", ".join(f"{k.split('.')[-1]} {o[k]}" for k in TUNED if k in o) or "recipe defaults"
        c = cells.setdefault((BRANCHING[o["hierarchy"]], f"{o['local_solver']}/{o['local_solver.at']}", setting),
                             {"final": [], "best": [], "stopped": 0, "seeds": set()})
        if int(o["seed"]) in c["seeds"]:  # a job run again by hand after a skipped multirun job
            continue
        c["seeds"].add(int(o["seed"]))
        c["final"].append(None if final is None else 100 * final)
        c["best"].append(None if best is None else 100 * best)
        c["stopped"] += int(bool(summary.get("stop_reason")))
    reference = collect("0.1")
    print("| tree | solver / layers | setting | seeds | final acc % | best acc % over rounds | stopped on NaN |")
    print("|---|---|---|---:|---:|---:|---:|")
    for branching in BRANCHING.values():
        ref = reference.get((branching, "fedavg/all"))
        if ref is not None and any(k[0] == branching for k in cells):
            print(f"| {branching} | fedavg/all | lr 0.05 (the recipe) | 3 | {fmt(ref['final'])} | {fmt(ref['best'])} "
                  f"| {ref['stopped']} |")
        for (b, solver, setting), c in sorted(cells.items()):
            if b != branching:
                continue
            n = len(c["final"])
            print(f"| {b} | {solver} | {setting} | {n} | {fmt(c['final']) if n == 3 else _plain(c['final'])} | "
                  f"{fmt(c['best']) if n == 3 else _plain(c['best'])} | {c['stopped']} |")


def _plain(vals: list) -> str:
    """One seed's value (or the values of a few), without a spread."""
    return ", ".join("NaN stop" if v is None else f"{v:.2f}" for v in vals)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reach", type=float, default=91.5, help="test accuracy in %% (default 91.5)")
    args = ap.parse_args()
    main()
    reach(args.reach)
