"""Write the files that the three runners share, once, into the cache folder (default bench/peers/.cache/):

- ``mnist.npz``: MNIST read by the project's ``recipes.datasets.load_mnist`` (uint8 images [n, 1, 28, 28] and
  int64 labels, train and test, in file order);
- ``partition_<C>clients_dirichlet0.5_seed<S>.npz``: the Dirichlet(0.5) label split of the 60,000 training images
  over C clients, drawn once by the project's ``Dirichlet`` partitioner (at least 10 samples per client), stored
  as ``indices`` (int64, all clients' index arrays one after the other) and ``offsets`` (int64 [C + 1]);
- ``init_<model>_seed<S>.npz``: the initial weights (the state dict of ``common.build_model`` after
  ``torch.manual_seed(S)``).

A file that exists is kept (so a rerun keeps the same partition and weights and their hashes); files are
written under a temporary name and renamed. Runs in the project's environment.

    python bench/peers/prepare.py --cache bench/peers/.cache --clients 100,1000 --models lenet,mlp
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository root

import common  # noqa: E402


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def prepare(cache: Path, data_root: str, clients: list[int], models: list[str], seed: int = 0) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    dpath = common.data_file(cache)
    if not dpath.exists():
        from recipes.datasets import load_mnist

        tx, ty = load_mnist(data_root, train=True)
        vx, vy = load_mnist(data_root, train=False)
        _save(dpath, {"train_x": tx.numpy(), "train_y": ty.numpy(), "test_x": vx.numpy(), "test_y": vy.numpy()})
        written.append(dpath)
    labels = None
    for c in clients:
        ppath = common.partition_file(cache, c, seed)
        if ppath.exists():
            continue
        from lightning_qmlhfl import Dirichlet, Hierarchy

        if labels is None:
            with np.load(dpath, allow_pickle=False) as z:
                labels = torch.from_numpy(z["train_y"])
        parts = Dirichlet(alpha=common.ALPHA)(labels, Hierarchy.balanced([c]), seed=seed)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        flat = torch.cat(parts).numpy().astype(np.int64)
        if len(np.unique(flat)) != len(flat) or len(flat) != len(labels):
            raise RuntimeError(f"the partition over {c} clients does not cover the training set exactly once")
        _save(ppath, {"indices": flat, "offsets": offsets, "alpha": np.float64(common.ALPHA),
                      "seed": np.int64(seed), "clients": np.int64(c)})
        written.append(ppath)
    for m in models:
        ipath = common.init_file(cache, m, seed)
        if ipath.exists():
            continue
        torch.manual_seed(seed)
        model = common.build_model(m)
        n = sum(p.numel() for p in model.parameters())
        if n != common.PARAMS[m]:
            raise RuntimeError(f"{m} has {n} parameters, expected {common.PARAMS[m]}")
        _save(ipath, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        written.append(ipath)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--data", default=os.environ.get("QMLHFL_DATA", "data"), help="folder holding MNIST/raw")
    ap.add_argument("--clients", default="100,1000")
    ap.add_argument("--models", default="lenet,mlp")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    models = args.models.split(",")
    for p in prepare(Path(args.cache), args.data, clients, models, args.seed):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
