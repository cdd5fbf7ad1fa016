"""pfl-research's runner: the flat FedAvg workload in pfl's simulation with its PyTorch backend, written as a pfl user
writes it: ``FederatedAveraging`` run by ``SimulatedBackend`` over a ``FederatedDataset`` whose users are the shared
partition's clients; a ``PyTorchModel`` around the shared model (``common.build_model`` with the ``loss`` and
``metrics`` methods pfl asks for), local SGD (lr 0.05, ``local_batch_size=32``, ``local_num_steps=10``), a central
SGD with lr 1.0 on the averaged model difference (= FedAvg), every user weighted 1 (pfl's default: an unweighted
average, as in the other two systems), 32-bit statistics, no privacy or postprocessing.

What it takes to get exactly 10 steps per user: pfl stops local training after ``local_num_steps`` batches *or* at
the end of the user's data, whichever comes first, so a user holding fewer than 320 samples would train fewer
steps. Each user's dataset for a round is therefore its 10 batches of 32 drawn by ``common.local_batches`` (the
same rule and the same random keys as the Flower client: round r, client c), built in ``make_dataset_fn``.
The cohort: ``per_round`` distinct users drawn uniformly without replacement every round (a user sampler that draws
one cohort at a time; pfl's ``random`` sampler draws with replacement). Evaluation only at the end:
``FederatedAveraging`` evaluates every user before and after local training in round 0 whatever
``evaluation_frequency`` is, so the algorithm clears ``do_evaluation`` of its central contexts (a small subclass);
the final model is evaluated on the 10,000 test images by ``common.evaluate``.

Cores: ``--workers 1`` (default): one process with ``torch.set_num_threads(threads)``. ``--workers W``: pfl's
multi-worker simulation, W processes started by ``torchrun --standalone --nproc_per_node=W`` (torch.distributed over
gloo on CPU, NCCL on CUDA), each simulating its share of the cohort with ``threads`` intra-op threads; the
statistics are all-reduced. Rank 0 records and evaluates.

Round times: a pfl callback records ``time.time()`` at ``on_train_begin`` and after every central iteration.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    args = common.runner_args(__doc__.split("\n")[0],
                              [("--workers", {"type": int, "default": 1,
                                              "help": "processes (>1: run under torchrun, pfl's multi-worker mode)"})])
    torch.set_num_threads(args.threads)
    device = common.check_device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("PFL_PYTORCH_DEVICE", str(device))
    else:
        os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")
    clients, per_round, rounds = common.workload(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.workers:
        raise SystemExit(f"--workers {args.workers} but WORLD_SIZE={world}: start W > 1 workers with torchrun")
    if per_round % args.workers:
        raise SystemExit(f"--workers {args.workers}: the cohort of {per_round} must split evenly over the workers "
                         "(every worker draws the same cohort and keeps its share)")

    import pfl
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_framework_module
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    rank = get_framework_module().distributed.global_rank
    cache = Path(args.cache)
    data = common.load_data(cache)
    parts = common.load_partition(common.partition_file(cache, clients, args.seed))
    x_all = common.normalise(torch.from_numpy(data["train_x"])).to(device)
    y_all = torch.from_numpy(data["train_y"]).to(device)
    current = {"round": 1}  # Flower's numbering: the first round is 1
    counts = {"loss_calls": 0, "users": 0}  # this process's local steps and users trained

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = common.build_model(args.model)

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y):
            counts["loss_calls"] += 1
            self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y):
            self.eval()
            logits = self(x)
            n = len(y)
            return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), n),
                    "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}

    def make_dataset(user_id: int) -> Dataset:
        counts["users"] += 1
        idx = parts[user_id]
        order = idx[common.local_batches(common.client_rng(args.seed, current["round"], user_id), len(idx))]
        sel = torch.from_numpy(order.reshape(-1)).to(device)
        return Dataset(raw_data=[x_all[sel], y_all[sel]], user_id=user_id)

    class CohortSampler:
        """``per_round`` distinct users per round, uniformly without replacement (own generator, the same on
        every worker)."""

        def __init__(self) -> None:
            self.rng = np.random.default_rng([args.seed, 7])
            self.queue: list[int] = []

        def __call__(self) -> int:
            if not self.queue:
                self.queue = self.rng.choice(clients, size=per_round, replace=False).tolist()
            return self.queue.pop(0)

    class FedAvgFinalEvalOnly(FederatedAveraging):
        def get_next_central_contexts(self, *a, **kw):
            contexts, model, metrics = super().get_next_central_contexts(*a, **kw)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    class RoundClock(TrainingProcessCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.seen: list[int] = []

        def on_train_begin(self, *, model):
            self.stamps.append(time.time())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.time())
            current["round"] = central_iteration + 2
            devices = [v for k, v in aggregate_metrics.to_simple_dict().items() if "number of devices" in k]
            self.seen.append(int(round(devices[0])) if devices else -1)
            return False, Metrics()

    net = Net()
    common.load_init(net.net, common.init_file(cache, args.model, args.seed))
    net = net.to(device)
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    training = FederatedDataset(make_dataset_fn=make_dataset, user_sampler=CohortSampler())
    backend = SimulatedBackend(training_data=training, val_data=None, postprocessors=[])
    clock = RoundClock()
    FedAvgFinalEvalOnly().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds,
                                           train_cohort_size=per_round, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=common.LR, local_num_epochs=None,
                                              local_num_steps=common.LOCAL_STEPS, local_batch_size=common.BATCH),
        model_eval_params=NNEvalHyperParams(local_batch_size=common.EVAL_BATCH), callbacks=[clock])
    if rank != 0:
        return
    t0 = time.perf_counter()
    acc, loss = common.evaluate(net.net, data["test_x"], data["test_y"], device)
    eval_s = time.perf_counter() - t0
    mode = (f"1 proc x {args.threads} thr" if args.workers == 1
            else f"{args.workers} procs (torchrun) x {args.threads} thr")
    rec = common.make_record(
        args, system="pfl", mode=mode, framework_version=getattr(pfl, "__version__", _dist_version("pfl")),
        processes=args.workers, threads_per_process=args.threads, stamps=clock.stamps, eval_s=eval_s,
        accuracy=acc, test_loss=loss, device=device, workers=args.workers, clients_per_round_seen=clock.seen,
        local_steps_per_client=counts["loss_calls"] / max(1, counts["users"]),
        cuda_max_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)
    common.write_record(args.result, rec)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
