"""Engine throughput: simulated device-steps per second, QMLHFLEngine (vmap / loop executors) vs a naive baseline.

Setup (the issue's): 100 devices in a balanced tree with branching [4, 5, 5] (cloud -> 4 -> 20 edges -> 100
devices, N = 3), tau = (5, 2, 2) (edge aggregation every 5 local steps, layer 2 every 10, cloud every 20 = one
global round), QSGD with s = 8 on every layer, plain SGD (lr 0.01), batch 32, for

- ``lenet``: the HierFAVG MNIST LeNet (conv 1->10 k5, maxpool2, relu, conv 10->20 k5, dropout2d, maxpool2, relu,
  fc 320->50, relu, dropout, fc 50->10; 21,840 parameters),
- ``mlp``: a 784-200-10 MLP (159,010 parameters),

plus 1000 MLP devices (branching [10, 10, 10], same tau and quantizers).

Data: synthetic, MNIST-shaped and resident in memory: 60,000 random images [1, 28, 28] with random labels (the
size of MNIST's training set), partitioned IID by index over the devices (600 per device for 100 devices, 60 for
1000). Random data is fine for throughput: the work per step does not depend on the values.

- ``vmap`` / ``loop``: :class:`lightning_qmlhfl.engine.QMLHFLEngine` with that executor. Each local step gathers
  one mini-batch per device from the resident tensors by one indexing operation (random positions inside each
  device's partition), x [N_tot, 32, 1, 28, 28], y [N_tot, 32], the way the Lightning strategy does.
- ``naive``: :class:`NaiveHierFL` below, written the way public hierarchical-FL code (HierFAVG and its forks) is
  written: one nn.Module + torch.optim.SGD + shuffling DataLoader (batch 32) per device, a Python loop over
  devices for every local step, uploads as ``copy.deepcopy(model.state_dict())``, per-node Python loops that
  flatten, QSGD-quantize (plain torch ops, one flat vector per child node, s = 8) and average the state dicts,
  and downloads by deep copies + ``load_state_dict``. Same schedule, same number of device-steps and of
  aggregations (asserted) as the engine run.

Every configuration runs in a fresh subprocess (``--one NAME``) so that the peak RSS (``ru_maxrss``, monotone over
a process's life) belongs to that configuration alone; the reported memory is the peak RSS minus the RSS right
after the imports (so it includes the ~180 MB of resident data). Timing: a warm-up of ``--warm`` local steps
(default one global round = 20 steps; 5 for the 1000-device runs), then ``--rounds`` global rounds (20 local steps
each, with all their aggregations; default 2, 1 for the 1000-device runs), each timed on its own; device-steps/s
= 20 x devices / median round time (the best round is printed too: other processes on a shared machine make
single rounds slow). torch.set_num_threads(2) (``--threads``).

Usage::

    python bench/engine.py                          # the whole table (~6 min on a quiet 2-core CPU)
    python bench/engine.py --repeats 2              # run the whole set twice, report both
    python bench/engine.py --configs mlp1000:loop   # extra: the loop executor on 1000 devices (slow)
    python bench/engine.py --one mlp100:vmap        # one configuration, JSON line
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.engine import QMLHFLEngine, gather_batch

POOL = 60_000  # synthetic MNIST-sized training set, resident in memory
BATCH = 32
LR = 0.01
LEVELS = 8  # QSGD s on every layer


# ---------------------------------------------------------------------------------------------------- models
class LeNet(nn.Module):
    """HierFAVG's MNIST LeNet (21,840 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.drop = nn.Dropout()
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = self.drop(x)
        return self.fc2(x)


