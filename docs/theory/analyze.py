"""The tables of docs/theory/README.md from the committed runs (issue 28's experiments 1 and 3).

    python docs/theory/analyze.py            # prints both tables as markdown, writes docs/theory/results.json

Experiment 1 (runs/divergence/<depth>_<t>/<job>): a run *trained* when its final cloud test accuracy is >= 50 %;
otherwise it *diverged* when its training loss ever exceeded 10 (or turned NaN), else it *stalled*. Eq. 15's bound
mu* = 1 / (L sqrt(bracket)) is evaluated three ways: with the measured L (the largest over the rounds of the run at
the smallest step size, mean over seeds) and the measured q_n, with the measured L and the compressors' bounds q_n,
and with the assumed L = 0.2 of the earlier planning experiment and the bounds.

Experiment 3, equal energy (runs/energy/<depth>/<job>): every round costs E_glob joules (the energy model's cited
defaults at the run's latency model, computed here with the planner's ``evaluate_taus``); the accuracy when the
budget of 10 kJ is spent, and the joules spent when the cloud model first reached 90 % / 95 %.

Experiment 3 (runs/depth/<variant>/<job>): final accuracy, and the simulated time at which the cloud model first
reached 85 % / 90 % / 95 % test accuracy (history.json's per-round test accuracy against sim_time), and the accuracy of
the last round that ended within the simulated-time budget (``deadline``), mean over seeds.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics as st
import sys

import yaml

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.theory import max_learning_rate

HERE = os.path.dirname(os.path.abspath(__file__))
BRANCHING = {"two_layer": [8, 8], "three_layer": [4, 4, 4], "four_layer": [2, 2, 4, 4]}
ASSUMED_L = 0.2  # the planning experiment's assumption (docs/planning/results.md)


def _runs(pattern: str):
    for d in sorted(glob.glob(os.path.join(HERE, "runs", pattern, "[0-9]*"))):
        if not os.path.exists(f"{d}/summary.json"):
            print(f"missing summary: {d}", file=sys.stderr)
            continue
        s = json.load(open(f"{d}/summary.json"))
        h = json.load(open(f"{d}/history.json"))
        ov = f"{d}/overrides.yaml" if os.path.exists(f"{d}/overrides.yaml") else f"{d}/.hydra/overrides.yaml"
        o = dict(x.split("=", 1) for x in yaml.safe_load(open(ov)) if "=" in x)
        yield os.path.basename(os.path.dirname(d)), s, h, o


def _status(s, h) -> str:
    losses = [r.get("train_loss", math.nan) for r in h]
    if (s.get("final_test_acc") or 0) >= 0.5:
        return "trained"
    if s.get("stop_reason") or any(not math.isfinite(x) or x > 10 for x in losses):
        return "diverged"
    return "stalled"


def divergence() -> dict:
    cells: dict = {}
    for group, s, h, o in _runs("divergence/*"):
        lr = float(o["model.lr"])
        c = cells.setdefault(group, {"taus": s["taus"], "depth": s["layers"], "runs": {}})
        c["runs"].setdefault(lr, []).append({"seed": int(o["seed"]), "status": _status(s, h),
                                             "acc": s.get("final_test_acc"), "theory": s.get("theory")})
    out = {}
    for group, c in sorted(cells.items()):
        taus, depth = c["taus"], c["depth"]
        h = Hierarchy.balanced(BRANCHING[{2: "two_layer", 3: "three_layer", 4: "four_layer"}[depth]])
        lrs = sorted(c["runs"])
        pilot = [r["theory"] for r in c["runs"][lrs[0]] if r["theory"]]
        L = st.mean(t["L"] for t in pilot)
        q = [st.mean((t["q"][n] if t["q"][n] is not None else t["q_bound"][n]) for t in pilot) for n in range(depth)]
        qb = pilot[0]["q_bound"]
        row = {"taus": taus, "depth": depth, "L_measured": L, "q_measured": q, "q_bound": qb,
               "mu_star_measured": max_learning_rate(L, taus, q, h),
               "mu_star_measured_L_bound_q": max_learning_rate(L, taus, qb, h),
               "mu_star_assumed": max_learning_rate(ASSUMED_L, taus, qb, h), "lr": {}}
        for lr in lrs:
            rs = c["runs"][lr]
            accs = [r["acc"] for r in rs if r["acc"] is not None]
            row["lr"][lr] = {"statuses": [r["status"] for r in rs], "acc_mean": st.mean(accs) if accs else None,
                             "L_max_mean": st.mean(r["theory"]["L"] for r in rs if r["theory"])}
        ok = [lr for lr in lrs if all(x == "trained" for x in row["lr"][lr]["statuses"])]
        row["largest_trained_lr"] = max(ok) if ok else None
        bad = [lr for lr in lrs if any(x != "trained" for x in row["lr"][lr]["statuses"])]
        row["smallest_failed_lr"] = min(bad) if bad else None
        out[group] = row
    return out


def depth() -> dict:
    out: dict = {}
    for group, s, h, o in _runs("depth/*"):
        curve = [(r["sim_time"], r["test_acc"]) for r in h if "test_acc" in r]

        def first(target: float) -> float | None:
            return next((t for t, a in curve if a >= target), None)

        budget = float(s["config"].get("deadline") or math.inf)
        within = [a for t, a in curve if t <= budget * (1 + 1e-9)]
        out.setdefault(group, []).append({"seed": int(o["seed"]), "taus": s["taus"], "acc": s.get("final_test_acc"),
                                          "acc_budget": within[-1] if within else None,
                                          "rounds": s["rounds"], "local_steps": s["local_steps"],
                                          "sim_time": s["sim_time_s"], "t85": first(0.85), "t90": first(0.90),
                                          "t95": first(0.95),
                                          "lr": float(o.get("model.lr", "nan")), "status": _status(s, h)})
    return out


def plot_divergence(div: dict, path: str) -> None:
    """One panel per depth: every (lr, tau_1) cell marked by how its seeds ended, Eq. 15's mu* (measured L and q_n:
    solid; assumed L = 0.2 with the bounds: dashed) per tau_1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in div.values()})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.4), sharey=True)
    colors = {"trained": "tab:green", "stalled": "tab:orange", "diverged": "tab:red"}
    for ax, depth in zip(axes, depths):
        rows = [r for r in div.values() if r["depth"] == depth]
        for r in rows:
            y = r["taus"][0]
            for lr, x in r["lr"].items():
                for k, st_ in enumerate(x["statuses"]):
                    ax.scatter(float(lr) * (1 + 0.08 * (k - 1)), y, color=colors[st_], s=30)
            ax.plot([r["mu_star_measured"]] * 2, [y - 1, y + 1], color="k")
            ax.plot([r["mu_star_assumed"]] * 2, [y - 1, y + 1], color="k", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"depth {depth}: taus " + ", ".join(str(r["taus"]) for r in rows))
    axes[0].set_ylabel("tau_1")
    for name, c in colors.items():
        axes[-1].scatter([], [], color=c, label=name)
    axes[-1].plot([], [], color="k", label="mu* measured L, q")
    axes[-1].plot([], [], color="k", linestyle="--", label="mu* assumed L = 0.2")
    axes[-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


ENERGY_BUDGET = 10_000.0  # joules for the whole system: the equal-energy variant of experiment 3


def round_energy(taus: list, uplink_rates: list) -> float:
    """E_glob of one global round under the energy model's cited defaults (docs/algorithm.md#energy): 5 W x 5 ms
    per local step, 0.2 W on the devices' links and 6.3 W above, at the run's latency model."""
    import warnings

    from lightning_qmlhfl.compressors import QSGD
    from lightning_qmlhfl.theory.energy import default_energy
    from lightning_qmlhfl.theory.latency import LatencyModel
    from lightning_qmlhfl.theory.planner import evaluate_taus

    N = len(taus)
    h = Hierarchy.balanced(BRANCHING[{2: "two_layer", 3: "three_layer", 4: "four_layer"}[N]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = evaluate_taus(taus, h, [QSGD(8)] * N, 159010, LatencyModel(compute_time=0.005, uplink_rates=uplink_rates),
                             None, 1.0, 0.05, energy=default_energy(N, 0.005), energy_budget=ENERGY_BUDGET)
    return plan.round_energy.total


def energy() -> dict:
    out: dict = {}
    for group, s, h, o in _runs("energy/*"):
        rates = [float(x) for x in o["hierarchy.uplink_rates"].strip("[]").split(",")]
        e = round_energy(s["taus"], rates)
        curve = [(r["round"] * e, r["test_acc"]) for r in h if "test_acc" in r]

        def first(target: float) -> float | None:
            return next((j for j, a in curve if a >= target), None)

        within = [a for j, a in curve if j <= ENERGY_BUDGET * (1 + 1e-9)]
        out.setdefault(group, []).append({"seed": int(o["seed"]), "taus": s["taus"], "rounds": s["rounds"],
                                          "round_energy": e, "acc_budget": within[-1] if within else None,
                                          "e90": first(0.90), "e95": first(0.95), "sim_time": s["sim_time_s"],
                                          "lr": float(o.get("model.lr", "nan"))})
    return out


def _fmt(v, pct=False):
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main() -> None:
    div, dep, en = divergence(), depth(), energy()
    json.dump({"divergence": div, "depth": dep, "energy": en}, open(os.path.join(HERE, "results.json"), "w"),
              indent=1)
    if div:
        plot_divergence(div, os.path.join(HERE, "divergence.png"))
    lrs = sorted({lr for r in div.values() for lr in r["lr"]})
    print("| depth, taus | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
          " | largest lr trained | mu* measured L, q | mu* measured L, bound q | mu* assumed L = 0.2 |")
    print("|---|" + "---|" * (len(lrs) + 4))
    mark = {"trained": "T", "stalled": "S", "diverged": "D"}
    for g, r in div.items():
        cells = []
        for lr in lrs:
            x = r["lr"].get(lr)
            cells.append("" if x is None else "".join(mark[s] for s in x["statuses"]) + f" {_fmt(x['acc_mean'], True)}")
        print(f"| {r['depth']}: {r['taus']} | " + " | ".join(cells) +
              f" | {_fmt(r['largest_trained_lr'])} | {_fmt(r['mu_star_measured'])} | "
              f"{_fmt(r['mu_star_measured_L_bound_q'])} | {_fmt(r['mu_star_assumed'])} |")
    print()
    print("| variant | taus (first round) | lr | rounds | local steps | sim s | acc % at the budget | sim s to 85 % | "
          "sim s to 90 % | sim s to 95 % |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for g, rs in sorted(dep.items()):
        def m(key, pct=False):
            vals = [r[key] for r in rs if r[key] is not None]
            miss = len(rs) - len(vals)
            s = "n/a" if not vals else (f"{100 * st.mean(vals):.2f} ± {100 * st.stdev(vals):.2f}" if pct and
                                        len(vals) > 1 else _fmt(st.mean(vals), pct))
            return s + (f" ({miss} of {len(rs)} never)" if miss and not pct else "")
        print(f"| {g} | {rs[0]['taus']} | {rs[0]['lr']:g} | {rs[0]['rounds']} | {m('local_steps')} | "
              f"{m('sim_time')} | {m('acc_budget', True)} | {m('t85')} | {m('t90')} | {m('t95')} |")

    print()
    print(f"| variant | taus | lr | E_glob (J per round) | rounds in {ENERGY_BUDGET:.0f} J | sim s | acc % at the budget | "
          f"J to 90 % | J to 95 % |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for g, rs in sorted(en.items()):
        accs = [r["acc_budget"] for r in rs if r["acc_budget"] is not None]
        acc = f"{100 * st.mean(accs):.2f} ± {100 * st.stdev(accs):.2f}" if len(accs) > 1 else "n/a"

        def e(key):
            vals = [r[key] for r in rs if r[key] is not None]
            return "n/a" if not vals else f"{st.mean(vals):.0f}" + (
                f" ({len(rs) - len(vals)} of {len(rs)} never)" if len(vals) < len(rs) else "")
        print(f"| {g} | {rs[0]['taus']} | {rs[0]['lr']:g} | {rs[0]['round_energy']:.1f} | {rs[0]['rounds']} | "
              f"{st.mean(r['sim_time'] for r in rs):.0f} | {acc} | {e('e90')} | {e('e95')} |")

if __name__ == "__main__":
    main()
