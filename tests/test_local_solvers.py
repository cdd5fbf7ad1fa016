"""FedProx, SCAFFOLD and ADMM at any layer (docs/algorithm.md#local-solvers) against a plain per-node loop: one
nn.Module and one torch SGD per device, one flat vector per node and per piece of solver state, the equations of
the algorithm page written out one node at a time. Who trains and who uploads is recorded from the engine's
population (its draws are tested elsewhere) and replayed by the reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.compressors import QSGD, Identity, upload_bits
from lightning_qmlhfl.config import SimulationConfig
from lightning_qmlhfl.federation.participation import Bernoulli, Full
from lightning_qmlhfl.optimizers.local_solvers import (ADMM, FedProx, LocalSGD, Scaffold, layer_local_solvers,
                                                       make_local_solver)
from lightning_qmlhfl.simulation.engine import QMLHFLEngine

TREE = Hierarchy.from_parents([[0, 0, 0, 1, 2, 2], [0, 0, 1], [0, 0]])  # irregular: 6 devices, 3 edges, 2, cloud
TAUS = [2, 2, 1]
LR = 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def loss_fn(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def batches(devices: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # non-IID: each device its own input shift and label bias
    shift = torch.randn(devices, 1, 5, generator=g) * 2
    out = []
    for _ in range(steps):
        x = torch.randn(devices, 4, 5, generator=g) + shift
        y = (torch.arange(devices).view(-1, 1) + torch.randint(0, 2, (devices, 4), generator=g)) % 3
        out.append((x, y))
    return out


class Recorder:
    """Who trained in each step and who uploaded (with which weights) in each aggregation, as the engine drew it."""

    def __init__(self, engine: QMLHFLEngine) -> None:
        self.active, self.aggs = [], []
        pop = engine.population
        begin, aggregate = pop.begin_step, pop.aggregate

        def rec_begin(*a, **k):
            out = begin(*a, **k)
            self.active.append(None if out is None else out.clone())
            return out

        def rec_aggregate(n, *a, **k):
            uploads, w, received = aggregate(n, *a, **k)
            self.aggs.append((n, None if uploads is None else uploads.clone(), w.clone()))
            return uploads, w, received

        pop.begin_step, pop.aggregate = rec_begin, rec_aggregate


class Reference:
    """The solvers' equations node by node (docs/algorithm.md#local-solvers)."""

    def __init__(self, template: nn.Module, hierarchy: Hierarchy, taus, solvers, lr: float) -> None:
        self.h, self.taus, self.solvers, self.lr = hierarchy, list(taus), list(solvers), lr
        self.N = hierarchy.num_layers
        self.models = [copy.deepcopy(template) for _ in range(hierarchy.num_devices)]
        v0 = parameters_to_vector(template.parameters()).detach().clone()
        self.v = [[v0.clone() for _ in range(k)] for k in hierarchy.nodes_per_layer]  # v[0] unused (models)
        self.parents = [list(hierarchy.parents[m]) for m in range(self.N)]
        mass = [[1.0] * hierarchy.num_devices]
        for m in range(self.N):
            up = [0.0] * hierarchy.nodes_per_layer[m + 1]
            for i, p in enumerate(self.parents[m]):
                up[p] += mass[m][i]
            mass.append(up)
        self.tree_w = [[mass[m][i] / mass[m + 1][p] for i, p in enumerate(self.parents[m])] for m in range(self.N)]
        z = torch.zeros_like(v0)
        self.c_child = [[z.clone() for _ in range(hierarchy.nodes_per_layer[n - 1])] for n in range(1, self.N + 1)]
        self.c_parent = [[z.clone() for _ in range(hierarchy.nodes_per_layer[n])] for n in range(1, self.N + 1)]
        self.dual = [[z.clone() for _ in range(hierarchy.nodes_per_layer[n - 1])] for n in range(1, self.N + 1)]
        self.aug = [[v0.clone() for _ in range(hierarchy.nodes_per_layer[n - 1])] for n in range(1, self.N + 1)]
        self.consensus = [[v0.clone() for _ in range(k)] for k in hierarchy.nodes_per_layer]
        self.lr_since = [0.0] * self.N
        self.dev_lr = [0.0] * hierarchy.num_devices
        self.period = [math.prod(taus[:n]) for n in range(1, self.N + 1)]
        self.k = 0

    def model_vec(self, i: int) -> torch.Tensor:
        return parameters_to_vector(self.models[i].parameters()).detach().clone()

    def row(self, m: int, i: int) -> torch.Tensor:
        return self.model_vec(i) if m == 0 else self.v[m][i]

    def set_row(self, m: int, i: int, value: torch.Tensor) -> None:
        if m == 0:
            with torch.no_grad():
                vector_to_parameters(value.clone(), self.models[i].parameters())
        else:
            self.v[m][i] = value.clone()

    def step(self, batch, active, aggs) -> None:
        x, y = batch
        devices = range(self.h.num_devices) if active is None else active.tolist()
        for i in devices:
            model = self.models[i]
            model.zero_grad()
            loss_fn(model, (x[i], y[i])).backward()
            g = parameters_to_vector([p.grad for p in model.parameters()])
            w = self.model_vec(i)
            for n, solver in enumerate(self.solvers, start=1):  # layer n: the device's ancestors c (n-1), p (n)
                c, p = self.ancestor(i, n - 1), self.ancestor(i, n)
                a = self.v[n][p]
                if isinstance(solver, FedProx):
                    g = g + solver.mu * (w - a)
                elif isinstance(solver, Scaffold):
                    g = g + self.c_parent[n - 1][p] - self.c_child[n - 1][c]
                elif isinstance(solver, ADMM) and not (n > 1 and isinstance(self.solvers[n - 2], ADMM)):
                    g = g + self.dual[n - 1][c] + solver.rho * (w - a)  # (over ADMM: in the consensus update)
            self.set_row(0, i, w - self.lr * g)
            self.dev_lr[i] += self.lr
        self.lr_since = [t + self.lr for t in self.lr_since]
        self.k += 1
        for n in range(1, self.N + 1):
            if self.k % self.period[n - 1]:
                break
            self.aggregate(n, *aggs.pop(0)[1:])

    def aggregate(self, n: int, uploads, w) -> None:
        children = range(self.h.nodes_per_layer[n - 1]) if uploads is None else uploads.tolist()
        solver = self.solvers[n - 1]
        pidx = self.parents[n - 1]
        new = [v.clone() for v in self.v[n]]
        received = set()
        variate_sum = [torch.zeros_like(v) for v in self.v[n]]
        for c in children:
            p = pidx[c]
            y, a = self.row(n - 1, c), self.v[n][p]
            weight = float(w[c])
            upload = y - a
            if isinstance(solver, Scaffold):
                S = self.dev_lr[c] if n == 1 else self.lr_since[n - 1]
                c_new = self.c_child[n - 1][c] - self.c_parent[n - 1][p] + (a - y) / S
                variate_sum[p] += self.tree_w[n - 1][c] * (c_new - self.c_child[n - 1][c])
                self.c_child[n - 1][c] = c_new
            elif isinstance(solver, ADMM):
                self.dual[n - 1][c] = self.dual[n - 1][c] + solver.rho * (y - a)
                u = y + self.dual[n - 1][c] / solver.rho
                upload, self.aug[n - 1][c] = u - self.aug[n - 1][c], u
                weight = self.tree_w[n - 1][c]
            new[p] = new[p] + weight * upload
            received.add(p)
        for p in range(len(new)):
            self.c_parent[n - 1][p] = self.c_parent[n - 1][p] + variate_sum[p]
            above = self.solvers[n] if n < self.N else None
            if isinstance(solver, ADMM) and isinstance(above, ADMM):  # multi-block ADMM: p's consensus update
                self.consensus[n][p] = self.consensus[n][p] + new[p] - self.v[n][p]
                if p in received:
                    a, lam = self.v[n + 1][self.parents[n][p]], self.dual[n][p]
                    new[p] = (solver.rho * self.consensus[n][p] + above.rho * a - lam) / (solver.rho + above.rho)
            self.v[n][p] = new[p]
        self.resync(n)
        self.lr_since[n - 1] = 0.0
        if n == 1:
            self.dev_lr = [0.0] * self.h.num_devices

    def ancestor(self, i: int, n: int, m: int = 0) -> int:
        """The layer-n ancestor of row i of layer m."""
        for k in range(m, n):
            i = self.parents[k][i]
        return i

    def resync(self, n: int) -> None:
        for m in range(n - 1, -1, -1):  # every row below takes its layer-n ancestor's model
            for i in range(self.h.nodes_per_layer[m]):
                self.set_row(m, i, self.v[n][self.ancestor(i, n, m)])


