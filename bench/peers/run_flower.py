"""Flower's runner: the flat FedAvg workload on Flower's Simulation Engine (Ray backend), written as a Flower user
writes it with the 1.42 Message API: a ``ClientApp`` whose ``train`` function loads the received arrays into the
shared model (``common.build_model``), runs exactly 10 local SGD steps (lr 0.05, batch 32) on its share of the
shared partition and replies with its arrays (float32, i.e. 32-bit uploads) and ``num-examples`` = 320 (the
examples it trained on: equal for every client, so the average is unweighted, as in the other two systems); a
``ServerApp`` that runs ``flwr.serverapp.strategy.FedAvg`` for the workload's rounds from the shared initial
weights, sampling ``per_round`` of the ``clients`` supernodes per round (``fraction_train``, ``min_train_nodes``)
and no federated evaluation (``fraction_evaluate=0``). ``flwr.simulation.run_simulation`` starts it (the Python
entry point of the same Simulation Engine that ``flwr run`` uses for a local simulation; Flower 1.42 marks it
deprecated in favour of the CLI).

Cores: Ray gets ``num_cpus=threads`` (``init_args``), every ClientApp asks for ``num_cpus=1``
(``client_resources``), so ``threads`` actors train clients concurrently, each with one torch intra-op thread
(``torch.set_num_threads(1)`` in the client; Ray also sets OMP_NUM_THREADS=1 for them). Ray's own processes
(GCS, raylet, the ServerApp in this process) run besides, on the same cores: the driver pins the whole process
tree to ``threads`` cores. On CUDA every actor asks for ``1/threads`` of the GPU.

Round times: the strategy's ``evaluate_fn`` is called before round 1 and after every round (server side); it
records ``time.time()`` each time and evaluates the global model on the test set only after the last round.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network from the benchmark
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    args = common.runner_args(__doc__.split("\n")[0])
    random.seed(args.seed)  # FedAvg draws each round's nodes with random.sample
    torch.set_num_threads(args.threads)
    device = common.check_device(args.device)
    clients, per_round, rounds = common.workload(args)

    import flwr
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    cache, model_name, seed, dev = str(Path(args.cache).resolve()), args.model, args.seed, str(device)
    part_path = str(common.partition_file(Path(cache), clients, seed))

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch.nn.functional as F

        state = common.cached_training_data(cache, part_path)  # once per actor process
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        torch.manual_seed(common.client_seed(seed, rnd, cid))  # dropout masks, reproducible per client and round
        idx = state["parts"][cid]
        order = idx[common.local_batches(common.client_rng(seed, rnd, cid), len(idx))]
        model = common.build_model(model_name)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=common.LR)
        x, y = state["x"], state["y"]
        loss_sum = 0.0
        for step in order:
            xb = common.normalise(x[step].to(dev))
            yb = y[step].to(dev)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": order.size, "train_loss": loss_sum / len(order),
                                     "local-steps": len(order)}),
        })
        return Message(content=content, reply_to=msg)

    stamps: list[float] = []
    final: dict[str, float] = {}
    seen: list[int] = []  # replies per round
    steps: list[float] = []  # mean local steps of the replies per round

    class CountingFedAvg(FedAvg):
        """FedAvg, noting how many clients replied per round (for the record; the aggregation is FedAvg's)."""

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [r for r in replies if not r.has_error()]
            seen.append(len(ok))
            steps.append(sum(float(r.content["metrics"]["local-steps"]) for r in ok) / max(1, len(ok)))
            return super().aggregate_train(server_round, replies)

    def on_round_end(server_round: int, arrays: ArrayRecord):
        stamps.append(time.time())
        if server_round == rounds:
            t0 = time.perf_counter()
            data = common.load_data(Path(cache))
            model = common.build_model(model_name)
            model.load_state_dict(arrays.to_torch_state_dict())
            acc, loss = common.evaluate(model.to(device), data["test_x"], data["test_y"], device)
            final.update(accuracy=acc, test_loss=loss, eval_s=time.perf_counter() - t0)
            return MetricRecord({"accuracy": acc, "loss": loss})
        return None

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        model = common.build_model(model_name)
        common.load_init(model, common.init_file(Path(cache), model_name, seed))
        strategy = CountingFedAvg(fraction_train=per_round / clients, fraction_evaluate=0.0,
                                  min_train_nodes=per_round, min_available_nodes=clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                       evaluate_fn=on_round_end)

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": (1.0 / args.threads) if device.type == "cuda" else 0.0},
        "init_args": {"num_cpus": args.threads, "num_gpus": 1 if device.type == "cuda" else 0,
                      "include_dashboard": False, "logging_level": "warning", "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config=backend_config)
    if "accuracy" not in final:
        raise SystemExit(f"flower: the simulation ended after {max(0, len(stamps) - 1)} of {rounds} rounds "
                         "(see the log above)")
    rec = common.make_record(
        args, system="flower", mode=f"ray: {args.threads} actor(s) x 1 thr", framework_version=flwr.__version__,
        processes=args.threads, threads_per_process=1, stamps=stamps, eval_s=final["eval_s"],
        accuracy=final["accuracy"], test_loss=final["test_loss"], device=device, ray_version=_ray_version(),
        clients_per_round_seen=seen, local_steps_per_client=sum(steps) / max(1, len(steps)))
    common.write_record(args.result, rec)


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
