"""Side by side: this project, Flower and pfl-research on the same flat FedAvg workloads, in one invocation.

The workloads (one aggregation layer, which all three systems run): MNIST, Dirichlet(0.5) label split over the
clients (one partition file, drawn once, used by all three), the shared model and initial weights
(``common.py``: LeNet, 21,840 parameters, or the 784-200-10 MLP), plain SGD lr 0.05, batch 32, exactly 10 local
steps per sampled client per round, unweighted averaging of the sampled clients' models, 32-bit uploads, no
evaluation until the end, then the final model on the 10,000 test images.

- ``100of100``: 100 clients, all of them every round, 20 rounds;
- ``50of1000``: 1,000 clients, 50 drawn uniformly without replacement every round, 50 rounds;
- ``tiny`` (``--tiny``): 4 clients, all every round, 2 rounds (the smoke test).

The systems, each in its own subprocess, one after the other (``run_*.py``; their docstrings say how each is
written): ``qmlhfl`` (this project's Lightning strategy, the project's .venv: the interpreter running this script;
``--forwards``: its loop executor's forwards in device order or concurrent, one run per mode given),
``pfl`` (pfl-research 0.6, PyTorch; one process, and at k > 1 cores also its multi-worker mode, k processes under
torchrun) and ``flower`` (Flower 1.42 Simulation Engine on Ray). The peers' venvs are built on first use
(``envs.py``, pinned versions) unless ``--no-build``; a peer whose venv cannot be built is reported and skipped.

Equal cores: ``--threads k`` runs every system on k cores: the process tree is pinned to the first k CPUs of this
process's affinity (``sched_setaffinity``, inherited by every child: Ray's GCS, raylet and workers, torchrun's
workers), and inside that: this project 1 process with k torch threads (its loop executor's min(2, k) workers share
them); pfl 1 process with k torch threads, and k processes with 1 thread each (torchrun); Flower Ray with
``num_cpus=k`` and ``num_cpus=1`` per ClientApp, so k actors with 1 torch thread each. ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are set to the per-process thread count. ``--no-pin`` leaves the affinity alone.

Measured per run: wall time of the subprocess (start to exit, start-up and final evaluation included); time from
the start to the end of round 1 (start-up + first round; Flower starts Ray while its ServerApp already waits for
round 1's clients, so Ray's start-up lands in round 1); time of all training rounds; steady client-steps/s =
(clients per round x 10) / median round time, round 1 excluded; peak memory of the whole process tree
(``proctree.py``: this script is a child subreaper, so orphaned grandchildren stay in its tree; every 0.2 s the RSS
of every descendant is summed, and every 2 s their PSS, which counts shared pages once; the sampler runs on the
cores the run does not use, when there are any); final test accuracy; the load average before and after;
the sha256 of the partition, initial weights and data files each runner read (they must agree).
``--competing-load`` (= ``on``) starts one busy-loop process per pinned core (pinned to it) before each run and stops
it after: the systems then share their cores with a CPU hog; ``--competing-load both`` runs every configuration
without and then with the hogs (the ratio table has a row for each). The hogs share this script's session, as do
the systems, except pfl's torchrun workers, which torch starts in sessions of their own; with Linux's autogroup
(``/proc/sys/kernel/sched_autogroup_enabled``) the scheduler shares a core among sessions first, so such a worker
gets more of its core than a thread of the shared session. ``--load-session own`` starts each hog in a session
of its own instead (bench/RESULTS.md compares both).

Before the timed runs (except with ``--tiny`` or ``--no-warm-up``) every system runs the tiny configuration once,
untimed and unreported: what a first run after a checkout or a venv build compiles and caches (the project's numba
kernels, the venvs' bytecode) would otherwise be charged to whichever system runs first.

Output (``report.py``): a Markdown table of the runs and one of the ratios (this project against the best pfl mode
and Flower, at equal cores, side by side), printed and written to ``OUT.md``; one JSON line per run in
``OUT.jsonl`` (plus a first ``meta`` line: machine, commit, command); each runner's log under ``--logs``.

Usage::

    python bench/peers/run.py --tiny --threads 1                       # smoke run (~1-2 min with the venvs built)
    python bench/peers/run.py --build-only                             # build the peers' venvs, nothing else
    python bench/peers/run.py                                          # everything: 2 workloads x 2 models x 1,2 cores
    python bench/peers/run.py --workloads 100of100 --models lenet --threads 2 --competing-load
    python bench/peers/run.py --competing-load both                    # the full comparison, idle and loaded
    python bench/peers/run.py --device cuda --threads 2                # on a GPU machine (CUDA venvs)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import envs  # noqa: E402
from proctree import TreeMemory, clean_up, descendants, kill, set_subreaper, start_load, stop_load
from report import NAMES, cell, markdown, meta, mode_label

PEERS = ("pfl", "flower")
PFL_MODES = ("single", "workers")
FORWARDS = ("ordered", "concurrent")


def fail(msg: str) -> None:
    print(f"bench/peers/run.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        fail(f"{what} {value!r}: allowed values are {', '.join(allowed)} (comma-separated)")
    return items


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="100of100,50of1000", help="100of100, 50of1000 (comma-separated)")
    ap.add_argument("--models", default=None, help="lenet, mlp (default both; lenet with --tiny)")
    ap.add_argument("--threads", default="1,2", help="core counts to run at, e.g. 1,2 (default 1,2)")
    ap.add_argument("--rounds", default=None, help="override every workload's number of rounds (>= 2 for a "
                                                   "steady rate)")
    ap.add_argument("--peers", default="pfl,flower", help="peers besides this project: pfl, flower, or none")
    ap.add_argument("--pfl-modes", default="single,workers",
                    help="single (1 process x k threads), workers (k torchrun processes x 1 thread; at k > 1)")
    ap.add_argument("--forwards", default="ordered",
                    help="this project's loop-executor forwards: ordered (the project's default), concurrent, or "
                         "both comma-separated (one run each)")
    ap.add_argument("--load-session", default="shared", choices=("shared", "own"),
                    help="the competing load's session: shared with this script and the systems (default), or one "
                         "of its own per hog (Linux's autogroup then weighs each hog as a group of its own)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--competing-load", nargs="?", const="on", default="off",
                    help="a busy-loop process per pinned core during each run: on (the flag alone), off (default), "
                         "both (every configuration idle, then loaded)")
    ap.add_argument("--tiny", action="store_true", help="the smoke configuration: 4 clients, 2 rounds, lenet")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="skip the untimed tiny run of every system before the timed runs")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the runs to the first k cores")
    ap.add_argument("--no-build", action="store_true", help="never build a missing venv (skip that peer)")
    ap.add_argument("--build-only", action="store_true", help="build the peers' venvs and exit")
    ap.add_argument("--python", default="python3", help="base interpreter of the peers' venvs (default python3)")
    ap.add_argument("--envs", default=str(envs.ENVS), help="folder of the peers' venvs")
    ap.add_argument("--cache", default=str(HERE / ".cache"), help="folder of the prepared data/partition/weights")
    ap.add_argument("--data", default=os.environ.get("QMLHFL_DATA", "data"), help="folder holding MNIST/raw "
                                                                                 "(default $QMLHFL_DATA)")
    ap.add_argument("--out", default=None, help="output prefix: OUT.jsonl and OUT.md (default "
                                                "bench/results/peers_<date>)")
    ap.add_argument("--logs", default=None, help="folder of the runners' logs (default bench/peers/.logs/<date>)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default 3600)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    args.workloads = ["tiny"] if args.tiny else _list(args.workloads, [w for w in common.WORKLOADS if w != "tiny"]
                                                      + ["tiny"], "--workloads")
    args.models = _list(args.models or ("lenet" if args.tiny else "lenet,mlp"), common.MODELS, "--models")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        fail(f"--threads {args.threads!r}: allowed are integers >= 1, comma-separated (e.g. 1,2)")
    if not args.threads or any(t < 1 for t in args.threads):
        fail(f"--threads {','.join(map(str, args.threads))}: every core count must be an integer >= 1")
    if args.rounds is not None:
        try:
            args.rounds = int(args.rounds)
        except ValueError:
            fail(f"--rounds {args.rounds!r}: allowed is an integer >= 1")
        if args.rounds < 1:
            fail(f"--rounds {args.rounds}: allowed is an integer >= 1")
    args.peers = [p for p in _list(args.peers, PEERS + ("none",), "--peers") if p != "none"]
    args.pfl_modes = _list(args.pfl_modes, PFL_MODES, "--pfl-modes")
    args.forwards = _list(args.forwards, FORWARDS, "--forwards")
    if args.competing_load not in ("off", "on", "both"):
        fail(f"--competing-load {args.competing_load!r}: allowed are on (the flag alone), off, both")
    dev = args.device
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        fail(f"--device {dev!r}: allowed are cpu, cuda, cuda:N")
    args.cuda = dev.startswith("cuda")
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {dev}: this environment's torch {torch.__version__} sees no CUDA device (on a GPU "
                 f"machine: bash scripts/setup.sh --cuda); allowed here: cpu")
    if args.timeout <= 0:
        fail(f"--timeout {args.timeout}: must be > 0 seconds")
    cores = sorted(os.sched_getaffinity(0))
    if not args.no_pin and max(args.threads) > len(cores):
        fail(f"--threads {max(args.threads)}: this process may use only {len(cores)} CPU(s) ({cores}); use at most "
             f"{len(cores)}, or --no-pin")
    args.cores = cores
    return args


# ------------------------------------------------------------------------------------------- the runs
def plan(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The runs, in order, and notes on the ones left out."""
    runs, notes = [], []
    gpus = 0
    if args.cuda:
        import torch

        gpus = torch.cuda.device_count()
    loads = {"off": [False], "on": [True], "both": [False, True]}[args.competing_load]
    combos = [(w, m, k, busy) for w in args.workloads for m in args.models for k in args.threads for busy in loads]
    for w, m, k, busy in combos:
        base = {"workload": w, "model": m, "cores": k, "busy": busy}
        runs += [{**base, "system": "qmlhfl", "procs": 1, "threads_per_process": k, "forwards": f}
                 for f in args.forwards]
        if "pfl" in args.peers:
            if "single" in args.pfl_modes:
                runs.append({**base, "system": "pfl", "procs": 1, "threads_per_process": k})
            if "workers" in args.pfl_modes and k > 1:
                if args.cuda and k > gpus:
                    note = (f"pfl's multi-worker mode at {k} cores left out: it takes one GPU per worker and {gpus} "
                            f"GPU(s) are visible")
                    if note not in notes:
                        notes.append(note)
                else:
                    runs.append({**base, "system": "pfl", "procs": k, "threads_per_process": 1})
        if "flower" in args.peers:
            runs.append({**base, "system": "flower", "procs": k, "threads_per_process": 1})
    return runs, notes