def run_engine(solvers, participation, executor="vmap", rounds=2, compressors=None, seed=3, steps=None):
    torch.manual_seed(0)
    template = Net().double()
    config = SimulationConfig.build(TREE, TAUS, compressors or [Identity()] * 3, participation=participation,
                                    local_solvers=solvers, executor=executor, seed=seed, param_order="module")
    engine = QMLHFLEngine(copy.deepcopy(template), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR},
                          config=config)
    rec = Recorder(engine)
    data = batches(TREE.num_devices, steps or math.prod(TAUS) * rounds)
    for b in data:
        engine.local_step(tuple(t.double() if t.is_floating_point() else t for t in b))
    return engine, rec, template, data


SOLVERS = {
    "fedprox": FedProx(0.3),
    "scaffold": Scaffold("full"),
    "admm": ADMM(0.5),
}


@pytest.mark.parametrize("where", ["devices", "every_layer", "upper_only"])
@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_engine_matches_the_per_node_reference(name, where, executor):
    s = SOLVERS[name]
    solvers = {"devices": [s, None, None], "every_layer": [s, s, s], "upper_only": [None, s, s]}[where]
    participation = [Bernoulli(0.7), Full(), Bernoulli(0.8)]
    engine, rec, template, data = run_engine(solvers, participation, executor)
    ref = Reference(template, TREE, TAUS, [make_local_solver(x) for x in solvers], LR)
    aggs = list(rec.aggs)
    for b, active in zip(data, rec.active):
        ref.step(tuple(t.double() if t.is_floating_point() else t for t in b), active, aggs)
    assert not aggs
    assert engine.round == 2
    tol = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(engine.device_params(), torch.stack([ref.model_vec(i) for i in range(6)]), **tol)
    for m in range(1, 4):
        torch.testing.assert_close(engine.state.params[m], torch.stack(ref.v[m]), **tol)
    state = engine.registry.state_dict()
    for n, solver in enumerate(engine.config.local_solvers, start=1):
        if isinstance(solver, Scaffold):
            torch.testing.assert_close(state[f"solver/{n}/variate_children"], torch.stack(ref.c_child[n - 1]), **tol)
            torch.testing.assert_close(state[f"solver/{n}/variate_parents"], torch.stack(ref.c_parent[n - 1]), **tol)
        if isinstance(solver, ADMM):
            torch.testing.assert_close(state[f"solver/{n}/dual"], torch.stack(ref.dual[n - 1]), **tol)
            torch.testing.assert_close(state[f"solver/{n}/augmented"], torch.stack(ref.aug[n - 1]), **tol)
    # the drift of every layer with a solver is in the round statistics
    stats = engine.last_round_stats
    for n, solver in enumerate(engine.config.local_solvers, start=1):
        assert (f"drift_layer{n}" in stats) == (not isinstance(solver, LocalSGD))


