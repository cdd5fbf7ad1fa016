"""Scale-out: one QMLHFL simulation sharded over W processes (lightning_qmlhfl.distribution.shard), measured with gloo.

Parts (``--parts``, default all):

- ``memory``: the per-rank state of the sharded engine (every stacked row, the device optimizer's momentum, the
  error-feedback memory: the tensors of ``engine.state_dict()`` after one local step) for W = 1, 2, 4, 8, as a
  fraction of the single-process state, beside ``Shard.memory_fraction()`` (the share of stacked rows) and 1 / W.
  Configuration: 1000 MLP devices (784-200-10) in [10, 10, 10], TopK 10 % with EF on the device layer, QSGD s = 8
  above, SGD with momentum 0.9. No processes: every rank's engine is built in turn (a first local step
  needs no collective).
- ``comm``: the collectives on W = 2 processes of this machine (gloo over 127.0.0.1, one thread each): all_gather
  and all_reduce of float32 tensors from 8 B to 64 MiB contributed per rank, median of repetitions; a fit
  t = alpha + beta x bytes per kind (least squares weighted by 1 / t, so the small sizes count).
- ``scaling``: one configuration, run as 1 process x 1 thread (unsharded engine) and as 2 processes x 1 thread
  (sharded, gloo), same seed; the median global-round time (the slowest rank's, rounds bracketed by barriers),
  the strong-scaling speed-up, and per rank the bytes contributed per round, by kind of collective, against
  ``Shard.exchange_bytes_per_round`` (the formula). Configurations (``--scaling``): ``mlp100-cut2`` (100 MLP
  devices in [4, 5, 5], tau = (5, 2, 2), QSGD s = 8 everywhere; automatic cut: the 4 layer-2 servers, one
  exchange per round) and ``mlp100-cut0`` (same, cut at the devices: the exchange is every edge aggregation,
  4 per round, with 50 devices' uploads per rank).
- ``projection``: the round time against W from the scaling and comm parts: compute(W) = a + b x (largest
  rank's devices), with a (the per-round cost that does not shrink with the devices) and b from two
  single-process runs (all devices; one rank's share at W = 2 as a tree of its own), plus, for every collective
  of a round, (W - 1) x t(bytes) (a ring: W - 1 steps of one rank's share), t interpolated from the comm part
  and the bytes from the formula at W; checked against the measurement at W = 2 (where the two ranks also
  share this machine's memory system), then tabulated up to W = 64 assuming one core per rank and the
  measured loopback gloo (this machine has two cores).

``--backend nccl --device cuda`` runs the comm part on GPUs instead (one per rank; needs W GPUs).

Usage::

    python bench/scaleout.py                          # everything, JSON lines to stdout, tables at the end
    python bench/scaleout.py --parts memory           # seconds, no processes
    python bench/scaleout.py --parts comm,scaling --rounds 3 --jsonl out.jsonl
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lightning_qmlhfl import QSGD, Hierarchy, TopK  # noqa: E402
from lightning_qmlhfl.distribution.comm import TorchComm, thread_group  # noqa: E402
from lightning_qmlhfl.simulation.engine import QMLHFLEngine, gather_batch  # noqa: E402
from lightning_qmlhfl.distribution.shard import Shard  # noqa: E402


def _bench_engine():
    """bench/engine.py (models, synthetic data, loss), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_engine", os.path.join(REPO, "bench", "engine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BE = _bench_engine()
TAUS = (5, 2, 2)
SCALING = {  # name -> (branching, cut layer or None for the automatic one)
    "mlp100-cut2": ([4, 5, 5], None),
    "mlp100-cut0": ([4, 5, 5], 0),
}
HALF = {"mlp100-cut2": [2, 5, 5], "mlp100-cut0": [2, 5, 5]}  # one rank's share at W = 2, as a tree of its own
SIZES = [8 * 4**k for k in range(13)]  # 8 B ... 128 MiB; trimmed to --max-bytes


