"""What bench/peers/run.py writes about its runs: the ``meta`` record (machine, commit, command, the peers' venvs)
that opens ``OUT.jsonl``, and the Markdown report printed and written to ``OUT.md``: the table of the runs, the
table of ratios (this project against pfl-research's best mode and Flower at equal cores, always the comparison
least favourable to this project), and the checks that every run read the same partition, initial weights and
data files and trained the workload as specified. Only formatting and bookkeeping: no run is started here.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = os.sysconf("SC_PAGE_SIZE")


def cell(x, fmt="{:,.0f}", none="-"):
    return none if x is None else fmt.format(x)


def mode_label(r: dict) -> str:
    if r["system"] == "qmlhfl":
        return f"1 proc x {r['threads_per_process']} thr, {r.get('forwards', 'ordered')}"
    if r["system"] == "pfl":
        return (f"1 proc x {r['threads_per_process']} thr" if r["procs"] == 1
                else f"{r['procs']} procs (torchrun) x 1 thr")
    return f"Ray, {r['procs']} actor(s) x 1 thr"


NAMES = {"qmlhfl": "this project", "pfl": "pfl-research", "flower": "Flower"}


def runs_table(recs: list[dict]) -> str:
    head = ("| workload | model | cores | load | system | processes x threads | wall s | start-up + round 1 s | "
            "all rounds s | steady client-steps/s | peak RSS tree MB (procs) | peak PSS MB | accuracy | "
            "load avg before/after | status |")
    lines = [head, "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in recs:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['workload']} | {r['model']} | {r['cores']} | {'busy' if r.get('competing_load') else '-'} | "
            f"{NAMES[r['system']]} | {mode_label(r)} | {cell(r.get('wall_s'), '{:.1f}')} | "
            f"{cell(r.get('to_round1_end_s') if ok else None, '{:.1f}')} | "
            f"{cell(r.get('train_s') if ok else None, '{:.1f}')} | "
            f"{cell(r.get('steady_client_steps_per_s') if ok else None)} | "
            f"{cell(r.get('peak_rss_mb'))} ({r.get('peak_procs', '-')}) | {cell(r.get('peak_pss_mb'))} | "
            f"{cell(r.get('accuracy') if ok else None, '{:.4f}')} | "
            f"{cell(r['load_before'][0], '{:.1f}') if r.get('load_before') else '-'}/"
            f"{cell(r['load_after'][0], '{:.1f}') if r.get('load_after') else '-'} | "
            f"{'ok' if ok else r['status'][:160]} |")
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratios_table(recs: list[dict]) -> str:
    """This project against the peers at equal cores: steady rate (against pfl's best mode), wall time (against
    pfl's fastest mode), peak RSS (against pfl's smallest): always the comparison least favourable to this
    project."""
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        if r["status"] == "ok":
            groups.setdefault((r["workload"], r["model"], r["cores"], bool(r.get("competing_load"))), []).append(r)
    head = ("| workload | model | cores | load | this: forwards | steady c-s/s: this / pfl best / Flower | "
            "steady x pfl | steady x Flower | wall s: this / pfl / Flower | wall: pfl / this | wall: Flower / this | "
            "peak RSS MB: this / pfl / Flower | RSS this / pfl | accuracy: this / pfl / Flower |")
    lines = [head, "|---|---|---:|---|---|---|---:|---:|---|---:|---:|---|---:|---|"]
    for (w, m, k, busy), rs in groups.items():
        pfls = [r for r in rs if r["system"] == "pfl"]
        fl = next((r for r in rs if r["system"] == "flower"), None)
        for q in (r for r in rs if r["system"] == "qmlhfl"):
            lines.append(_ratio_line(w, m, k, busy, q, pfls, fl))
    return "\n".join(lines)


def _ratio_line(w: str, m: str, k: int, busy: bool, q: dict, pfls: list[dict], fl: dict | None) -> str:
    """One line of :func:`ratios_table`: one run ``q`` of this project (one per --forwards mode)."""
    steady = lambda r: r and r.get("steady_client_steps_per_s")  # noqa: E731
    p_best = max(pfls, key=lambda r: steady(r) or 0, default=None)
    p_wall = min((r["wall_s"] for r in pfls), default=None)
    p_rss = min((r["peak_rss_mb"] for r in pfls), default=None)
    p_acc = p_best["accuracy"] if p_best else None
    return (
        f"| {w} | {m} | {k} | {'busy' if busy else '-'} | {q.get('forwards', 'ordered')} | {cell(steady(q))} / "
        f"{cell(steady(p_best))}"
        f"{' (' + ('1p' if p_best['procs'] == 1 else str(p_best['procs']) + 'p') + ')' if p_best else ''} / "
        f"{cell(steady(fl))} | {cell(_ratio(steady(q), steady(p_best)), '{:.2f}x')} | "
        f"{cell(_ratio(steady(q), steady(fl)), '{:.2f}x')} | {q['wall_s']:.1f} / {cell(p_wall, '{:.1f}')} / "
        f"{cell(fl and fl['wall_s'], '{:.1f}')} | {cell(_ratio(p_wall, q['wall_s']), '{:.2f}x')} | "
        f"{cell(_ratio(fl and fl['wall_s'], q['wall_s']), '{:.2f}x')} | {q['peak_rss_mb']:,.0f} / "
        f"{cell(p_rss)} / {cell(fl and fl['peak_rss_mb'])} | {cell(_ratio(q['peak_rss_mb'], p_rss), '{:.2f}')} | "
        f"{q['accuracy']:.4f} / {cell(p_acc, '{:.4f}')} / {cell(fl and fl['accuracy'], '{:.4f}')} |")


def hash_check(recs: list[dict]) -> list[str]:
    """Every run of a workload read the same partition file, every run of a model the same initial weights, and
    every run the same data file; every run trained the workload as specified (clients per round, local steps)."""
    notes = []
    ok = [r for r in recs if r["status"] == "ok"]
    bad = [r for r in ok if r.get("workload_check") != "ok"]
    notes.append("- every run trained the specified clients per round with exactly 10 local steps each" if not bad
                 else "- WORKLOAD MISMATCH: " + "; ".join(f"{NAMES[r['system']]} ({mode_label(r)}, {r['workload']} "
                                                           f"{r['model']}): {r['workload_check']}" for r in bad))
    for key, what in (("partition_sha256", "workload"), ("init_sha256", "model"), ("data_sha256", None)):
        by: dict = {}
        for r in ok:
            by.setdefault(r[what] if what else "all", set()).add(r[key])
        for name, hashes in by.items():
            label = f"{key.split('_')[0]} file ({what} {name})" if what else "data file"
            if len(hashes) == 1:
                notes.append(f"- same {label} for all runs: sha256 {next(iter(hashes))[:16]}...")
            else:
                notes.append(f"- DIFFERENT {label} across runs: {sorted(h[:16] for h in hashes)}")
    return notes


def meta(args: argparse.Namespace, env_infos: dict) -> dict:
    def git(*a):
        out = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import torch

    return {"kind": "meta", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv,
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpu": cpu, "cpus_allowed": args.cores, "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "device": args.device, "peer_envs": env_infos,
            "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * PAGE / 1e9}


def markdown(args: argparse.Namespace, info: dict, env_infos: dict, skipped: dict[str, str],
             plan_notes: list[str], recs: list[dict]) -> str:
    """The Markdown report of the runs ``recs`` (printed and written to ``OUT.md``): the command and the
    machine, the peers skipped and the runs left out, the runs table, the ratios table and the file checks."""
    parts = [f"# bench/peers, {info['date']}", "",
             f"`{' '.join(['python', 'bench/peers/run.py', *sys.argv[1:]])}` at commit {str(info['commit'])[:10]}"
             f"{' (dirty)' if info['dirty'] else ''}; {info['cpu']}, {len(args.cores)} CPU(s) allowed, "
             f"device {args.device}; Python {info['python']}, torch {info['torch']}; peers: "
             + ("; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in e["versions"].items())
                         for k, e in env_infos.items()) or "none"), ""]
    for peer, reason in skipped.items():
        parts.append(f"- {peer} skipped: {reason}")
    parts += [f"- {note}" for note in plan_notes]
    parts += ["", "Runs:", "", runs_table(recs), "", "This project against the peers at equal cores (pfl: its "
              "fastest mode for the rates and wall time, its smallest tree for memory):", "", ratios_table(recs), ""]
    parts += hash_check(recs)
    return "\n".join(parts) + "\n"
