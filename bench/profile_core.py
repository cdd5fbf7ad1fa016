"""Per-core profile of the flat workloads of ``bench/peers/`` (issue: faster than the peers, item 3): where the
time of one client-step goes at one thread, in this project and in a plain per-client PyTorch loop (the shape of
pfl-research's and Flower's simulation, without their frameworks).

Workload: the peers' LeNet (``bench/peers/common.py``, 21,840 parameters) or, with ``--model mlp``, the peers'
784-200-10 MLP (159,010 parameters), 100 clients, batch 32, plain SGD
lr 0.05, 10 local steps per client per round, 32-bit uploads; synthetic resident MNIST-shaped data (the time does
not depend on the pixel values). Every figure is milliseconds per client-step, the median over ``--rounds`` timed
rounds (1,000 client-steps each) after one untimed round, all in one process with ``--threads`` torch threads:

- ``plain fwd+bwd``: one ``nn.Module``, each client's 10 batches: forward, cross-entropy, ``autograd.grad``. The
  floor of a per-client loop: nothing but the client's own compute;
- ``plain SGD``: the same with the global model copied in per client, ``torch.optim.SGD`` steps and the clients'
  models summed into the average (what a per-client simulator must do at the least);
- ``engine <executor>``: :class:`~lightning_qmlhfl.simulation.engine.QMLHFLEngine` (flat [100], tau [10],
  ``Identity()``), split as in ``bench/profile_step.py``: batch gather, executor (forward and backward of all
  devices), device optimizer, aggregation, rest of ``local_step``;
- ``Trainer.fit``: the strategy as users run it (``QMLHFLStrategy`` + ``lightning.Trainer``, the default executor,
  no logger, no validation); its excess over the engine is Lightning's loop and the strategy's per-step work;
- LeNet: its second convolution alone across the 100 clients (:func:`conv_across_models`): per client, grouped,
  and im2col with a batched matmul;
- MLP: its two layers' forward and backward alone across the 100 clients (:func:`mlp_across_models`), per client
  and as batched matmuls: the floor of any executor that keeps PyTorch's GEMMs, stacked or not;
- the machine: a 1024^3 fp32 GEMM at the same threads (GFLOP/s), and the share of it each path reaches. FLOPs per
  client-step: LeNet 3x its forward (forward + the two backward products; autograd skips conv1's input gradient,
  so this counts a little high), MLP exactly what autograd computes (forward, both weight gradients, fc2's input
  gradient: 20.45 MFLOP).

Usage::

    python bench/profile_core.py                      # 1 thread, 3 timed rounds
    python bench/profile_core.py --threads 2 --profile  # plus a torch.profiler table of the engine's round
    python bench/profile_core.py --model mlp --executors vmap,loop
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))

CLIENTS, STEPS, BATCH, LR = 100, 10, 32, 0.05
# multiply-accumulates of one LeNet forward per sample: conv1 10x24x24x25, conv2 20x8x8x250, fc1 320x50, fc2 50x10
LENET_MACS = 10 * 24 * 24 * 25 + 20 * 8 * 8 * 250 + 320 * 50 + 50 * 10
# multiply-accumulates the MLP's training step computes per sample: forward, the weight gradients, fc2's input grad
MLP_MACS = 2 * (784 * 200 + 200 * 10) + 200 * 10
FLOP_PER_STEP = {"lenet": 3 * 2 * LENET_MACS * BATCH, "mlp": 2 * MLP_MACS * BATCH}  # per client-step


def _data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One round's batches: [steps, clients, batch, 1, 28, 28] and labels."""
    x = torch.randn(STEPS, CLIENTS, BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (STEPS, CLIENTS, BATCH), generator=g)
    return x, y


def _timed_rounds(run_round, rounds: int) -> list[float]:
    run_round()  # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run_round()
        out.append(time.perf_counter() - t0)
    return out


