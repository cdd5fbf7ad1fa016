"""This project's runner: the flat FedAvg workload through the Lightning strategy, as a user runs it.

``lightning.Trainer(strategy=QMLHFLStrategy(hierarchy=Hierarchy.balanced([C]), taus=[10], compressors=[Identity()],
partition=<the shared partition>, participation=...))`` with a LightningModule around the shared model
(``common.build_model``) loaded with the shared initial weights: one aggregation layer (the cloud and its C
devices), 10 local SGD steps (lr 0.05, batch 32) per round, 32-bit uploads, plain averaging of the participants
(``Full()`` for 100 of 100; ``UniformK(50, weighting="normalized")`` for 50 of 1,000: exactly 50 devices drawn
uniformly without replacement every round, their models averaged with equal weights, as FedAvg in Flower and
pfl with equal local work). No validation during training; the final cloud model is evaluated on the 10,000 test
images by ``common.evaluate``. The training set is the 60,000 MNIST images, normalised, in a TensorDataset; the
strategy reads it once into tensors and every device draws its batches from its own share (its DeviceSampler).

Threads: ``torch.set_num_threads(threads)`` before the project is imported (so numba's pool has the same size);
the loop executor (chosen by ``executor="auto"`` for LeNet on CPU) runs ``min(2, threads)`` worker threads that
share those intra-op threads, with ``--forwards`` (``forwards=``, default ordered: the forwards in device order;
concurrent: each worker on its own module copy, no worker waiting for another, with ``device_rng="stream"`` so
that every client's dropout masks come from its own stream); the MLP runs under vmap. One process.

Round times: a callback records ``time.time()`` at the start of the first epoch (one epoch = one global round)
and at the end of every epoch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository root

import common  # noqa: E402  (first: it notes the process start)
import torch  # noqa: E402


def main() -> None:
    args = common.runner_args(__doc__.split("\n")[0], [("--executor", {"default": "auto"}),
                                                        ("--forwards", {"default": "ordered"})])
    torch.set_num_threads(args.threads)
    device = common.check_device(args.device)

    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_qmlhfl
    from lightning_qmlhfl import Full, Hierarchy, Identity, QMLHFLStrategy, UniformK
    from lightning_qmlhfl.data.partition import Partitioner

    clients, per_round, rounds = common.workload(args)
    cache = Path(args.cache)
    data = common.load_data(cache)
    parts = common.load_partition(common.partition_file(cache, clients, args.seed))

    class SharedPartition(Partitioner):
        """The partition file's split, whatever the seed (the file was drawn once for all three systems)."""

        needs_labels = False

        def __init__(self, parts: list) -> None:
            self.parts = [torch.from_numpy(p) for p in parts]

        def __call__(self, labels, hierarchy, seed=0, num_samples=None):
            if hierarchy.num_devices != len(self.parts):
                raise ValueError(f"the partition has {len(self.parts)} clients, the hierarchy "
                                 f"{hierarchy.num_devices} devices")
            return [p.clone() for p in self.parts]

        def _split(self, labels, index, parts, g):  # pragma: no cover - __call__ is overridden
            raise NotImplementedError

        def __repr__(self) -> str:
            return f"SharedPartition({len(self.parts)} clients)"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = common.build_model(args.model)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=common.LR)

    class RoundClock(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            if not self.stamps:
                self.stamps.append(time.time())

        def on_train_epoch_end(self, trainer, module) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.time())

    module = Module()
    common.load_init(module.net, common.init_file(cache, args.model, args.seed))
    train = TensorDataset(common.normalise(torch.from_numpy(data["train_x"])), torch.from_numpy(data["train_y"]))
    loader = DataLoader(train, batch_size=common.BATCH, shuffle=True)
    participation = Full() if per_round == clients else UniformK(per_round, weighting="normalized")
    strategy = QMLHFLStrategy(
        hierarchy=Hierarchy.balanced([clients]), taus=[common.LOCAL_STEPS], compressors=[Identity()],
        partition=SharedPartition(parts), participation=[participation], seed=args.seed, executor=args.executor,
        forwards=args.forwards, device_rng="stream" if args.forwards == "concurrent" else "global", device=device)
    clock = RoundClock()
    trainer = L.Trainer(
        strategy=strategy, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=rounds,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    acc, loss = common.evaluate(module.net.to(device), data["test_x"], data["test_y"], device)
    eval_s = time.perf_counter() - t0
    hist = strategy.history
    seen = [int(h["participants_layer1"]) for h in hist]
    n_params = sum(p.numel() for p in module.net.parameters())
    bits = [h["bits_round_layer1"] / max(1, c) / n_params for h, c in zip(hist, seen)]
    rec = common.make_record(
        args, system="qmlhfl", mode=f"1 proc x {args.threads} thr", framework_version=lightning_qmlhfl.__version__
        if hasattr(lightning_qmlhfl, "__version__") else "checkout", processes=1, threads_per_process=args.threads,
        stamps=clock.stamps, eval_s=eval_s, accuracy=acc, test_loss=loss, device=device,
        executor=strategy.engine.executor_name, forwards=args.forwards, lightning_version=L.__version__,
        clients_per_round_seen=seen,
        local_steps_per_client=trainer.global_step / rounds, upload_bits_per_parameter=max(bits),
        cuda_max_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)
    common.write_record(args.result, rec)


if __name__ == "__main__":
    main()
