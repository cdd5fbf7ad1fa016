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
(clients per round x 10) / median round time, round 1 excluded; peak memory of the whole process tree (this script
is a child subreaper, so orphaned grandchildren stay in its tree; every 0.2 s the RSS of every descendant is summed,
and every 2 s their PSS, which counts shared pages once; the sampler runs on the cores the run does not use, when
there are any); final test accuracy; the load average before and after;
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

Output: a Markdown table of the runs and one of the ratios (this project against the best pfl mode and Flower, at
equal cores, side by side), printed and written to ``OUT.md``; one JSON line per run in ``OUT.jsonl`` (plus a first
``meta`` line: machine, commit, command); each runner's log under ``--logs``.

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
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import envs  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
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


# --------------------------------------------------------------------------------- process-tree memory
def _set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux): processes that a runner leaves behind
    or that double-fork (Ray's) stay in this tree, so the memory sampler and the clean-up see them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        out[int(name)] = int(fields[1])
    return out


def descendants(root: int, exclude: set[int] = frozenset()) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in exclude:
                out.append(c)
                todo.append(c)
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak summed RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) of this process's
    descendants, except ``exclude`` (the competing load) and their children."""

    def __init__(self, exclude: set[int], interval: float = 0.2, pss_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.exclude, self.interval, self.pss_every = exclude, interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_procs = self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = descendants(os.getpid(), self.exclude)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
        if self.samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _kill(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def clean_up(exclude: set[int], grace: float = 10.0) -> int:
    """Wait for the run's leftover processes (Ray's shutting down) and end those that stay; returns how many
    had to be ended. Only this script's descendants are touched, by pid."""
    deadline = time.time() + grace
    while time.time() < deadline:
        _reap()
        left = descendants(os.getpid(), exclude)
        if not left:
            return 0
        time.sleep(0.2)
    left = descendants(os.getpid(), exclude)
    _kill(left, signal.SIGTERM)
    time.sleep(2)
    _reap()
    _kill(descendants(os.getpid(), exclude), signal.SIGKILL)
    time.sleep(0.2)
    _reap()
    return len(left)


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


def start_load(cores: list[int], own_session: bool = False) -> list[subprocess.Popen]:
    procs = []
    for c in cores:
        procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                      preexec_fn=lambda c=c: os.sched_setaffinity(0, {c}),
                                      start_new_session=own_session))
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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
            _kill(descendants(os.getpid(), exclude), signal.SIGKILL)
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


# ------------------------------------------------------------------------------------------- reporting
def _f(x, fmt="{:,.0f}", none="-"):
    return none if x is None else fmt.format(x)


def _mode(r: dict) -> str:
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
            f"{NAMES[r['system']]} | {_mode(r)} | {_f(r.get('wall_s'), '{:.1f}')} | "
            f"{_f(r.get('to_round1_end_s') if ok else None, '{:.1f}')} | "
            f"{_f(r.get('train_s') if ok else None, '{:.1f}')} | "
            f"{_f(r.get('steady_client_steps_per_s') if ok else None)} | "
            f"{_f(r.get('peak_rss_mb'))} ({r.get('peak_procs', '-')}) | {_f(r.get('peak_pss_mb'))} | "
            f"{_f(r.get('accuracy') if ok else None, '{:.4f}')} | "
            f"{_f(r['load_before'][0], '{:.1f}') if r.get('load_before') else '-'}/"
            f"{_f(r['load_after'][0], '{:.1f}') if r.get('load_after') else '-'} | "
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
        f"| {w} | {m} | {k} | {'busy' if busy else '-'} | {q.get('forwards', 'ordered')} | {_f(steady(q))} / "
        f"{_f(steady(p_best))}"
        f"{' (' + ('1p' if p_best['procs'] == 1 else str(p_best['procs']) + 'p') + ')' if p_best else ''} / "
        f"{_f(steady(fl))} | {_f(_ratio(steady(q), steady(p_best)), '{:.2f}x')} | "
        f"{_f(_ratio(steady(q), steady(fl)), '{:.2f}x')} | {q['wall_s']:.1f} / {_f(p_wall, '{:.1f}')} / "
        f"{_f(fl and fl['wall_s'], '{:.1f}')} | {_f(_ratio(p_wall, q['wall_s']), '{:.2f}x')} | "
        f"{_f(_ratio(fl and fl['wall_s'], q['wall_s']), '{:.2f}x')} | {q['peak_rss_mb']:,.0f} / "
        f"{_f(p_rss)} / {_f(fl and fl['peak_rss_mb'])} | {_f(_ratio(q['peak_rss_mb'], p_rss), '{:.2f}')} | "
        f"{q['accuracy']:.4f} / {_f(p_acc, '{:.4f}')} / {_f(fl and fl['accuracy'], '{:.4f}')} |")


def hash_check(recs: list[dict]) -> list[str]:
    """Every run of a workload read the same partition file, every run of a model the same initial weights, and
    every run the same data file; every run trained the workload as specified (clients per round, local steps)."""
    notes = []
    ok = [r for r in recs if r["status"] == "ok"]
    bad = [r for r in ok if r.get("workload_check") != "ok"]
    notes.append("- every run trained the specified clients per round with exactly 10 local steps each" if not bad
                 else "- WORKLOAD MISMATCH: " + "; ".join(f"{NAMES[r['system']]} ({_mode(r)}, {r['workload']} "
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
    subreaper = _set_subreaper()
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
                 f"({_mode(run)}){' + busy load' if run['busy'] else ''}")
        print(f"[peers] {i + 1}/{len(runs)} {label}: load avg {os.getloadavg()[0]:.2f} ...", file=sys.stderr,
              flush=True)
        rec = execute(run, args, logs, f"{i:02d}")
        recs.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["status"] == "ok":
            print(f"[peers]     wall {rec['wall_s']:.1f} s, rounds {rec['train_s']:.1f} s, steady "
                  f"{_f(rec['steady_client_steps_per_s'])} client-steps/s, peak RSS {rec['peak_rss_mb']:,.0f} MB, "
                  f"accuracy {rec['accuracy']:.4f}, load avg after {rec['load_after'][0]:.2f}", file=sys.stderr,
                  flush=True)
        else:
            print(f"[peers]     {rec['status']} (log: {rec['log']})", file=sys.stderr, flush=True)
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
    text = "\n".join(parts) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"[peers] wrote {jsonl} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