def plain(model_fn, x, y, rounds: int, sgd: bool) -> float:
    model = model_fn()
    params = list(model.parameters())
    global_state = [p.detach().clone() for p in params]

    def run_round() -> None:
        total = [torch.zeros_like(p) for p in params]
        for c in range(CLIENTS):
            if sgd:
                with torch.no_grad():
                    for p, g in zip(params, global_state):
                        p.copy_(g)
                opt = torch.optim.SGD(params, lr=LR)
            for s in range(STEPS):
                loss = F.cross_entropy(model(x[s, c]), y[s, c])
                if sgd:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                else:
                    torch.autograd.grad(loss, params)
            if sgd:
                with torch.no_grad():
                    for t, p in zip(total, params):
                        t.add_(p)
        if sgd:
            with torch.no_grad():
                for g, t in zip(global_state, total):
                    g.copy_(t / CLIENTS)

    return statistics.median(_timed_rounds(run_round, rounds)) / (CLIENTS * STEPS)


def engine_phases(model_fn, x, y, rounds: int, executor: str, profile: bool) -> tuple[dict[str, float], str]:
    from workloads import ce_loss  # bench/workloads.py
    from profile_step import Timer

    from lightning_qmlhfl import Hierarchy, Identity
    from lightning_qmlhfl.simulation.engine import QMLHFLEngine

    torch.manual_seed(0)
    engine = QMLHFLEngine(model_fn(), ce_loss, Hierarchy.balanced([CLIENTS]), [STEPS], [Identity()],
                          optimizer="sgd", optimizer_kwargs={"lr": LR}, executor=executor, seed=0)
    name = engine.executor_name  # before the executor is wrapped
    timer = Timer()
    timer.wrap(engine, "executor", "executor")
    timer.wrap(engine.optimizer, "step", "optimizer")
    timer.wrap(engine, "_aggregate", "aggregate")
    g = torch.Generator().manual_seed(2)
    pool_x, pool_y = x.reshape(-1, 1, 28, 28), y.reshape(-1)

    def run_round() -> None:
        for s in range(STEPS):
            with timer("gather"):  # as the strategy does: each device's batch gathered from its resident share
                idx = torch.randint(0, pool_x.shape[0], (CLIENTS, BATCH), generator=g)
                batch = (pool_x[idx], pool_y[idx])
            with timer("local_step"):
                engine.local_step(batch)

    per_round = []
    run_round()
    timer.totals.clear()
    for _ in range(rounds):
        before = dict(timer.totals)
        run_round()
        per_round.append({k: v - before.get(k, 0.0) for k, v in timer.totals.items()})
    steps = CLIENTS * STEPS
    med = {k: 1e3 * statistics.median(r[k] for r in per_round) / steps for k in per_round[0]}
    med["other"] = med["local_step"] - med["executor"] - med["optimizer"] - med["aggregate"]
    med["total"] = med["local_step"] + med["gather"]
    table = ""
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_round()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return med, name + ("\n" + table if table else "")


def fit(model_fn, rounds: int) -> tuple[float, str]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_qmlhfl import IID, Hierarchy, Identity, QMLHFLStrategy

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model_fn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.rounds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.rounds.append(time.perf_counter() - self.t0)

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(60_000, 1, 28, 28, generator=g), torch.randint(0, 10, (60_000,), generator=g))
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([CLIENTS]), taus=[STEPS], compressors=[Identity()],
                              partition=IID(), seed=0, device="cpu")
    clock = Clock()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_epochs=1 + rounds, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(Module(), DataLoader(data, batch_size=BATCH, shuffle=True))
    return 1e3 * statistics.median(clock.rounds[1:]) / (CLIENTS * STEPS), strategy.engine.executor_name