@pytest.mark.parametrize("off", [FedProx(0.0), LocalSGD(), LocalSGD(drift=True), None])
def test_switched_off_is_todays_run_bit_for_bit(off):
    qs = [QSGD(4, bucket_size=None, error_feedback="ef"), QSGD(8), Identity()]
    participation = [Bernoulli(0.7), Full(), Full()]
    base, _, _, _ = run_engine(None, participation, compressors=qs)
    other, _, _, _ = run_engine([off] * 3, participation, compressors=qs)
    for a, b in zip(base.state.params, other.state.params):
        assert torch.equal(a, b)


def test_scaffold_doubles_the_bits_or_adds_32_bit_variates():
    qs = [QSGD(4), QSGD(8), Identity()]
    P = sum(p.numel() for p in Net().parameters())
    for variates, extra in (("compressed", [q.bits(P) for q in qs]), ("full", [32 * P] * 3)):
        engine, _, _, _ = run_engine([Scaffold(variates)] * 3, [Full()] * 3, compressors=qs, rounds=1)
        for n in range(1, 4):
            assert engine.upload_bits(n) == upload_bits(qs[n - 1], P) + extra[n - 1]
            assert engine.upload_bits(n) == upload_bits(qs[n - 1], P, local_solver=engine.config.local_solvers[n - 1])
        uploads = [12, 3, 2]  # layer 1 aggregates tau_2 * tau_3 = 2 times a round
        assert engine.bits_sent == [u * engine.upload_bits(n) for n, u in enumerate(uploads, start=1)]