def command(run: dict, args: argparse.Namespace, result: Path) -> list[str]:
    common_args = ["--workload", run["workload"], "--model", run["model"], "--threads",
                   str(run["threads_per_process"]), "--device", args.device, "--cache", str(Path(args.cache)),
                   "--seed", str(args.seed), "--result", str(result)]
    if args.rounds is not None:
        common_args += ["--rounds", str(args.rounds)]
    if run["system"] == "qmlhfl":
        return [sys.executable, str(HERE / "run_qmlhfl.py"), *common_args, "--forwards", run["forwards"]]
    py = envs.env_python(run["system"], args.cuda, Path(args.envs))
    if run["system"] == "flower":
        return [str(py), str(HERE / "run_flower.py"), *common_args]
    if run["procs"] == 1:
        return [str(py), str(HERE / "run_pfl.py"), *common_args, "--workers", "1"]
    torchrun = py.parent / "torchrun"
    return [str(torchrun), "--standalone", f"--nproc_per_node={run['procs']}", str(HERE / "run_pfl.py"),
            *common_args, "--workers", str(run["procs"])]


def execute(run: dict, args: argparse.Namespace, logs: Path, prefix: str) -> dict:
    tag = f"{prefix}_{run['workload']}_{run['model']}_{run['cores']}c_{run['system']}"
    if run["system"] == "pfl":
        tag += f"_{run['procs']}p"
    if run["system"] == "qmlhfl":
        tag += f"_{run['forwards']}"
    result = logs / f"{tag}.json"
    log_path = logs / f"{tag}.log"
    cmd = command(run, args, result)
    cores = args.cores[: run["cores"]]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t = str(run["threads_per_process"])
    env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, NUMBA_NUM_THREADS=t, PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="disabled")
    load = start_load(cores, args.load_session == "own") if run["busy"] else []
    exclude = {p.pid for p in load}
    if load:
        time.sleep(0.5)  # the hogs are running before the system starts
    spare = set(args.cores) - set(cores)
    if spare and not args.no_pin:  # this script (the memory sampler) keeps off the run's cores when it can
        os.sched_setaffinity(0, spare)
    load_before = os.getloadavg()
    mem = TreeMemory(exclude)
    pin = None if args.no_pin else (lambda: os.sched_setaffinity(0, set(cores)))
    t_launch = time.time()
    t0 = time.perf_counter()
    status, rc = "ok", None
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), preexec_fn=pin)
        mem.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            status = f"failed: timed out after {args.timeout:.0f} s"
            kill(descendants(os.getpid(), exclude), signal.SIGKILL)
            rc = proc.wait()
    wall = time.perf_counter() - t0
    mem.stop()
    leftovers = clean_up(exclude)
    load_after = os.getloadavg()
    stop_load(load)
    os.sched_setaffinity(0, set(args.cores))
    rec: dict = {"kind": "run", **run, "status": status}
    if status == "ok" and (rc != 0 or not result.exists()):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
        status = rec["status"] = f"failed: exit code {rc}: " + " | ".join(line.strip() for line in tail)[-600:]
    if status == "ok":
        rec.update(json.loads(result.read_text()))
        rec["status"] = "ok"
        rec["workload_check"] = common.workload_check(rec)
        rec["startup_s"] = rec["t_train_start"] - t_launch
        rec["to_round1_end_s"] = rec["t_train_start"] + rec["round_s"][0] - t_launch
    rec.update(wall_s=wall, peak_rss_mb=mem.peak_rss / 2**20, peak_pss_mb=mem.peak_pss / 2**20,
               peak_procs=mem.peak_procs, memory_samples=mem.samples, load_before=load_before,
               load_after=load_after, pinned_cores=None if args.no_pin else cores,
               competing_load=len(load), leftover_processes_ended=leftovers, cmd=cmd, log=str(log_path))
    return rec