# ---------------------------------------------------------------------------------------------------- memory
def state_bytes(engine: QMLHFLEngine) -> int:
    """Bytes of every tensor of the engine's state (what a checkpoint holds: rows, optimizer state, memory)."""
    total = 0

    def walk(x) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(engine.state_dict())
    return total


def part_memory(worlds: list[int]) -> list[dict]:
    h = Hierarchy.balanced([10, 10, 10])
    qs = [TopK(ratio=0.1, error_feedback="ef"), QSGD(8), QSGD(8)]
    X, Y, part = BE.make_data(h.num_devices)
    torch.manual_seed(0)
    template = BE.MLP()
    g = torch.Generator().manual_seed(1)
    idx = part.gather(1, torch.randint(0, part.shape[1], (part.shape[0], BE.BATCH), generator=g))
    out, single = [], None
    for world in worlds:
        comms = thread_group(world) if world > 1 else [None]
        per_rank, fractions = [], []
        for r in range(world):
            shard = Shard.build(h, world, r) if world > 1 else None
            e = QMLHFLEngine(copy.deepcopy(template), BE.ce_loss, h, TAUS, qs, optimizer="sgd",
                             optimizer_kwargs={"lr": BE.LR, "momentum": 0.9}, seed=0, shard=shard, comm=comms[r])
            rows = idx if shard is None else idx[shard.rows(0)]
            e.local_step((gather_batch(X, rows), gather_batch(Y, rows)))  # creates the momentum buffers
            per_rank.append(state_bytes(e))
            fractions.append(1.0 if shard is None else shard.memory_fraction())
            del e
        if single is None:
            single = per_rank[0]
        rec = {"part": "memory", "world": world, "cut": None if world == 1 else Shard.build(h, world, 0).cut,
               "max_rank_bytes": max(per_rank), "rank_bytes": per_rank, "single_bytes": single,
               "fraction": max(per_rank) / single, "row_fraction": max(fractions), "ideal": 1 / world}
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- ranks
def _init(rank: int, world: int, port: int, backend: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))


def _rank_comm(rank: int, world: int, port: int, backend: str, device: str, sizes: list[int], reps: int,
               out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _init(rank, world, port, backend)
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    results = []
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), device=dev)
        outs = [torch.empty_like(t) for _ in range(world)]
        for kind in ("all_gather", "all_reduce"):
            times = []
            for i in range(reps + 2):
                dist.barrier()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                if kind == "all_gather":
                    dist.all_gather(outs, t)
                else:
                    dist.all_reduce(t)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            results.append({"kind": kind, "bytes": t.numel() * 4, "seconds": statistics.median(times)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _rank_engine(rank: int, world: int, port: int, name: str, warm: int, rounds: int, threads: int,
                 out_path: str, branching: list[int] | None = None) -> None:
    torch.set_num_threads(threads)
    branching0, cut = SCALING[name]
    branching = branching0 if branching is None else branching
    h = Hierarchy.balanced(branching)
    shard, comm, dist = None, None, None
    if world > 1:
        import torch.distributed as dist

        _init(rank, world, port, "gloo")
        shard, comm = Shard.build(h, world, rank, cut), TorchComm()
    X, Y, part = BE.make_data(h.num_devices)
    torch.manual_seed(0)
    engine = QMLHFLEngine(BE.MLP(), BE.ce_loss, h, TAUS, [QSGD(BE.LEVELS)] * 3, optimizer="sgd",
                          optimizer_kwargs={"lr": BE.LR}, seed=0, shard=shard, comm=comm)
    mine = part if shard is None else part[shard.rows(0)]
    g = torch.Generator().manual_seed(1)
    steps = math.prod(TAUS)

    def step() -> None:  # every rank draws every device's positions (the same stream), and keeps its own
        pos = torch.randint(0, part.shape[1], (part.shape[0], BE.BATCH), generator=g)
        if shard is not None:
            pos = pos[shard.rows(0)]
        idx = mine.gather(1, pos)
        engine.local_step((gather_batch(X, idx), gather_batch(Y, idx)))

    for _ in range(warm):
        step()
    stats0 = {k: list(v) for k, v in (comm.stats.items() if comm else [])}
    times = []
    for _ in range(rounds):
        if dist is not None:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dist is not None:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    per_round = {}
    if comm is not None:
        for k, (calls, nbytes) in comm.stats.items():
            c0, b0 = stats0.get(k, [0, 0])
            per_round[k] = [(calls - c0) / rounds, (nbytes - b0) / rounds]
    rec = {"rank": rank, "round_seconds": times, "per_round": per_round,
           "formula_bytes_per_round": None if shard is None else
           shard.exchange_bytes_per_round(TAUS, engine.state.num_params, engine.state.num_buffer_elems),
           "devices": engine.state.params[0].shape[0], "num_params": engine.state.num_params,
           "cut": None if shard is None else shard.cut,
           "exchange_bytes": None if shard is None else shard.exchange_bytes(engine.state.num_params),
           "cloud_checksum": float(engine.cloud_params().double().sum())}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(rec, f)
    if dist is not None:
        dist.destroy_process_group()


def _spawn(fn, world: int, args: tuple) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="spawn")


def part_comm(world: int, port: int, backend: str, device: str, max_bytes: int, reps: int) -> dict:
    sizes = [s for s in SIZES if s <= max_bytes]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "comm.json")
        _spawn(_rank_comm, world, (port, backend, device, sizes, reps, path))
        with open(path) as f:
            points = json.load(f)
    fits = {}
    for kind in ("all_gather", "all_reduce"):
        pts = [(p["bytes"], p["seconds"]) for p in points if p["kind"] == kind]
        fits[kind] = fit_alpha_beta(pts)
    rec = {"part": "comm", "world": world, "backend": backend, "device": device, "points": points, "fits": fits}
    print(json.dumps(rec), flush=True)
    return rec


