"""What the three runners of bench/peers share: the workload constants, the two models, the prepared files
(data, partition, initial weights), the mini-batch rule, the final evaluation and the result record.

Plain torch + numpy only: this module is imported by the project's runner (the project's .venv) and by the
Flower and pfl-research runners (their own virtual environments, which hold torch, numpy and the framework and
nothing of this project).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------- the workload
LR = 0.05          # plain SGD on every client, no momentum, no weight decay
BATCH = 32         # mini-batch of every local step
LOCAL_STEPS = 10   # exactly this many local steps per sampled client per round (steps, not epochs)
ALPHA = 0.5        # Dirichlet label skew of the shared partition
EVAL_BATCH = 1000  # batch of the final evaluation on the 10,000 test images

# name -> (clients, clients per round, rounds)
WORKLOADS: dict[str, tuple[int, int, int]] = {
    "100of100": (100, 100, 20),
    "50of1000": (1000, 50, 50),
    # the smoke configuration of tests/test_peers.py: 4 clients, all sampled, 2 rounds
    "tiny": (4, 4, 2),
}
MODELS = ("lenet", "mlp")
SYSTEMS = ("qmlhfl", "pfl", "flower")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# a runner's record: the driver checks that every one of these is present
RECORD_FIELDS = ("system", "mode", "framework_version", "torch_version", "python", "workload", "model", "clients",
                 "per_round", "rounds", "local_steps", "batch", "lr", "device", "processes", "threads_per_process",
                 "round_s", "train_s", "steady_client_steps_per_s", "mean_client_steps_per_s", "eval_s", "accuracy",
                 "test_loss", "partition_sha256", "init_sha256", "data_sha256", "t_process_start", "t_train_start",
                 "t_train_end", "t_end", "clients_per_round_seen", "local_steps_per_client")


# ------------------------------------------------------------------------------------------------ models
class LeNet(nn.Module):
    """MNIST LeNet of the HierFAVG papers, the project's ``recipes.models.LeNet`` without Lightning: 21,840
    parameters. conv(1->10, 5x5) -> maxpool 2 -> relu -> conv(10->20, 5x5) -> dropout2d -> maxpool 2 -> relu ->
    fc(320->50) -> relu -> dropout -> fc(50->10)."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc_drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.fc_drop(x))


class MLP(nn.Module):
    """784-200-10 with ReLU (159,010 parameters), the project's ``recipes.models.MLP`` default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


PARAMS = {"lenet": 21_840, "mlp": 159_010}


def build_model(name: str) -> nn.Module:
    if name == "lenet":
        return LeNet()
    if name == "mlp":
        return MLP()
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


# ---------------------------------------------------------------------------------------- prepared files
def data_file(cache: Path) -> Path:
    return cache / "mnist.npz"


def partition_file(cache: Path, clients: int, seed: int) -> Path:
    return cache / f"partition_{clients}clients_dirichlet{ALPHA}_seed{seed}.npz"


def init_file(cache: Path, model: str, seed: int) -> Path:
    return cache / f"init_{model}_seed{seed}.npz"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_data(cache: Path) -> dict[str, np.ndarray]:
    """MNIST as prepared by prepare.py: ``train_x``/``test_x`` uint8 [n, 1, 28, 28], ``train_y``/``test_y``
    int64 [n], in the order of the IDX files (the partition indexes ``train_x``)."""
    with np.load(data_file(cache), allow_pickle=False) as z:
        return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}


def load_partition(path: Path) -> list[np.ndarray]:
    """The shared partition: one int64 array of training-set indices per client."""
    with np.load(path, allow_pickle=False) as z:
        flat, offsets = z["indices"], z["offsets"]
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def load_init(model: nn.Module, path: Path) -> None:
    """Load the shared initial weights (an .npz of the state dict, written once by prepare.py)."""
    with np.load(path, allow_pickle=False) as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    model.load_state_dict(state, strict=True)


_CACHED: dict = {}


def cached_training_data(cache: str, part_path: str) -> dict:
    """``x`` (uint8 tensor), ``y`` and ``parts`` (the partition), read once per process: what a Flower actor
    keeps between the clients it trains (a module-level cache: this module is imported by reference in Ray's
    workers, so the cache lives as long as the actor)."""
    if _CACHED.get("key") != (cache, part_path):
        data = load_data(Path(cache))
        _CACHED.clear()
        _CACHED.update(key=(cache, part_path), x=torch.from_numpy(data["train_x"]),
                       y=torch.from_numpy(data["train_y"]), parts=load_partition(Path(part_path)))
    return _CACHED


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32, normalised with the MNIST mean and std (as the project's recipes)."""
    return (x_uint8.to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD


# ------------------------------------------------------------------------------------ the mini-batch rule
def client_rng(seed: int, round_: int, client: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_), int(client)])


def client_seed(seed: int, round_: int, client: int) -> int:
    """A torch seed for one client's round (the Flower client seeds its dropout masks with it)."""
    return int(client_rng(seed, round_, client).integers(2**62)) ^ 0x5EED