def conv_across_models(repeats: int = 5) -> list[tuple[str, float]]:
    """LeNet's second convolution (10 -> 20 channels, 5x5, on 12x12 inputs, batch 32) for all 100 clients, forward
    and backward (input and weight gradients), three ways: one ``conv2d`` per client (the loop executor and a
    per-client simulator), one grouped ``conv2d`` over the clients stacked along the channels (what ``torch.func.vmap``
    makes of a batched weight), and im2col (``unfold``) with one batched matmul. ms per client."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(CLIENTS, BATCH, 10, 12, 12, generator=g)
    w = torch.randn(CLIENTS, 20, 10, 5, 5, generator=g)
    gy = torch.randn(CLIENTS, BATCH, 20, 8, 8, generator=g)

    def per_client() -> None:
        for c in range(CLIENTS):
            xc, wc = x[c].requires_grad_(), w[c].requires_grad_()
            torch.autograd.backward(F.conv2d(xc, wc), gy[c])

    def grouped() -> None:
        xs = x.transpose(0, 1).reshape(BATCH, CLIENTS * 10, 12, 12).requires_grad_()
        ws = w.reshape(CLIENTS * 20, 10, 5, 5).requires_grad_()
        out = F.conv2d(xs, ws, groups=CLIENTS)
        torch.autograd.backward(out, gy.transpose(0, 1).reshape(BATCH, CLIENTS * 20, 8, 8))

    def im2col() -> None:
        xs = x.reshape(CLIENTS * BATCH, 10, 12, 12).requires_grad_()
        ws = w.reshape(CLIENTS, 20, 250).requires_grad_()
        cols = F.unfold(xs, 5).reshape(CLIENTS, BATCH, 250, 64).transpose(1, 2).reshape(CLIENTS, 250, BATCH * 64)
        out = torch.bmm(ws, cols)  # [clients, 20, batch * 64]
        torch.autograd.backward(out, gy.permute(0, 2, 1, 3, 4).reshape(CLIENTS, 20, BATCH * 64))

    return _time_forms((("one conv2d per client", per_client), ("grouped conv2d (vmap's form)", grouped),
                        ("unfold + bmm", im2col)), repeats)


def mlp_forms(clients: int = CLIENTS):
    """The MLP's two layers (784 -> 200, ReLU, 200 -> 10, batch 32) for ``clients`` clients, forward and backward
    (what autograd computes: weight and bias gradients, fc2's input gradient), without loss or optimizer, two ways:
    one ``F.linear`` per client and layer (a per-client simulator), and one ``baddbmm`` per layer over the clients'
    stacked weights (the stacked executors' form). Each returns the gradients, stacked [clients, ...]."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(clients, BATCH, 784, generator=g)
    w1, b1 = torch.randn(clients, 200, 784, generator=g) * 0.03, torch.randn(clients, 1, 200, generator=g)
    w2, b2 = torch.randn(clients, 10, 200, generator=g) * 0.07, torch.randn(clients, 1, 10, generator=g)
    gy = torch.randn(clients, BATCH, 10, generator=g)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    # each client's own leaves, so that its gradients are its own tensors (not scattered into the stacks')
    leaves = [[t[c].detach().clone().requires_grad_() for t in (w1, b1, w2, b2)] for c in range(clients)]

    def per_client() -> list[torch.Tensor]:
        grads = []
        for c, (cw1, cb1, cw2, cb2) in enumerate(leaves):
            out = F.linear(F.relu(F.linear(x[c], cw1, cb1[0])), cw2, cb2[0])
            grads.append(torch.autograd.grad(out, leaves[c], gy[c]))
        return [torch.stack(gs) for gs in zip(*grads)]

    def batched() -> list[torch.Tensor]:
        h = F.relu(torch.baddbmm(b1, x, w1.transpose(1, 2)))
        out = torch.baddbmm(b2, h, w2.transpose(1, 2))
        return list(torch.autograd.grad(out, params, gy))

    return per_client, batched


def mlp_across_models(repeats: int = 5) -> list[tuple[str, float]]:
    """:func:`mlp_forms` timed across the 100 clients (the per-client form includes stacking its gradients, one
    copy of 0.6 MB a client). ms per client."""
    per_client, batched = mlp_forms()
    return _time_forms((("one F.linear per client and layer", per_client), ("one baddbmm per layer (stacked)",
                                                                               batched)), repeats)


def _time_forms(forms, repeats: int) -> list[tuple[str, float]]:
    """(name, ms per client) of each form: the median of ``repeats`` timed calls after one untimed one."""
    return [(name, 1e3 * statistics.median(_timed_rounds(fn, repeats)) / CLIENTS) for name, fn in forms]


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lenet", choices=sorted(FLOP_PER_STEP))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of 1,000 client-steps per path")
    ap.add_argument("--executors", default="loop,vmap")
    ap.add_argument("--no-fit", action="store_true", help="leave out the Trainer.fit path")
    ap.add_argument("--profile", action="store_true", help="a torch.profiler table of one engine round")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        raise SystemExit(f"--threads and --rounds must be >= 1, got {args.threads} and {args.rounds}")
    torch.set_num_threads(args.threads)
    import common  # bench/peers/common.py: the peers' models

    def model_fn():
        torch.manual_seed(0)
        return common.build_model(args.model)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} "
          f"thread(s), load average at start {os.getloadavg()[0]:.2f}")
    print(f"command: python bench/profile_core.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    peak = gemm_gflops()
    x, y = _data(torch.Generator().manual_seed(1))
    rows: list[tuple[str, float, str]] = []
    rows.append(("plain fwd+bwd (per-client loop)", 1e3 * plain(model_fn, x, y, args.rounds, sgd=False), ""))
    rows.append(("plain SGD (per-client loop)", 1e3 * plain(model_fn, x, y, args.rounds, sgd=True), ""))
    phases = {}
    for ex in [e for e in args.executors.split(",") if e]:
        med, name = engine_phases(model_fn, x, y, args.rounds, ex, args.profile)
        phases[ex] = med
        split = ", ".join(f"{k} {med[k]:.3f}" for k in ("gather", "executor", "optimizer", "aggregate", "other"))
        rows.append((f"engine, {ex} executor", med["total"], split))
        if args.profile:
            print(f"\nengine, {ex} executor ({name.splitlines()[0]}): torch.profiler, one round\n"
                  + "\n".join(name.splitlines()[1:]))
    if not args.no_fit:
        ms, name = fit(model_fn, args.rounds)
        rows.append((f"Trainer.fit + QMLHFLStrategy ({name})", ms, ""))
    flop = FLOP_PER_STEP[args.model]
    print(f"\nfp32 GEMM 1024^3: {peak:.1f} GFLOP/s; {args.model} client-step (batch {BATCH}): "
          f"{flop / 1e6:.2f} MFLOP{' (3x forward)' if args.model == 'lenet' else ''}\n")
    if args.model == "lenet":
        part, part_flop, forms = "LeNet's conv2", 3 * 2 * 20 * 8 * 8 * 250 * BATCH, conv_across_models()
    else:
        part, part_flop, forms = "The MLP's two layers", flop, mlp_across_models()
    print(f"{part} across the 100 clients, forward + backward:\n")
    print("| form | ms per client | GFLOP/s | % of GEMM |\n|---|---:|---:|---:|")
    for name, ms in forms:
        gf = part_flop / (ms * 1e-3) / 1e9
        print(f"| {name} | {ms:.3f} | {gf:.1f} | {100 * gf / peak:.0f} |")
    print()
    print("| path | ms per client-step | client-steps/s | GFLOP/s | % of GEMM | split (ms) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, ms, split in rows:
        gf = flop / (ms * 1e-3) / 1e9
        print(f"| {name} | {ms:.3f} | {1e3 / ms:,.0f} | {gf:.1f} | {100 * gf / peak:.0f} | {split} |")


if __name__ == "__main__":
    main()