def fit_alpha_beta(points: list[tuple[int, float]]) -> dict:
    """t = alpha + beta x bytes, least squares weighted by 1 / t (relative errors)."""
    sw = sx = sy = sxx = sxy = 0.0
    for b, t in points:
        w = 1.0 / (t * t)
        sw, sx, sy, sxx, sxy = sw + w, sx + w * b, sy + w * t, sxx + w * b * b, sxy + w * b * t
    beta = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    alpha = (sy - beta * sx) / sw
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_MBps": 1 / beta / 1e6 if beta > 0 else None}


def part_scaling(name: str, port: int, warm: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "engine")
        _spawn(_rank_engine, 1, (port, name, warm, rounds, 1, path))
        with open(path + ".0") as f:
            one = json.load(f)
        _spawn(_rank_engine, 1, (port, name, warm, rounds, 1, path + "half", HALF[name]))
        with open(path + "half.0") as f:
            half = json.load(f)
        _spawn(_rank_engine, 2, (port + 1, name, warm, rounds, 1, path + "w2"))
        ranks = []
        for r in range(2):
            with open(f"{path}w2.{r}") as f:
                ranks.append(json.load(f))
    t1 = statistics.median(one["round_seconds"])
    t2 = statistics.median(max(a, b) for a, b in zip(ranks[0]["round_seconds"], ranks[1]["round_seconds"]))
    rec = {"part": "scaling", "config": name, "warm": warm, "rounds": rounds, "single": one, "ranks": ranks,
           "half": half, "t_half_s": statistics.median(half["round_seconds"]),
           "t1_s": t1, "t2_s": t2, "speedup": t1 / t2,
           "same_result": all(r["cloud_checksum"] == one["cloud_checksum"] for r in ranks)}
    print(json.dumps({k: v for k, v in rec.items() if k not in ("single", "ranks")}), flush=True)
    return rec


def interpolate_time(points: list[tuple[int, float]], nbytes: float) -> float:
    """Seconds of one collective contributing ``nbytes`` per rank, interpolated log-log between the measured
    sizes (linear in bytes beyond the largest, from the last two points)."""
    pts = sorted(points)
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if nbytes <= b1:
            f = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    (b0, t0), (b1, t1) = pts[-2], pts[-1]
    return t1 + (nbytes - b1) * (t1 - t0) / (b1 - b0)