def local_batches(rng: np.random.Generator, n_local: int, steps: int = LOCAL_STEPS, batch: int = BATCH
                  ) -> np.ndarray:
    """int64 [steps, batch]: positions into a client's own data for one round of local training. The client
    walks a random permutation of its data and draws a new one when it runs out, so every batch has ``batch``
    samples even when the client holds fewer (the rule of the project's DeviceSampler; the peers start a fresh
    walk every round, the project continues its walk across rounds)."""
    need = steps * batch
    walks = [rng.permutation(n_local) for _ in range(math.ceil(need / n_local))]
    return np.concatenate(walks)[:need].reshape(steps, batch)


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, x_uint8: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on the test images, eval mode, batches of EVAL_BATCH."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    xs, ys = torch.from_numpy(x_uint8), torch.from_numpy(y)
    for i in range(0, len(ys), EVAL_BATCH):
        xb = normalise(xs[i:i + EVAL_BATCH].to(device))
        yb = ys[i:i + EVAL_BATCH].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(ys), loss_sum / len(ys)


# --------------------------------------------------------------------------------------- runner plumbing
T_PROCESS_START = time.time()  # set when a runner imports this module, its first import


def runner_args(description: str, extra: list[tuple[str, dict]] | None = None):
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--rounds", type=int, default=None, help="override the workload's number of rounds")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads (or workers, see below)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", required=True, help="folder of the prepared files (prepare.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", required=True, help="where to write the JSON record")
    for name, kw in extra or []:
        ap.add_argument(name, **kw)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: must be an integer >= 1")
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be an integer >= 1")
    torch.manual_seed(args.seed)  # dropout masks (the Flower client reseeds per client and round)
    return args


def workload(args) -> tuple[int, int, int]:
    clients, per_round, rounds = WORKLOADS[args.workload]
    return clients, per_round, args.rounds or rounds


def check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this environment's torch {torch.__version__} sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


def round_times(stamps: list[float]) -> list[float]:
    """Durations between consecutive timestamps (stamps[0]: start of round 1, stamps[r]: end of round r)."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def make_record(args, *, system: str, mode: str, framework_version: str, processes: int, threads_per_process: int,
                stamps: list[float], eval_s: float, accuracy: float, test_loss: float, device: torch.device,
                **extra) -> dict:
    """The runner's record. ``stamps``: time.time() at the start of round 1 and at the end of every round."""
    clients, per_round, rounds = workload(args)
    rt = round_times(stamps)
    if len(rt) != rounds:
        raise RuntimeError(f"{system}: {len(rt)} round times recorded for {rounds} rounds")
    steps = per_round * LOCAL_STEPS
    steady = steps / float(np.median(rt[1:])) if len(rt) > 1 else None  # the first round is excluded
    cache = Path(args.cache)
    rec = {
        "system": system, "mode": mode, "framework_version": framework_version, "torch_version": torch.__version__,
        "python": platform.python_version(), "workload": args.workload, "model": args.model, "clients": clients,
        "per_round": per_round, "rounds": rounds, "local_steps": LOCAL_STEPS, "batch": BATCH, "lr": LR,
        "device": str(device), "processes": processes, "threads_per_process": threads_per_process,
        "round_s": rt, "train_s": stamps[-1] - stamps[0], "steady_client_steps_per_s": steady,
        "mean_client_steps_per_s": steps * rounds / (stamps[-1] - stamps[0]), "eval_s": eval_s,
        "accuracy": accuracy, "test_loss": test_loss,
        "partition_sha256": sha256(partition_file(cache, clients, args.seed)),
        "init_sha256": sha256(init_file(cache, args.model, args.seed)), "data_sha256": sha256(data_file(cache)),
        "t_process_start": T_PROCESS_START, "t_train_start": stamps[0], "t_train_end": stamps[-1],
        "t_end": time.time(), "seed": args.seed,
    }
    rec.update(extra)
    return rec


def workload_check(rec: dict) -> str:
    """"ok" when the record shows the workload was run as specified: ``per_round`` clients trained in every one of
    the ``rounds`` rounds, exactly LOCAL_STEPS local steps each; else what differs."""
    problems = []
    if rec["clients_per_round_seen"] != [rec["per_round"]] * rec["rounds"]:
        problems.append(f"clients per round {rec['clients_per_round_seen']}, expected {rec['per_round']} in each of "
                        f"{rec['rounds']} rounds")
    if abs(rec["local_steps_per_client"] - LOCAL_STEPS) > 1e-9:
        problems.append(f"{rec['local_steps_per_client']} local steps per client, expected {LOCAL_STEPS}")
    return "ok" if not problems else "; ".join(problems)


def write_record(path: str, rec: dict) -> None:
    missing = [k for k in RECORD_FIELDS if k not in rec]
    if missing:
        raise RuntimeError(f"record of {rec.get('system')} lacks {missing}")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)
    print(f"{rec['system']} ({rec['mode']}): accuracy {rec['accuracy']:.4f}, training rounds {rec['train_s']:.2f} s",
          file=sys.stderr)