def test_compressed_variates_use_the_layer_compressor_and_their_own_draws():
    """With QSGD on the uploads, the parents' variates move by a sum of quantized deltas, which differs from the
    sum of the 32-bit deltas of variates="full"."""
    engine, _, _, _ = run_engine([Scaffold("compressed"), None, None], [Full()] * 3,
                                 compressors=[QSGD(2, bucket_size=None), Identity(), Identity()], rounds=1,
                                 steps=2)
    c = engine.registry.state_dict()["solver/1/variate_parents"]
    assert torch.count_nonzero(c) > 0
    full, _, _, _ = run_engine([Scaffold("full"), None, None], [Full()] * 3,
                               compressors=[QSGD(2, bucket_size=None), Identity(), Identity()], rounds=1, steps=2)
    assert not torch.allclose(c, full.registry.state_dict()["solver/1/variate_parents"])


def quadratic_run(solver, rounds, lr=0.05, seed=0, iid=False):
    """Least squares split over 8 devices in 2 edges: device i holds (A_i, b_i); the weighted optimum is known.
    Non-IID: each device's rows shifted and its targets offset; IID: every device's drawn alike."""
    g = torch.Generator().manual_seed(seed)
    h = Hierarchy.balanced([4, 2])
    D, d = h.num_devices, 4
    A = torch.randn(D, 12, d, generator=g, dtype=torch.float64)
    b = torch.randn(D, 12, generator=g, dtype=torch.float64) * 2
    if not iid:
        A, b = A + torch.linspace(-1, 1, D).view(D, 1, 1), b + torch.arange(D).view(D, 1)
    lin = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(lin.weight)

    def lsq(module, batch):
        a, y = batch
        return 0.5 * ((module(a).squeeze(-1) - y) ** 2).mean()

    config = SimulationConfig.build(h, [5, 2], [Identity()] * 2, local_solvers=solver, executor="vmap",
                                    param_order="module")
    engine = QMLHFLEngine(lin, lsq, optimizer="sgd", optimizer_kwargs={"lr": lr}, config=config)
    errors = []
    # the optimum of (1/D) sum_i F_i: sum_i A_i^T (A_i w - b_i) / 12 = 0
    H = sum(A[i].T @ A[i] for i in range(D))
    w_star = torch.linalg.solve(H, sum(A[i].T @ b[i] for i in range(D)))
    for _ in range(rounds):
        for _ in range(engine.steps_per_round):
            engine.local_step((A, b))
        errors.append(float(torch.linalg.vector_norm(engine.cloud_params() - w_star)))
    return errors