class MLP(nn.Module):
    """784-200-10 (159,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS = {"lenet": LeNet, "mlp": MLP}

# name -> (model, branching, executor, warm-up local steps, timed global rounds of 20 local steps)
CONFIGS: dict[str, tuple[str, list[int], str, int, int]] = {
    "mlp100:naive": ("mlp", [4, 5, 5], "naive", 20, 2),
    "mlp100:vmap": ("mlp", [4, 5, 5], "vmap", 20, 2),
    "mlp100:loop": ("mlp", [4, 5, 5], "loop", 20, 2),
    "lenet100:naive": ("lenet", [4, 5, 5], "naive", 20, 2),
    "lenet100:vmap": ("lenet", [4, 5, 5], "vmap", 20, 2),
    "lenet100:loop": ("lenet", [4, 5, 5], "loop", 20, 2),
    # 1000 devices: shorter warm-up (5 steps = one edge aggregation), one timed global round
    "mlp1000:naive": ("mlp", [10, 10, 10], "naive", 5, 1),
    "mlp1000:vmap": ("mlp", [10, 10, 10], "vmap", 5, 1),
    "mlp1000:loop": ("mlp", [10, 10, 10], "loop", 5, 1),  # not in the default set (slow)
}
DEFAULT = [k for k in CONFIGS if k != "mlp1000:loop"]
TAUS = (5, 2, 2)


def ce_loss(module: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_data(num_devices: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(POOL, 1, 28, 28, generator=g)
    Y = torch.randint(0, 10, (POOL,), generator=g)
    part = torch.randperm(POOL, generator=g)[: (POOL // num_devices) * num_devices].view(num_devices, -1)
    return X, Y, part


# ---------------------------------------------------------------------------------------------------- naive
def qsgd(v: torch.Tensor, s: int) -> torch.Tensor:
    """QSGD of one flat vector, plain torch ops (as a per-node upload in public code)."""
    norm = v.norm()
    if norm == 0:
        return torch.zeros_like(v)
    r = v.abs() / norm * s
    low = torch.floor(r)
    xi = low + (torch.rand_like(r) < (r - low)).float()
    return norm * torch.sign(v) * xi / s


def flatten_sd(sd: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for v in sd.values()])


def unflatten_sd(flat: torch.Tensor, like: dict) -> dict:
    out, off = {}, 0
    for k, v in like.items():
        out[k] = flat[off : off + v.numel()].view_as(v).clone()
        off += v.numel()
    return out


class Client:
    def __init__(self, model: nn.Module, dataset, indices: list[int]) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loader = DataLoader(Subset(dataset, indices), batch_size=BATCH, shuffle=True)
        self.it = iter(self.loader)
        self.steps = 0

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def local_update(self) -> None:
        x, y = self.next_batch()
        self.model.train()
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1

    def send(self) -> dict:
        return copy.deepcopy(self.model.state_dict())

    def receive(self, state: dict) -> None:
        self.model.load_state_dict(state)


class Server:
    """An edge server (any layer >= 1) or the cloud: a state dict, its children, its device count."""

    def __init__(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
        self.children: list = []
        self.num_devices = 0


class NaiveHierFL:
    """HierFAVG-style multi-layer hierarchical FL with per-node QSGD; see the module docstring."""

    def __init__(self, model_fn, branching: list[int], taus: tuple[int, ...], X, Y, part) -> None:
        template = model_fn()
        init = copy.deepcopy(template.state_dict())
        dataset = TensorDataset(X, Y)
        self.clients = []
        for i in range(part.shape[0]):
            m = model_fn()
            m.load_state_dict(init)
            self.clients.append(Client(m, dataset, part[i].tolist()))
        self.taus = taus
        # Build the tree top-down: layers[0] = clients, layers[N] = [cloud].
        n_layers = len(branching)
        self.layers: list[list] = [[] for _ in range(n_layers + 1)]
        self.layers[n_layers] = [Server(init)]
        for depth, fan in enumerate(branching):  # depth 0: the cloud's children
            n = n_layers - depth  # parents' layer
            for parent in self.layers[n]:
                for _ in range(fan):
                    child = Server(init) if n - 1 > 0 else self.clients[len(self.layers[0])]
                    parent.children.append(child)
                    self.layers[n - 1].append(child)
        self._count(self.layers[n_layers][0])
        self.aggregations = [0] * n_layers  # uploads per layer, for the same-work check
        self.steps = 0

    def _count(self, node) -> int:
        if isinstance(node, Client):
            return 1
        node.num_devices = sum(self._count(c) for c in node.children)
        return node.num_devices

    @staticmethod
    def _state_of(node) -> dict:
        return node.send() if isinstance(node, Client) else copy.deepcopy(node.state)

    def aggregate(self, n: int) -> None:
        """Eq. 4/6 at every node of layer n: v_p += sum_c w_c Q(v_c - v_p); then push the model down (Eq. 5)."""
        for server in self.layers[n]:
            parent_flat = flatten_sd(server.state)
            acc = torch.zeros_like(parent_flat)
            for child in server.children:
                w = (1 if isinstance(child, Client) else child.num_devices) / server.num_devices
                diff = flatten_sd(self._state_of(child)) - parent_flat
                acc += w * qsgd(diff, LEVELS)
                self.aggregations[n - 1] += 1
            server.state = unflatten_sd(parent_flat + acc, server.state)
            self._push_down(server)

    def _push_down(self, server: Server) -> None:
        for child in server.children:
            if isinstance(child, Client):
                child.receive(copy.deepcopy(server.state))
            else:
                child.state = copy.deepcopy(server.state)
                self._push_down(child)

    def local_step(self) -> None:
        for c in self.clients:
            c.local_update()
        self.steps += 1
        period = 1
        for n, tau in enumerate(self.taus, start=1):
            period *= tau
            if self.steps % period != 0:
                break
            self.aggregate(n)


# ---------------------------------------------------------------------------------------------------- one config
def run_one(name: str, warm: int | None, rounds: int | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    base = rss_mb()
    load0 = os.getloadavg()[0]
    model_name, branching, executor, warm0, rounds0 = CONFIGS[name]
    warm = warm0 if warm is None else warm
    rounds = rounds0 if rounds is None else rounds
    steps = 20  # one global round: prod(TAUS)
    h = Hierarchy.balanced(branching)
    n_dev = h.num_devices
    X, Y, part = make_data(n_dev)
    data_mb = (X.numel() * 4 + Y.numel() * 8 + part.numel() * 8) / 2**20
    torch.manual_seed(0)
    model_fn = MODELS[model_name]
    if executor == "naive":
        sim = NaiveHierFL(model_fn, branching, TAUS, X, Y, part)

        def step() -> None:
            sim.local_step()

        def counts() -> list[int]:
            return list(sim.aggregations)
    else:
        engine = QMLHFLEngine(model_fn(), ce_loss, h, TAUS, [LEVELS] * len(TAUS), optimizer="sgd",
                              optimizer_kwargs={"lr": LR}, executor=executor, seed=0)
        per_dev = part.shape[1]
        g = torch.Generator().manual_seed(1)

        def step() -> None:
            pos = torch.randint(0, per_dev, (n_dev, BATCH), generator=g)
            idx = part.gather(1, pos)  # [N_tot, B] indices into the resident pool
            engine.local_step((gather_batch(X, idx), gather_batch(Y, idx)))  # what the strategy does

        def counts() -> list[int]:
            # uploads per layer = aggregations x senders
            return [engine.aggregation_counts[n] * h.nodes_per_layer[n] for n in range(len(TAUS))]

    for _ in range(warm):
        step()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    total = warm + steps * rounds
    # same work check: uploads per layer after `total` local steps
    expected, period = [], 1
    for n, tau in enumerate(TAUS):
        period *= tau
        expected.append((total // period) * h.nodes_per_layer[n])
    got = counts()
    assert got == expected, f"{name}: uploads per layer {got} != expected {expected}"
    peak = peak_rss_mb()
    return {
        "name": name, "model": model_name, "devices": n_dev, "executor": executor, "warm": warm, "steps": steps,
        "rounds": rounds, "round_seconds": times, "seconds": dt, "device_steps_per_s": steps * n_dev / dt,
        "best_device_steps_per_s": steps * n_dev / min(times), "peak_rss_mb": peak, "base_rss_mb": base,
        "delta_rss_mb": peak - base, "data_mb": data_mb, "uploads": got, "threads": threads,
        "load_before": load0, "load_after": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------------- driver
def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} "
            f"(CPU, 2 threads), Python {platform.python_version()}, load average at start "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def table(results: list[dict]) -> str:
    naive = {(r["model"], r["devices"]): r["device_steps_per_s"] for r in results if r["executor"] == "naive"}
    lines = [
        "| config | executor | warm-up steps + timed rounds | device-steps/s (median round) | vs naive | "
        "best round | peak RSS delta MB | load avg before/after |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        base = naive.get((r["model"], r["devices"]))
        ratio = f"{r['device_steps_per_s'] / base:.2f}x" if base else "n/a"
        cfg = f"{r['model']} x {r['devices']} devices"
        lines.append(f"| {cfg} | {r['executor']} | {r['warm']} + {r['rounds']} x {r['steps']} | "
                     f"{r['device_steps_per_s']:,.0f} | {ratio} | {r['best_device_steps_per_s']:,.0f} | "
                     f"{r['delta_rss_mb']:,.0f} | {r['load_before']:.1f}/{r['load_after']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help="run one configuration in this process and print its JSON line")
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--warm", type=int, default=None, help="warm-up local steps (default: per config)")
    ap.add_argument("--rounds", type=int, default=None, help="timed global rounds (default: per config)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole set this many times, interleaved")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.warm, args.rounds, args.threads)), flush=True)
        return
    cmd = "python bench/engine.py " + " ".join(sys.argv[1:])
    print(f"command: {cmd.strip()}")
    print(f"machine: {machine()}")
    print(f"setup: tau={TAUS}, QSGD s={LEVELS} on every layer, SGD lr={LR}, batch {BATCH}, synthetic resident "
          f"data ({POOL} MNIST-shaped samples); peak RSS delta = peak RSS - RSS after imports (includes ~188 MB "
          f"data)\n", flush=True)
    names = args.configs.split(",")
    for rep in range(args.repeats):
        results = []
        t_start = time.perf_counter()
        for name in names:
            extra = ["--threads", str(args.threads)]
            if args.warm is not None:
                extra += ["--warm", str(args.warm)]
            if args.rounds is not None:
                extra += ["--rounds", str(args.rounds)]
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, *extra],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name}: FAILED (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            rs = ", ".join(f"{t:.1f}" for t in r["round_seconds"])
            print(f"  {name}: {r['device_steps_per_s']:,.0f} device-steps/s (rounds of {r['steps']} steps: "
                  f"{rs} s), peak RSS delta {r['delta_rss_mb']:,.0f} MB, load {r['load_before']:.1f}->"
                  f"{r['load_after']:.1f}", flush=True)
        print(f"\nrun {rep + 1} of {args.repeats} ({time.perf_counter() - t_start:.0f} s, load average now "
              f"{os.getloadavg()[0]:.2f}):\n")
        print(table(results) + "\n", flush=True)


if __name__ == "__main__":
    main()