def warm_up(args: argparse.Namespace, logs: Path) -> None:
    """One untimed tiny run of every system (1 core), not reported: the first run after a checkout or a venv
    build compiles what later runs find cached (the project's numba kernels, the venvs' bytecode) and reads the
    libraries from disk; without it, whichever system runs first would carry that cost."""
    systems = [("qmlhfl", 1)] + [(p, 1) for p in args.peers]
    for system, procs in systems:
        run = {"workload": "tiny", "model": args.models[0], "cores": 1, "busy": False, "system": system,
               "procs": procs, "threads_per_process": 1, "forwards": args.forwards[0]}
        t0 = time.perf_counter()
        rec = execute(run, args, logs, "warmup")
        print(f"[peers] warm-up {NAMES[system]}: {rec['status'][:200]} ({time.perf_counter() - t0:.0f} s, "
              f"not reported)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env_root = Path(args.envs)
    env_infos: dict = {}
    skipped: dict[str, str] = {}
    for peer in args.peers:
        info, reason = envs.ensure(peer, args.cuda, allow_build=not args.no_build, python=args.python,
                                   root=env_root)
        if info is None:
            skipped[peer] = reason
            print(f"[peers] {peer}: skipped: {reason}", file=sys.stderr, flush=True)
        else:
            env_infos[peer] = info
            print(f"[peers] {peer}: venv {envs.env_dir(peer, args.cuda, env_root)} "
                  f"({', '.join(f'{k} {v}' for k, v in info['versions'].items())})", file=sys.stderr, flush=True)
    if args.build_only:
        return 1 if skipped else 0
    args.peers = [p for p in args.peers if p not in skipped]

    from prepare import prepare

    warm = not (args.tiny or args.no_warm_up)
    clients = sorted({common.WORKLOADS[w][0] for w in args.workloads + (["tiny"] if warm else [])})
    for p in prepare(Path(args.cache), args.data, clients, args.models, args.seed):
        print(f"[peers] prepared {p}", file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"peers_{stamp}"
    logs = Path(args.logs) if args.logs else HERE / ".logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    subreaper = set_subreaper()
    info = meta(args, env_infos)
    info.update(skipped_peers=skipped, subreaper=subreaper, competing_load=args.competing_load,
                load_session=args.load_session)
    runs, plan_notes = plan(args)
    info["plan_notes"] = plan_notes
    for note in plan_notes:
        print(f"[peers] {note}", file=sys.stderr, flush=True)
    recs: list[dict] = []
    jsonl = out.with_suffix(".jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps(info) + "\n")
    if warm:
        warm_up(args, logs)
    print(f"[peers] {len(runs)} runs, one after the other; logs in {logs}", file=sys.stderr, flush=True)
    for i, run in enumerate(runs):
        label = (f"{run['workload']} {run['model']} {run['cores']} core(s): {NAMES[run['system']]} "
                 f"({mode_label(run)}){' + busy load' if run['busy'] else ''}")
        print(f"[peers] {i + 1}/{len(runs)} {label}: load avg {os.getloadavg()[0]:.2f} ...", file=sys.stderr,
              flush=True)
        rec = execute(run, args, logs, f"{i:02d}")
        recs.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["status"] == "ok":
            print(f"[peers]     wall {rec['wall_s']:.1f} s, rounds {rec['train_s']:.1f} s, steady "
                  f"{cell(rec['steady_client_steps_per_s'])} client-steps/s, peak RSS {rec['peak_rss_mb']:,.0f} MB, "
                  f"accuracy {rec['accuracy']:.4f}, load avg after {rec['load_after'][0]:.2f}", file=sys.stderr,
                  flush=True)
        else:
            print(f"[peers]     {rec['status']} (log: {rec['log']})", file=sys.stderr, flush=True)
    text = markdown(args, info, env_infos, skipped, plan_notes, recs)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"[peers] wrote {jsonl} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