def test_admm_fixed_point_is_the_global_optimum():
    errors = quadratic_run([ADMM(0.5), None], rounds=400)
    assert errors[-1] < 1e-5, errors[-1]
    fedavg = quadratic_run(None, rounds=400)
    assert fedavg[-1] > 1e-3  # local SGD's fixed point is biased by the heterogeneity: ADMM's correction is real


def test_admm_at_every_layer_reaches_the_optimum_too():
    errors = quadratic_run([ADMM(0.5), ADMM(0.5)], rounds=400)
    assert errors[-1] < 1e-5, errors[-1]


def test_scaffold_converges_at_least_as_fast_as_fedavg_on_a_quadratic():
    """IID data, full participation (the issue's identity): SCAFFOLD at every layer is never behind FedAvg."""
    sc = quadratic_run([Scaffold("full")] * 2, rounds=60, iid=True)
    avg = quadratic_run(None, rounds=60, iid=True)
    assert all(s <= a * (1 + 1e-6) for s, a in zip(sc, avg)), list(zip(sc, avg))
    assert sc[-1] < 1e-9 < avg[-1]


def test_scaffold_at_every_layer_removes_the_drift_of_every_layer():
    """Non-IID: at the device layer only it corrects the devices' drift from their edge, not the edges' from the
    cloud; at every layer the fixed point is the optimum."""
    everywhere = quadratic_run([Scaffold("full")] * 2, rounds=80)
    devices_only = quadratic_run([Scaffold("full"), None], rounds=80)
    avg = quadratic_run(None, rounds=80)
    assert everywhere[-1] < 1e-9
    assert devices_only[-1] > 1e-2 and avg[-1] > 1e-2


def test_local_solver_state_is_checkpointed_and_resumes_bit_for_bit():
    participation = [Bernoulli(0.7), Full(), Full()]
    solvers = [Scaffold(), FedProx(0.1), ADMM(0.3)]
    full, _, _, _ = run_engine(solvers, participation, rounds=4)
    half, _, template, data = run_engine(solvers, participation, rounds=2)
    sd = half.state_dict()
    config = half.config
    resumed = QMLHFLEngine(copy.deepcopy(template), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR},
                           config=config)
    resumed.load_state_dict(sd)
    for b in batches(TREE.num_devices, math.prod(TAUS) * 4)[math.prod(TAUS) * 2:]:
        resumed.local_step(tuple(t.double() if t.is_floating_point() else t for t in b))
    for a, b in zip(full.state.params, resumed.state.params):
        assert torch.equal(a, b)
    sa, sb = full.registry.state_dict(), resumed.registry.state_dict()
    for k in sa:
        if k.startswith("solver/"):
            assert (torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]), k


def test_config_values_and_bad_input():
    assert layer_local_solvers("fedprox", 3, mu=[0.0, 0.1, 0.2]) == [FedProx(0.0), FedProx(0.1), FedProx(0.2)]
    assert layer_local_solvers(["scaffold", None, "admm"], 3, rho=0.2) == [Scaffold(), LocalSGD(), ADMM(0.2)]
    assert make_local_solver({"name": "admm", "rho": 2}) == ADMM(2.0)
    with pytest.raises(ValueError, match="FedProx mu must be a finite number >= 0, got -1"):
        FedProx(-1)
    with pytest.raises(ValueError, match="ADMM rho must be a finite number > 0, got 0"):
        ADMM(0)
    with pytest.raises(ValueError, match="Scaffold variates must be 'compressed' or 'full', got 'half'"):
        Scaffold("half")
    with pytest.raises(ValueError, match="unknown local solver 'feddyn'"):
        make_local_solver("feddyn")
    with pytest.raises(ValueError, match="local_solvers has length 2 but the hierarchy has N = 3"):
        SimulationConfig.build(TREE, TAUS, local_solvers=[None, None])
    # the identity of a run records the solver only where one is set (older checkpoints keep theirs)
    plain = SimulationConfig.build(TREE, TAUS)
    assert "local_solver" not in plain.identity()["layers"][0]
    prox = SimulationConfig.build(TREE, TAUS, local_solvers="fedprox")
    assert prox.identity()["layers"][0]["local_solver"] == {"name": "fedprox", "mu": 0.01}


