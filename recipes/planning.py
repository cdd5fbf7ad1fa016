"""Experiment 3 of docs/README.md: the planner's tau against random feasible tau under one deadline.

``python -m recipes.planning [hydra overrides of recipes.mnist]`` composes ``recipes/conf/mnist.yaml`` with
``+experiment=planning`` (the setting: hierarchy, links, compute time per step, simulated deadline, the smoothness
constant L assumed for Eq. 15, the learning rate mu we would like to train with), then

1. plans tau with :func:`lightning_qmlhfl.theory.planner.plan_taus` (objective mu(tau) * floor(T_d / T_glob) * prod tau,
   subject to Eq. 15; mu(tau) is mu where Eq. 15 admits it, else ``safety * mu_max(tau)``);
2. draws ``planning.random_taus`` distinct random tau uniformly from [1, tau_max]^N, keeping only those that are
   feasible (at least one global round fits the deadline) and differ from the plan; each is scored the same way
   (:func:`lightning_qmlhfl.theory.planner.evaluate_taus`) and trained with its own admissible mu(tau), so the
   comparison is about tau, not about who got the better learning rate;
3. trains every tau for every seed in ``planning.seeds`` with ``recipes.train.run``: exactly
   T = floor(T_d / T_glob(tau)) global rounds (``deadline``), so every run stops at the same simulated
   deadline, and reads the cloud model's test accuracy at the deadline;
4. writes ``results.md`` (table, mean +- std over seeds), ``results.json``, ``accuracy_at_deadline.png`` and
   ``accuracy_vs_sim_time.png`` into ``planning.out`` (default ``docs/planning``), the per-run directories under
   ``planning.runs_dir``.

Runs that already have a ``summary.json`` are reused (``planning.reuse=true``) so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*LeafSpec.*")

import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightning_qmlhfl.theory.planner import Plan, evaluate_taus, plan_taus  # noqa: E402
from recipes.components import build_model  # noqa: E402
from recipes.config import compose  # noqa: E402
from recipes.curves import interpolate_common  # noqa: E402
from recipes.simulation import build_compressors, build_hierarchy, build_latency  # noqa: E402
from recipes.train import run  # noqa: E402


def compose_cfg(overrides: list[str]) -> DictConfig:
    return compose("mnist", ["+experiment=planning", *overrides])


def count_params(cfg: DictConfig) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())


def candidates(cfg: DictConfig) -> tuple[Plan, list[Plan], dict[str, Any]]:
    """The planner's plan and the random feasible tau, each scored with the planner's objective."""
    p = cfg.planning
    h = build_hierarchy(cfg)
    qs = build_compressors(cfg, h.num_layers)
    d = count_params(cfg)
    latency = build_latency(cfg, h.num_layers)
    common = dict(L=float(p.L), mu=float(p.mu), safety=float(p.safety))
    deadline = float(cfg.deadline)
    plan = plan_taus(h, qs, d, latency, deadline, tau_max=int(p.tau_max), **common).require_feasible()
    rng = np.random.default_rng(int(p.get("random_seed", 2026)))
    chosen: list[Plan] = []
    seen = {tuple(plan.taus)}
    tries = 0
    while len(chosen) < int(p.random_taus):
        tries += 1
        if tries > 10_000:
            raise RuntimeError(f"found only {len(chosen)} random feasible tau in 10,000 draws; raise the deadline")
        t = tuple(int(v) for v in rng.integers(1, int(p.tau_max) + 1, size=h.num_layers))
        if t in seen:
            continue
        seen.add(t)
        ev = evaluate_taus(t, h, qs, d, latency, deadline, **common)
        if ev.feasible:
            chosen.append(ev)
    partition = str(cfg.partition.name) + (f" alpha {cfg.partition.alpha}" if "alpha" in cfg.partition else "")
    setting = {"d": d, "deadline": deadline, "model": str(cfg.model.name), "partition": partition,
               "hierarchy": list(cfg.hierarchy.branching),
               "quantizers": [repr(q) for q in qs], "uplink_rates": list(latency.uplink_rates),
               "compute_time": latency.compute_time, **common, "tau_max": int(p.tau_max), "draws": tries}
    return plan, chosen, setting


def train(cfg_overrides: list[str], run_dir: Path, reuse: bool) -> dict[str, Any]:
    if reuse and (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = compose_cfg(cfg_overrides)
    return run(cfg, run_dir)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = compose_cfg(overrides)
    p = cfg.planning
    out = Path(p.get("out") or "docs/planning")
    runs_dir = Path(p.get("runs_dir") or "outputs/planning")
    out.mkdir(parents=True, exist_ok=True)
    plan, randoms, setting = candidates(cfg)
    print(f"planner: tau = {list(plan.taus)}, T = {plan.rounds}, mu = {plan.mu:.4g}, objective {plan.objective:.4g}")
    for r in randoms:
        print(f"random : tau = {list(r.taus)}, T = {r.rounds}, mu = {r.mu:.4g}, objective {r.objective:.4g}")
    rows = []
    t0 = time.time()
    for kind, pl in [("planner", plan)] + [("random", r) for r in randoms]:
        tau_s = ",".join(str(t) for t in pl.taus)
        results = []
        for seed in p.seeds:
            run_dir = runs_dir / f"tau{tau_s.replace(',', '-')}_seed{seed}"
            ov = [*overrides, f"hierarchy.taus=[{tau_s}]", f"model.lr={pl.mu!r}", f"seed={seed}"]
            s = train(ov, run_dir, bool(p.get("reuse", True)))
            hist = json.loads((run_dir / "history.json").read_text())
            results.append({"seed": int(seed), "acc": s["final_test_acc"], "rounds": s["rounds"],
                            "sim_time": s["sim_time_s"], "wall": s["wall_time_s"], "run_dir": str(run_dir),
                            "curve": [(h["sim_time"], h["test_acc"]) for h in hist if "test_acc" in h]})
        accs = [r["acc"] for r in results]
        rows.append({"kind": kind, "taus": list(pl.taus), "rounds": pl.rounds, "prod_tau": math.prod(pl.taus),
                     "mu": pl.mu, "mu_max": pl.mu_max, "objective": pl.objective,
                     "t_glob": pl.round_time.total if pl.round_time else None,
                     "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "runs": results})
    # Sum of the runs' own wall times (reused runs keep theirs), so a resumed sweep reports the full cost.
    wall = sum(r["wall"] for row in rows for r in row["runs"])
    print(f"done in {time.time() - t0:.0f} s; the runs took {wall:.0f} s of wall time in all")
    write(out, rows, setting, overrides, wall)
    return 0


def write(out: Path, rows: list[dict[str, Any]], setting: dict[str, Any], overrides: list[str], wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps({"setting": setting, "rows": rows, "wall_s": wall}, indent=1))
    ranked = sorted(rows, key=lambda r: -r["acc_mean"])
    rank_of_plan = 1 + [r["kind"] for r in ranked].index("planner")
    lines = [
        "# Experiment 3: planner tau vs random feasible tau under one deadline",
        "",
        f"Command: `{' '.join(['python -m recipes.planning', *overrides])}` ({wall / 60:.1f} min "
        "of training wall time on this 2-core CPU, all runs summed)",
        "",
        f"Setting: non-IID MNIST ({setting['partition']}), model {setting['model']} (d = {setting['d']:,}), hierarchy "
        f"{setting['hierarchy']} ({math.prod(setting['hierarchy'])} devices), uploads {setting['quantizers']}, "
        f"uplinks {setting['uplink_rates']} bit/s (layer 1 first), {setting['compute_time'] * 1e3:g} ms per local "
        f"step, simulated deadline T_d = {setting['deadline']:g} s. Learning rate: mu = {setting['mu']:g} where Eq. 15 "
        f"(with L = {setting['L']:g}) admits it, else {setting['safety']:g} x mu_max(tau). Random tau: uniform on "
        f"[1, {setting['tau_max']}]^N, kept if at least one global round fits the deadline.",
        "",
        "| | tau | T (rounds) | prod tau | T_glob [s] | mu | objective mu*T*prod tau | test acc at deadline [%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['taus']} | {r['rounds']} | {r['prod_tau']} | {r['t_glob']:.3f} | {r['mu']:.4g} | "
            f"{r['objective']:.2f} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} |"
        )
    lines += ["", f"The planner's tau ranks {rank_of_plan} of {len(rows)} by mean accuracy at the deadline "
              f"(mean ± sample std over seeds {[x['seed'] for x in rows[0]['runs']]})."]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["objective"], 100 * r["acc_mean"], yerr=100 * r["acc_std"], fmt="o" if r["kind"] == "random"
                    else "*", ms=8 if r["kind"] == "random" else 14, capsize=3,
                    label=f"{r['kind']} tau={r['taus']}")
    ax.set_xlabel("planner objective mu * T * prod tau")
    ax.set_ylabel("cloud test accuracy at the deadline [%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_at_deadline.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        curves = [tuple(np.array(v, dtype=float) for v in zip(*run_["curve"])) for run_ in r["runs"]]
        common = interpolate_common(curves)  # the simulated-time range every seed covers, no extrapolation
        if common is None:
            continue
        grid, ys = common
        m = 100 * ys.mean(0)
        sd = 100 * ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(m)
        ax.plot(grid, m, marker=".", lw=2.5 if r["kind"] == "planner" else 1, label=f"{r['kind']} {r['taus']}")
        ax.fill_between(grid, m - sd, m + sd, alpha=0.15)
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("cloud test accuracy [%]")
    ax.set_title("mean ± 1 sample std over seeds", fontsize=9)
    ax.set_ylim(50, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sim_time.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