def project(scaling: dict, comm: dict, worlds: list[int]) -> list[dict]:
    """The round time against W (module docstring), from the W = 1 and W = 2 measurements.

    compute(W) = a + b x (largest rank's devices), a and b from the two single-process runs (all devices, and one
    rank's share at W = 2 as a tree of its own): the per-step cost that does not shrink with the devices stays.
    comm(W) = sum over the collectives of a round of calls x (W - 1) x t(bytes per call at W), t interpolated from
    the measured W = 2 collectives (a ring: W - 1 steps, each of one rank's share)."""
    name = scaling["config"]
    branching, cut = SCALING[name]
    h = Hierarchy.balanced(branching)
    n1, n_half = h.num_devices, scaling["half"]["devices"]
    b = (scaling["t1_s"] - scaling["t_half_s"]) / (n1 - n_half)
    a = scaling["t1_s"] - b * n1
    d = scaling["single"]["num_params"]
    curves = {k: [(p["bytes"], p["seconds"]) for p in comm["points"] if p["kind"] == k]
              for k in ("all_gather", "all_reduce")}
    per_round = scaling["ranks"][0]["per_round"]  # calls and bytes per round at W = 2, by kind
    fixed_cut = cut if cut is not None else Shard.build(h, 2, 0).cut
    out = []
    for world in worlds:
        if h.nodes_per_layer[fixed_cut] < world:
            continue
        shard = Shard.build(h, world, 0, fixed_cut)
        largest = max(int(h.device_counts[shard.cut][s:e].sum()) for s, e in shard.blocks)
        compute = a + b * largest
        comm_s = 0.0
        for kind, (calls, nbytes) in per_round.items():
            if calls == 0:
                continue
            if kind == "all_gather":  # the payload at this W, from the formula
                nbytes = shard.exchange_bytes_per_round(TAUS, d)
            curve = curves["all_gather" if kind in ("all_gather", "sizes") else "all_reduce"]
            comm_s += calls * (world - 1) * interpolate_time(curve, nbytes / calls)
        rec = {"part": "projection", "config": name, "world": world, "cut": shard.cut, "compute_s": compute,
               "comm_s": comm_s, "round_s": compute + comm_s, "speedup": scaling["t1_s"] / (compute + comm_s),
               "fixed_s": a, "per_device_s": b}
        if world == 2:
            rec["measured_round_s"] = scaling["t2_s"]
            rec["error"] = (compute + comm_s) / scaling["t2_s"] - 1
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- report
def tables(results: dict) -> str:
    lines = []
    if results.get("memory"):
        lines += ["Per-rank state (1000 MLP devices, TopK+EF, momentum):", "",
                  "| W | cut layer | largest rank MB | of single | rows share | 1/W |", "|---:|---:|---:|---:|---:|---:|"]
        for r in results["memory"]:
            lines.append(f"| {r['world']} | {r['cut'] if r['cut'] is not None else '-'} | "
                         f"{r['max_rank_bytes'] / 2**20:,.0f} | {r['fraction']:.3f} | {r['row_fraction']:.3f} | "
                         f"{r['ideal']:.3f} |")
        lines.append("")
    if results.get("comm"):
        c = results["comm"]
        lines += [f"Collectives, W = {c['world']}, {c['backend']} on {c['device']} (median seconds):", "",
                  "| bytes per rank | all_gather ms | all_reduce ms |", "|---:|---:|---:|"]
        by = {}
        for p in c["points"]:
            by.setdefault(p["bytes"], {})[p["kind"]] = p["seconds"]
        for b in sorted(by):
            lines.append(f"| {b:,} | {1e3 * by[b]['all_gather']:.3f} | {1e3 * by[b]['all_reduce']:.3f} |")
        for k, f in c["fits"].items():  # a summary; the projection interpolates the measured points
            lines.append(f"\nfit {k}: alpha = {1e6 * f['alpha_s']:.1f} us, beta = {1e9 * f['beta_s_per_byte']:.3f} "
                         f"ns/byte ({f['bandwidth_MBps']:.0f} MB/s)")
        lines.append("")
    for s in results.get("scaling", []):
        lines += [f"Strong scaling, {s['config']} ({s['warm']} warm-up steps, {s['rounds']} timed rounds):", "",
                  f"- 1 process x 1 thread: {s['t1_s']:.3f} s per round; 2 processes x 1 thread: {s['t2_s']:.3f} s; "
                  f"speed-up {s['speedup']:.2f}x; same cloud model: {s['same_result']}; one rank's share alone "
                  f"({s['half']['devices']} devices, 1 process): {s['t_half_s']:.3f} s"]
        for r in s["ranks"]:
            kinds = ", ".join(f"{k}: {c:g} calls, {b:,.0f} B" for k, (c, b) in sorted(r["per_round"].items()))
            lines.append(f"- rank {r['rank']} ({r['devices']} devices, cut layer {r['cut']}) per round: {kinds}; "
                         f"formula (payload) {r['formula_bytes_per_round']:,} B")
        lines.append("")
    for name, proj in results.get("projection", {}).items():
        lines += [f"Projected round time, {name} (compute = {proj[0]['fixed_s']:.3f} s + "
                  f"{1e3 * proj[0]['per_device_s']:.2f} ms x devices per rank):", "",
                  "| W | cut | compute s | comm s | round s | speed-up | measured s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in proj:
            meas = f"{p['measured_round_s']:.3f} ({100 * p['error']:+.1f} %)" if "measured_round_s" in p else ""
            lines.append(f"| {p['world']} | {p['cut']} | {p['compute_s']:.3f} | {p['comm_s']:.4f} | "
                         f"{p['round_s']:.3f} | {p['speedup']:.2f}x | {meas} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="memory,comm,scaling,projection")
    ap.add_argument("--scaling", default=",".join(SCALING), help=f"configurations, from {list(SCALING)}")
    ap.add_argument("--worlds", default="1,2,4,8", help="world sizes of the memory part")
    ap.add_argument("--warm", type=int, default=20, help="warm-up local steps of the scaling runs")
    ap.add_argument("--rounds", type=int, default=3, help="timed global rounds (20 local steps each)")
    ap.add_argument("--reps", type=int, default=20, help="repetitions per size in the comm part")
    ap.add_argument("--max-bytes", type=int, default=64 * 2**20, help="largest tensor of the comm part")
    ap.add_argument("--backend", default="gloo", help="comm part: gloo (default) or nccl")
    ap.add_argument("--device", default="cpu", help="comm part: cpu or cuda (nccl)")
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--jsonl", default=None, help="also write every record to this file")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"memory", "comm", "scaling", "projection"}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from memory, comm, scaling, projection")
    for name in args.scaling.split(","):
        if name not in SCALING:
            raise SystemExit(f"unknown scaling configuration {name!r}; choose from {list(SCALING)}")
    results: dict = {}
    t0 = time.perf_counter()
    if "memory" in parts:
        results["memory"] = part_memory([int(w) for w in args.worlds.split(",")])
    if "comm" in parts or "projection" in parts:
        results["comm"] = part_comm(2, args.port, args.backend, args.device, args.max_bytes, args.reps)
    if "scaling" in parts or "projection" in parts:
        results["scaling"] = [part_scaling(n, args.port + 10 + 2 * i, args.warm, args.rounds)
                              for i, n in enumerate(args.scaling.split(","))]
    if "projection" in parts:
        results["projection"] = {s["config"]: project(s, results["comm"], [2, 4, 8, 16, 32, 64])
                                 for s in results["scaling"]}
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.write(json.dumps(results) + "\n")
    print(f"\n(total {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print(tables(results))


if __name__ == "__main__":
    main()
