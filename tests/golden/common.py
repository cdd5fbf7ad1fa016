"""What the golden files are made of and compared by: the small models, the batches, the engine factory, the
snapshot of an engine (every number it holds, through public accessors) and a small strategy run."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def ce_loss(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


GOLDEN = Path(__file__).resolve().parent
# The files in tests/golden/ itself were written before the CPU's vendor was recorded, on the project's AMD EPYC
# VMs (bench/RESULTS.md's machine lines). MKL and oneDNN choose different kernels on Intel and AMD CPUs of the
# same instruction set, so the same program's floats differ there in the last bits.
BASE_VENDOR = "AuthenticAMD"


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    """What decides whether float results are reproducible bit for bit: the torch build, the CPU's ISA and its
    vendor (the BLAS and convolution libraries pick kernels by both)."""
    return {"torch": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu_vendor": cpu_vendor()}


def made_on(stored: dict[str, str]) -> dict[str, str]:
    """The machine a golden file records, with the vendor of the files written before it was recorded."""
    return {"cpu_vendor": BASE_VENDOR, **stored}


def machine_dir(m: dict[str, str] | None = None) -> Path:
    """tests/golden/machines/KEY/: the golden numbers of another machine than the base files' (written by
    ``make_golden.py --this-machine`` and ``recipe_golden.py --write --this-machine``)."""
    m = machine() if m is None else m
    return GOLDEN / "machines" / f"{m['machine']}-{m['cpu_vendor']}-{m['cpu_capability']}-torch{m['torch']}"


@functools.lru_cache(maxsize=1)
def on_base_machine() -> bool:
    """Whether this machine is the one the files in tests/golden/ were made on."""
    return made_on(torch.load(GOLDEN / "engine_runs.pt", weights_only=True)["machine"]) == machine()


def golden_numbers() -> Path | None:
    """The directory of this machine's golden numbers: tests/golden/ on the base machine, its machine directory
    where one was written, else None (bit for bit cannot be checked here). A machine directory is written from a
    commit whose numbers equal the base files' on the base machine, so it holds the same program's numbers."""
    if on_base_machine():
        return GOLDEN
    d = machine_dir()
    return d if (d / "engine_runs.pt").exists() else None


def build_engine(model: str, hierarchy: Any, taus: list[int], kw: dict[str, Any]) -> Any:
    from lightning_qmlhfl.simulation.engine import QMLHFLEngine

    torch.manual_seed(0)
    template = {"mlp": MLP, "cnn": SmallCNN, "mlp_bf16": MLP}[model]()
    if model == "mlp_bf16":
        template = template.to(torch.bfloat16)
    kw = dict(kw)
    return QMLHFLEngine(template, ce_loss, hierarchy, taus, kw.pop("compressors"), **kw)


def batches_for(engine: Any, steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """One mini-batch of 4 per device per step (MNIST-like images for the CNN)."""
    n = engine.hierarchy.num_devices
    dtype = engine.state.params[0].dtype
    shape = (1, 6, 6) if engine.state.num_buffer_elems else (6,)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, n, 4, *shape, generator=g).to(dtype)
    ys = torch.randint(0, 3, (steps, n, 4), generator=g)
    return [(xs[t], ys[t]) for t in range(steps)]


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flat(f"{prefix}/{i}", v, out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    else:
        raise TypeError(f"{prefix}: cannot snapshot {type(value).__name__}")


def snapshot(engine: Any) -> dict[str, Any]:
    """Every number the engine holds, by public accessors: the stacked models and buffers of every layer, the
    error-feedback memory, the server optimizers' state, the devices' optimizer state, the population and its clock,
    the current tree, the counters and the bits."""
    out: dict[str, Any] = {}
    s = engine.state
    for m in range(engine.N + 1):  # the devices' rows as the engine presents them (lazy with partial participation)
        out[f"params/{m}"] = engine.device_params() if m == 0 else s.params[m].clone()
        if s.num_buffer_elems:
            out[f"buffers/{m}"] = engine.device_buffers() if m == 0 else s.buffers[m].clone()
    for n, mem in enumerate(engine.memory, start=1):
        if mem is not None:
            out[f"memory/{n}"] = mem.clone()
    for n, st in enumerate(engine.server_state, start=1):
        if st is not None:
            _flat(f"server/{n}", st, out)
    opt = engine.optimizer.state_dict()
    _flat("optimizer/state", opt["state"], out)
    out["optimizer/device_steps"] = opt["device_steps"].clone()
    _flat("population", engine.population.state_dict(), out)
    out["tree/device_parents"] = engine.tree.parent_index(0).clone()
    for key in ("round", "step_in_round", "total_steps"):
        out[f"counters/{key}"] = int(getattr(engine, key))
    for key in ("aggregation_counts", "bits_sent", "baseline_bits", "round_bits"):
        out[f"counters/{key}"] = [int(v) for v in getattr(engine, key)]
    out["sim_time"] = float(engine.sim_time)
    return out


def strategy_run(workdir: Path, rounds: int, keep_round_1: Path | None = None, resume: Path | None = None
                 ) -> tuple[Tensor, list[dict[str, Any]]]:
    """A small MNIST run of QMLHFLStrategy through Trainer.fit (one thread): the cloud model's flat parameters and
    the strategy's history after ``rounds`` global rounds. ``keep_round_1``: copy the checkpoint written after the
    first round there; ``resume``: continue from that checkpoint."""
    import shutil

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers.fl_modules import MnistCNN, loaders
    from lightning_qmlhfl import QSGD, Hierarchy, QMLHFLStrategy, TopK
    from lightning_qmlhfl.data import Dirichlet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MnistCNN(lr=0.05, dropout=0.2)
    train, val = loaders(n_train=600, n_val=200, batch_size=8)
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 3]), taus=[2, 2],
                              compressors=[TopK(ratio=0.3, error_feedback="ef"), QSGD(8, bucket_size=64)],
                              partition=Dirichlet(alpha=0.5, min_samples=5), seed=11, executor="loop")
    ckpt_dir = workdir / "ckpt"
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_epochs=rounds, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)])
    trainer.fit(model, train, val, ckpt_path=None if resume is None else str(resume))
    if keep_round_1 is not None:
        first = sorted(ckpt_dir.glob("epoch=0-*.ckpt"))[0]
        shutil.copyfile(first, keep_round_1)
        shutil.rmtree(workdir, ignore_errors=True)
    cloud = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    return cloud, [dict(h) for h in strategy.history]