def test_several_learning_rates_are_refused():
    config = SimulationConfig.build(TREE, TAUS, [Identity()] * 3, local_solvers=[Scaffold(), None, None])
    groups = [{"params": ["fc1.weight", "fc1.bias"], "lr": 0.1}, {"params": ["fc2.weight", "fc2.bias"], "lr": 0.2}]
    with pytest.raises(ValueError, match="several"):
        QMLHFLEngine(Net(), loss_fn, optimizer="sgd", param_groups=groups, config=config)


def test_theory_tools_warn_and_count_the_variates():
    import warnings

    from lightning_qmlhfl.theory import TheoryWarning, check_learning_rate
    from lightning_qmlhfl.theory.latency import upload_bits as layer_bits

    with pytest.warns(TheoryWarning, match="local solvers"):
        check_learning_rate(0.01, 1.0, TAUS, [None] * 3, TREE, d=100, local_solvers=[Scaffold(), None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_learning_rate(0.01, 1.0, TAUS, [None] * 3, TREE, d=100, local_solvers=[FedProx(0.0), None, None])
    assert layer_bits([QSGD(4), None], 1000, local_solvers=["scaffold", "fedprox"]) == \
        [2 * QSGD(4).bits(1000), 32 * 1000]
    assert layer_bits([QSGD(4)], 1000, local_solvers=[Scaffold("full")]) == [QSGD(4).bits(1000) + 32 * 1000]


def _sharded(solvers, world, cut, clip_norm=None):
    from helpers.ranks import run_ranks
    from lightning_qmlhfl.distribution.shard import Shard

    torch.manual_seed(0)
    template = Net().double()
    config = SimulationConfig.build(TREE, TAUS, [QSGD(4, bucket_size=None), QSGD(8), Identity()],
                                    participation=[Bernoulli(0.7), Full(), Full()], local_solvers=solvers,
                                    executor="loop", seed=3, param_order="module", clip_norms=clip_norm)
    data = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches(6, 8)]
    one = QMLHFLEngine(copy.deepcopy(template), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR}, config=config)
    for b in data:
        one.local_step(b)
    def work(r, comm):
        shard = Shard.build(TREE, world, r, cut, "gather")
        e = QMLHFLEngine(copy.deepcopy(template), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR},
                         config=config, shard=shard, comm=comm)
        rows = shard.rows(0)
        for x, y in data:
            e.local_step((x[rows], y[rows]))
        return e

    engines, errors = run_ranks(world, work)
    assert errors == [None] * world, errors
    return one, engines


@pytest.mark.parametrize("cut", [0, 1])
def test_sharded_ranks_equal_one_process(cut):
    solvers = [Scaffold(), ADMM(0.5), ADMM(0.3)]
    one, shards = _sharded(solvers, 2, cut)
    whole = one.registry.state_dict()
    for e in shards:
        for m in range(4):
            assert torch.equal(e.state.params[m], one.state.params[m][e.shard.rows(m)]), m
        mine = e.registry.state_dict()
        for n, layer_of in ((1, {"variate_children": 0, "variate_parents": 1}),
                            (2, {"dual": 1, "augmented": 1, "consensus": 1}), (3, {"dual": 2, "augmented": 2})):
            for name, m in layer_of.items():
                key = f"solver/{n}/{name}"
                if key in whole:
                    assert torch.equal(mine[key], whole[key][e.shard.rows(m)]), key
        assert e.bits_sent == one.bits_sent


@pytest.mark.parametrize("cut", [0, 1])
def test_sharded_ranks_log_the_drift_of_every_sender(cut):
    """The drift each rank logs is the mean over all the layer's uploads, as in one process (each rank measures its
    own senders below the cut; the sums are added over the ranks), with ClipUpdates' count alike."""
    solvers = [FedProx(0.2), Scaffold(), LocalSGD(drift=True)]
    one, shards = _sharded(solvers, 2, cut, clip_norm=[0.05, None, None])
    want = one.last_round_stats
    assert one.round == 2 and {f"drift_layer{n}" for n in (1, 2, 3)} <= set(want)
    assert 0 < want["clipped_layer1"] < 6 * 2  # some of the round's uploads clipped, not all
    for e in shards:
        got = e.last_round_stats
        for n in (1, 2, 3):
            assert got[f"drift_layer{n}"] == pytest.approx(want[f"drift_layer{n}"], rel=1e-12), (n, got)
        assert got["clipped_layer1"] == want["clipped_layer1"] and isinstance(got["clipped_layer1"], int)
        assert got["participants_layer1"] == want["participants_layer1"]


def test_a_moving_device_keeps_its_own_state():
    """Permuting the device rows together with the tree (and a schedule of moves) permutes every per-device solver
    row and changes nothing else: the state belongs to the device, wherever its row is or whichever edge it is at."""
    from lightning_qmlhfl.federation.mobility import Schedule

    h = Hierarchy.balanced([2, 3, 2])  # 12 devices, 4 edges
    torch.manual_seed(1)
    perm = torch.randperm(12)
    inv = torch.argsort(perm)
    schedule = [torch.randint(0, 4, (12,)).tolist(), torch.randint(0, 4, (12,)).tolist()]
    h_perm = Hierarchy.from_parents([torch.tensor(h.parents[0])[perm].tolist(), list(h.parents[1]),
                                     list(h.parents[2])])
    data = [(x.double(), y) for x, y in batches(12, 16)]
    solvers = [Scaffold("full"), None, ADMM(0.4)]

    def run(hier, sched, rows):
        torch.manual_seed(0)
        template = Net().double()
        config = SimulationConfig.build(hier, [2, 2, 1], [Identity()] * 3, local_solvers=solvers, seed=2,
                                        mobility=Schedule(sched), param_order="module", executor="vmap")
        e = QMLHFLEngine(template, loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR}, config=config)
        for x, y in data:
            e.local_step((x[rows], y[rows]))
        return e

    a = run(h, schedule, torch.arange(12))
    b = run(h_perm, [torch.tensor(s)[perm].tolist() for s in schedule], perm)
    assert a.tree.parent_index(0).tolist() != list(h.parents[0])  # devices did move
    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b.device_params()[inv], a.device_params(), **tol)
    sa, sb = a.registry.state_dict(), b.registry.state_dict()
    torch.testing.assert_close(sb["solver/1/variate_children"][inv], sa["solver/1/variate_children"], **tol)
    torch.testing.assert_close(sb["solver/1/variate_parents"], sa["solver/1/variate_parents"], **tol)
    torch.testing.assert_close(sb["solver/3/dual"], sa["solver/3/dual"], **tol)
    assert torch.count_nonzero(sa["solver/1/variate_children"]) > 0


def test_strategy_runs_a_solver_in_bf16_mixed_and_logs_the_drift():
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_qmlhfl import QMLHFLStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(240, 5, generator=g), torch.randint(0, 3, (240,), generator=g))
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([3, 2]), taus=[2, 1], compressors=[QSGD(4), None],
                              local_solvers=[ADMM(0.2), Scaffold()], global_rounds=2, partition="iid")
    trainer = L.Trainer(strategy=strategy, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), DataLoader(ds, batch_size=4))
    engine = strategy.core.engine
    assert engine.round == 2
    for k, v in engine.registry.state_dict().items():
        if k.startswith("solver/") and isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype in (torch.float32, torch.float64), k
    assert "fl/drift_layer1" in trainer.callback_metrics and "fl/drift_layer2" in trainer.callback_metrics
    assert float(trainer.callback_metrics["fl/drift_layer1"]) > 0
