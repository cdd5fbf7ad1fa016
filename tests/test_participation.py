"""Partial participation, availability, heterogeneous devices and stragglers: selection statistics, unbiasedness
by enumeration, the engine against the per-node reference fed the engine's own draws, the hand-computed clock,
traces, and bad input."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

from lightning_qmlhfl import QSGD, Hierarchy, Identity, ScaledSign, TopK
from lightning_qmlhfl.federation.availability import Availability, AvailabilityTrace, TraceFormatError
from lightning_qmlhfl.federation.clock import SimulatedClock, tree_round_times
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.kernels import aggregate_layer_torch_
from lightning_qmlhfl.federation.participation import (Bernoulli, Fraction, Full, UniformK, layer_participation,
                                            participation_weights)
from lightning_qmlhfl.federation.population import Population, estimate_round_time, simulate_round
from lightning_qmlhfl.rng import row_seeds
from lightning_qmlhfl.theory.latency import LatencyModel

from test_engine import MLP, ReferenceQMLHFL, ce_loss, make_batches


# ---------------------------------------------------------------- selection
def test_selection_frequencies_match_the_inclusion_probabilities():
    pidx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    available = torch.ones(12, dtype=torch.bool)
    available[5] = False
    n = 4000
    for policy in (UniformK(2), Fraction(0.5), Bernoulli(0.3)):
        hits = torch.zeros(12)
        for t in range(n):
            sel, keep, pi = policy.select(pidx, 3, available, torch.Generator().manual_seed(t))
            assert not sel[5]  # an unavailable child is never drawn
            hits += sel
        freq = hits / n
        _, _, pi = policy.select(pidx, 3, available, torch.Generator().manual_seed(0))
        ok = available.clone()
        assert torch.allclose(freq[ok], pi[ok].float(), atol=0.04), (policy, freq, pi)
    # exact counts without replacement
    sel, keep, _ = UniformK(2).select(pidx, 3, available, torch.Generator().manual_seed(1))
    assert torch.bincount(pidx[sel], minlength=3).tolist() == [2, 2, 2] and keep.tolist() == [2, 2, 2]
    sel, keep, _ = Fraction(0.5).select(pidx, 3, torch.ones(12, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert torch.bincount(pidx[sel], minlength=3).tolist() == [2, 2, 2]  # round(0.5 * 3) = 2
    sel, keep, _ = UniformK(1, over_select=1.0).select(pidx, 3, available, torch.Generator().manual_seed(1))
    assert torch.bincount(pidx[sel], minlength=3).tolist() == [2, 2, 2] and keep.tolist() == [1, 1, 1]


@pytest.mark.parametrize("policy", [UniformK(2), Fraction(0.4), Bernoulli(0.35)], ids=repr)
def test_unbiased_weighting_by_enumeration_equals_the_full_aggregate(policy):
    """float64, no quantization: sum over every possible selection (with its probability) of the aggregate."""
    g = torch.Generator().manual_seed(0)
    pidx = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    M, C, P = 2, 7, 5
    parent = torch.randn(M, P, generator=g, dtype=torch.float64)
    child = torch.randn(C, P, generator=g, dtype=torch.float64)
    base = torch.tensor([1 / 3] * 3 + [1 / 4] * 4, dtype=torch.float64)
    full = parent.clone()
    aggregate_layer_torch_(full, child, pidx, base, Identity(), row_seeds(0, 0, 1, 0, C))
    _, _, pi = policy.select(pidx, M, torch.ones(C, dtype=torch.bool), torch.Generator().manual_seed(0))
    mean = torch.zeros_like(parent)
    total_p = 0.0
    for bits in itertools.product([False, True], repeat=C):
        sel = torch.tensor(bits)
        if isinstance(policy, Bernoulli):
            prob = math.prod(policy.p if b else 1 - policy.p for b in bits)
        else:  # uniform k-subsets per parent, independently
            prob = 1.0
            for p in range(M):
                kids = (pidx == p)
                k = int(policy._targets(torch.bincount(pidx))[p])
                if int(sel[kids].sum()) != k:
                    prob = 0.0
                    break
                prob /= math.comb(int(kids.sum()), k)
        if prob == 0:
            continue
        total_p += prob
        w = participation_weights(policy, base, pi, sel, pidx, M)
        out = parent.clone()
        aggregate_layer_torch_(out, child, pidx, w, Identity(), row_seeds(0, 0, 1, 0, C), rows=torch.nonzero(sel)[:, 0])
        mean += prob * out
    assert total_p == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(mean, full, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- the engine against the per-node reference
class ParticipatingReference(ReferenceQMLHFL):
    """The per-node reference, fed the engine's draws: which devices train in each step, which children upload
    at each aggregation, and their weights (w_c / pi_c or renormalised over the uploads, written out here)."""

    def __init__(self, *args, active, uploads, policies, pis, **kw):
        super().__init__(*args, **kw)
        self.active, self.uploaded, self.policies, self.pis = active, uploads, policies, pis
        self.t = 0

    def local_step(self, batch):
        x, y = batch
        act = self.active[self.t]
        self.t += 1
        for i, (m, opt) in enumerate(zip(self.models, self.opts)):
            if act is not None and i not in act:
                continue  # a non-participant does not train: model and optimizer untouched
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()

    def aggregate(self, n, event):
        q = self.quantizers[n - 1]
        ups = self.uploaded.pop(0)
        pi = self.pis.pop(0)
        policy = self.policies[n - 1]
        seeds = row_seeds(self.seed, self.round, n, event, self.h.nodes_per_layer[n - 1])
        if n == 1:
            for dev in self.layers[0]:
                dev.state = self.device_state(dev.index)
        for parent in self.layers[n]:
            vp = self._flat(parent.state)
            new_p = vp.clone()
            senders = [c for c in parent.children if ups is None or bool(ups[c.index])]
            total = sum(c.mass for c in senders)
            for child in senders:
                w = child.mass / parent.mass / float(pi[child.index]) if policy.weighting == "unbiased" \
                    else child.mass / total
                diff = self._flat(child.state) - vp
                u = None
                if q.uses_uniforms:
                    from lightning_qmlhfl.kernels import row_uniforms
                    u = row_uniforms(seeds[child.index:child.index + 1], diff.numel(), "cpu")[0].tolist()
                from helpers.compress_by_hand import compress_by_hand
                mem = getattr(child, "memory", torch.zeros_like(diff))
                x = diff + mem if q.error_feedback == "ef" else diff
                c = torch.tensor(compress_by_hand(q, x.tolist(), u))
                if q.error_feedback == "ef":
                    child.memory = x - c
                new_p += w * c
            parent.state = {**self._unflat(new_p, parent.state)}
            self._resync(parent)


def _record(engine):
    """Wrap the engine's population to record its draws."""
    pop = engine.population
    active, uploads, pis = [], [], []
    begin, agg = pop.begin_step, pop.aggregate

    def begin_step(*a):
        out = begin(*a)
        return out

    def aggregate(n, r, e, base):
        rows, w, has = agg(n, r, e, base)
        m = engine.hierarchy.nodes_per_layer[n - 1]
        mask = None if rows is None else torch.zeros(m, dtype=torch.bool).index_fill_(0, rows, True)
        uploads.append(mask)
        pis.append(pop.pi[n - 1].clone())
        return rows, w, has

    pop.aggregate = aggregate
    real_after = pop.after_step

    def after_step():
        active.append(None if pop.active is None else set(pop.active.tolist()))
        real_after()

    pop.after_step = after_step
    return active, uploads, pis


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("weighting", ["normalized", "unbiased"])
def test_engine_with_partial_participation_matches_the_reference(optimizer, weighting):
    h = Hierarchy.balanced([2, 2, 3])
    taus = [2, 2, 1]
    policies = [UniformK(2, weighting=weighting), Bernoulli(0.6, weighting=weighting), Full()]
    # (a scaled sign, not top-k: top-k's choice of entries flips on float-rounding differences of near-equal
    # magnitudes, which the reference's other summation order produces)
    qs = [QSGD(4, bucket_size=None), ScaledSign(bucket_size=16, error_feedback="ef"), Identity()]
    torch.manual_seed(0)
    template = MLP()
    batches = make_batches(h.num_devices, 12)
    engine = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, optimizer=optimizer,
                          optimizer_kwargs={"lr": 0.05}, executor="vmap", seed=3, participation=policies,
                          availability=Availability(unavailable=0.2, dropout=0.15))
    active, uploads, pis = _record(engine)
    before = None
    for t, b in enumerate(batches):
        engine.local_step(b)
        if t == 3:
            before = engine.optimizer.device_steps.clone()
    assert any(a is not None for a in active) and not bool((engine.optimizer.device_steps == 12).all())
    assert before is not None
    ref = ParticipatingReference(copy.deepcopy(template), h, taus, qs, lr=0.05, momentum=0.0, seed=3,
                                 active=active, uploads=uploads, policies=policies, pis=pis)
    if optimizer == "adam":
        ref.opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in ref.models]
    for r in range(3):
        ref.global_round(batches[r * 4:(r + 1) * 4])
    for n in range(engine.N + 1):
        theirs = torch.stack([ref._flat(node.state) for node in ref.layers[n]]) if n else ref.device_matrix()
        mine = engine.state.params[n] if n else engine.device_params()  # (devices that do not train: their parents')
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=2e-5)


def test_non_participants_keep_rows_optimizer_state_and_memory():
    h = Hierarchy.balanced([2, 4])
    torch.manual_seed(0)
    engine = QMLHFLEngine(MLP(), ce_loss, h, [3, 1], [TopK(ratio=0.3, error_feedback="ef"), None], optimizer="sgd",
                          optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, seed=0, participation=[UniformK(1), Full()])
    batches = make_batches(8, 6)
    engine.local_step(batches[0])  # step 1 of a layer-1 period: one device per edge trains
    active = engine.population.active.tolist()
    idle = [i for i in range(8) if i not in active]
    rows = engine.state.params[0][idle].clone()
    mom = {k: v["momentum_buffer"].clone() for k, v in engine.optimizer.optimizer.state.items()}
    engine.local_step(batches[1])
    assert torch.equal(engine.state.params[0][idle], rows)
    for col, st in engine.optimizer.optimizer.state.items():
        assert torch.equal(st["momentum_buffer"][idle], mom[col][idle])
    engine.local_step(batches[2])  # the layer-1 aggregation: the idle devices did not upload
    assert torch.equal(engine.memory[0][idle], torch.zeros_like(engine.memory[0][idle]))
    assert engine.memory[0][active].abs().sum() > 0
    assert engine.optimizer.device_steps[idle].tolist() == [0] * len(idle)


def test_a_node_without_participants_leaves_its_parent_unchanged():
    h = Hierarchy.balanced([2, 2])
    torch.manual_seed(0)
    engine = QMLHFLEngine(MLP(), ce_loss, h, [1, 1], None, optimizer_kwargs={"lr": 0.5}, seed=0,
                          participation=[Full(), Full()], availability=Availability(dropout=0.999999))
    cloud = engine.cloud_params().clone()
    edges = engine.state.params[1].clone()
    engine.local_step(make_batches(4, 1)[0])  # every device trains, and every upload is lost
    assert torch.equal(engine.state.params[1], edges) and torch.equal(engine.cloud_params(), cloud)
    assert engine.last_round_stats["participants_layer1"] == 0 and engine.last_round_stats["drops_layer1"] == 4
    assert engine.bits_sent == [0, 0]


def test_only_participants_compute():
    h = Hierarchy.balanced([4, 5])
    calls = []
    torch.manual_seed(0)
    engine = QMLHFLEngine(MLP(), ce_loss, h, [2, 1], None, optimizer_kwargs={"lr": 0.1}, seed=0,
                          participation=[Fraction(0.2), Full()])
    real = engine.executor

    def spy(p, b, batch, *rest):
        calls.append(p.shape[0])
        return real(p, b, batch, *rest)

    engine.executor = spy
    for b in make_batches(20, 4):
        engine.local_step(b)
    assert calls == [4, 4, 4, 4]  # one device of each edge's five


# ---------------------------------------------------------------- the clock
def _two_edges():
    h = Hierarchy.balanced([2, 2])
    lat = LatencyModel(compute_time=None, compute_times_per_device=[1.0, 2.0, 3.0, 4.0],
                       uplink_rates=[[8.0, 4.0, 8.0, 2.0], [4.0, 1.0]])
    return h, lat


def test_hand_computed_clock_on_a_two_edge_tree():
    h, lat = _two_edges()
    # devices: 2 steps of 1, 2, 3, 4 s, then 8-bit uploads at 8, 4, 8, 2 bit/s -> ready at 3, 6, 7, 12 s;
    # edges wait for their slowest: 6 and 12 s; then 4-bit uploads at 4 and 1 bit/s -> 7 and 16 s; the cloud: 16 s
    total, split = simulate_round(h, [2, 1], lat, [8, 4], [Full(), Full()])
    assert total == 16.0 and split.tolist() == [8.0, 4.0, 4.0]  # critical path: d3 computes 8, uploads 4, e1 4
    rt = lat.round_time([2, 1], [8, 4], hierarchy=h)
    assert rt.total == 16.0 and rt.compute == 8.0
    assert tree_round_times(h, [[2, 1]], lat.device_compute_times(4),
                            [8.0 / lat.sender_rates(1, 4), 4.0 / lat.sender_rates(2, 2)], [0.0, 0.0]).tolist() == [16.0]
    # stragglers dropped at a 10 s deadline on layer 1: d3 is late, edge 1 aggregates at 10 s; cloud: max(7, 14)
    drop = LatencyModel(compute_time=None, compute_times_per_device=[1.0, 2.0, 3.0, 4.0],
                        uplink_rates=[[8.0, 4.0, 8.0, 2.0], [4.0, 1.0]], deadlines=[10.0, None], straggler="drop")
    total, split = simulate_round(h, [2, 1], drop, [8, 4], [Full(), Full()])
    assert total == 14.0 and split.tolist() == [6.0, 4.0, 4.0]
    wait = LatencyModel(compute_time=None, compute_times_per_device=[1.0, 2.0, 3.0, 4.0],
                        uplink_rates=[[8.0, 4.0, 8.0, 2.0], [4.0, 1.0]], deadlines=[10.0, None], straggler="wait")
    assert simulate_round(h, [2, 1], wait, [8, 4], [Full(), Full()])[0] == 16.0
    # over-selection: every edge draws both devices and keeps the first to finish: 3 and 7 s; cloud max(4, 11)
    assert simulate_round(h, [2, 1], lat, [8, 4], [UniformK(1, over_select=1.0), Full()])[0] == 11.0


def test_the_engine_clock_and_the_latency_model_agree():
    h = Hierarchy.balanced([2, 3, 2])
    lat = LatencyModel.lognormal(h, 0.01, [1e6, 1e5, 1e4], compute_sigma=0.6, rate_sigma=0.6, seed=4)
    torch.manual_seed(0)
    engine = QMLHFLEngine(MLP(), ce_loss, h, [2, 2, 1], [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), None], optimizer_kwargs={"lr": 0.1},
                          latency=lat)
    for b in make_batches(12, 8):
        engine.local_step(b)
    bits = [engine.upload_bits(n) for n in (1, 2, 3)]
    rt = lat.round_time([2, 2, 1], bits, hierarchy=h)
    assert engine.sim_time == pytest.approx(2 * rt.total, rel=1e-12)
    assert engine.last_round_stats["time_compute"] + sum(engine.last_round_stats[f"time_layer{n}"]
                                                        for n in (1, 2, 3)) == pytest.approx(rt.total, rel=1e-12)
    # the slowest-sender formula is an upper bound; both agree for identical nodes
    assert rt.total <= lat.round_time([2, 2, 1], bits).total
    same = LatencyModel(compute_time=0.01, uplink_rates=[1e6, 1e5, 1e4])
    assert same.round_time([3, 2, 2], bits).total == pytest.approx(
        simulate_round(h, [3, 2, 2], same, bits, [Full()] * 3)[0], rel=1e-12)
    grid = [[1, 1, 1], [3, 2, 2], [2, 5, 1]]
    expected = [lat.round_time(t, bits, hierarchy=h).total for t in grid]
    assert lat.round_time_grid(grid, lat.link_times(bits), h, bits).tolist() == pytest.approx(expected, rel=1e-12)


def test_expected_round_time_under_participation():
    h, lat = _two_edges()
    full, _ = estimate_round_time(h, [2, 1], lat, [8, 4], [Full(), Full()], rounds=4)
    part, std = estimate_round_time(h, [2, 1], lat, [8, 4], [UniformK(1), Full()], rounds=64, seed=1)
    assert full == 16.0 and part < full and std > 0
    # by hand: edge 1 draws d2 (ready 7 -> cloud 11) or d3 (12 -> 16), edge 0 never sets the time: mean 13.5
    assert part == pytest.approx(13.5, abs=0.7)


# ---------------------------------------------------------------- traces
def test_trace_files_are_parsed_and_applied(tmp_path):
    js = tmp_path / "trace.json"
    js.write_text(json.dumps({"devices": [[[0, 100]], [[0, 5], [50, 60]], [[10, 20]], [[0, 1e9]]]}))
    csvf = tmp_path / "trace.csv"
    csvf.write_text("device,start,end\n0,0,100\n1,0,5\n1,50,60\n2,10,20\n3,0,1e9\n")
    a, b = AvailabilityTrace.from_file(js), AvailabilityTrace.from_file(csvf)
    for tr in (a, b):
        assert tr.online(torch.tensor([3.0, 3.0, 3.0, 3.0])).tolist() == [True, True, False, True]
        assert tr.online(torch.tensor([55.0, 55.0, 15.0, 55.0])).tolist() == [True, True, True, True]
        assert tr.online_through(torch.tensor([1.0] * 4), torch.tensor([7.0] * 4)).tolist() == [True, False, False,
                                                                                               True]
    cyc = AvailabilityTrace([[[0, 10]], [[5, 10]]], period=10)
    assert cyc.online(torch.tensor([23.0, 23.0])).tolist() == [True, False]
    # applied: device 2 is offline at t = 0, so edge 1 can only draw device 3; device 1 drops out (its window
    # closes at 5 s, its upload completes at 2 * 2 + 2 = 6 s)
    h, lat = _two_edges()
    clock = SimulatedClock(h, lat, [8, 4])
    pop = Population(h, [2, 1], [Full(), Full()], Availability(trace=a), clock, seed=0)
    assert pop.begin_step(0, 0, 0).tolist() == [0, 1, 3]
    pop.after_step()
    pop.begin_step(0, 1, 1)
    pop.after_step()
    rows, w, has = pop.aggregate(1, 0, 0, h.aggregation_weights(1))
    assert rows.tolist() == [0, 3] and pop.dropped == [1, 0]


@pytest.mark.parametrize("content, match", [
    ('{"devices": [[[0, 10]], [[5, 3]]]}', r"device 1, window 0: need 0 <= start < end"),
    ('{"devices": [[[0, 10], [5, 20]]]}', "overlap"),
    ('{"devices": [[[0, 10]], []]}', "device 1 has no availability window"),
    ('{"windows": []}', 'expected {"devices"'),
    ('not json', "is not valid JSON"),
    ('{"devices": [[[0, "a"]]]}', "times must be numbers"),
])
def test_malformed_trace_files(tmp_path, content, match):
    f = tmp_path / "t.json"
    f.write_text(content)
    with pytest.raises(TraceFormatError, match=match):
        AvailabilityTrace.from_file(f)


def test_malformed_csv_trace(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("device,begin,end\n0,0,1\n")
    with pytest.raises(TraceFormatError, match="header device,start,end"):
        AvailabilityTrace.from_file(f)
    f.write_text("device,start,end\n0,zero,1\n")
    with pytest.raises(TraceFormatError, match="line 2"):
        AvailabilityTrace.from_file(f)


# ---------------------------------------------------------------- configuration and bad input
def test_config_values():
    assert layer_participation(["fraction", "full", "uniformk"], 3, f=0.1, k=[None, None, 2],
                               weighting="normalized") == [Fraction(0.1, "normalized"), Full("normalized"),
                                                           UniformK(2, "normalized")]


@pytest.mark.parametrize("build, match", [
    (lambda: Fraction(0.0), r"Fraction f must be a number in \(0, 1\]"),
    (lambda: Fraction(1.2), r"Fraction f must be a number in \(0, 1\]"),
    (lambda: UniformK(0), "UniformK k must be an integer >= 1"),
    (lambda: Bernoulli(0.0), r"Bernoulli p must be a number in \(0, 1\]"),
    (lambda: UniformK(2, weighting="fedavg"), "weighting must be 'unbiased' or 'normalized'"),
    (lambda: Fraction(0.5, over_select=-1), "over_select must be a number >= 0"),
    (lambda: QMLHFLEngine(MLP(), ce_loss, Hierarchy.balanced([2, 3]), [1, 1], None,
                          participation=[UniformK(4), Full()]), "node 0 has only 3 children"),
    (lambda: LatencyModel(compute_time=-1.0, uplink_rates=[1e6]), "compute_time .* must be a positive"),
    (lambda: LatencyModel(compute_time=1.0, uplink_rates=[[1e6, -1.0]]), "must be a positive"),
    (lambda: LatencyModel(compute_time=1.0, uplink_rates=[1e6], deadlines=[-3.0]), "deadlines"),
    (lambda: LatencyModel(compute_time=1.0, uplink_rates=[1e6], straggler="skip"), "straggler must be"),
    (lambda: LatencyModel.lognormal(Hierarchy.balanced([2]), 1.0, [1e6], compute_sigma=-1), "compute_sigma"),
    (lambda: Availability(unavailable=1.5), r"unavailable must be a probability in \[0, 1\)"),
    (lambda: Availability(dropout=[0.1, 2.0]), r"dropout must hold probabilities in \[0, 1\)"),
])
def test_bad_input(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_gradient_norm_clipping_with_partial_participation_is_per_stepping_device():
    """Only the stepping devices' gradients are clipped (each to its own norm), as a per-device loop does."""
    h = Hierarchy.balanced([2, 4])
    torch.manual_seed(0)
    template = MLP()
    engine = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, [2, 1], None, optimizer="sgd",
                          optimizer_kwargs={"lr": 0.5}, seed=0, param_order="module", grad_clip=("norm", 0.01),
                          participation=[UniformK(1), Full()])
    x, y = make_batches(8, 1)[0]
    before = engine.state.params[0].clone()
    engine.local_step((x, y))
    active = engine.population.active.tolist()
    assert len(active) == 2
    after = engine.device_params()
    for i in range(8):
        if i not in active:
            assert torch.equal(after[i], before[i])
            continue
        ref = copy.deepcopy(template)
        torch.nn.utils.vector_to_parameters(before[i].clone(), ref.parameters())
        torch.nn.functional.cross_entropy(ref(x[i]), y[i]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
        torch.testing.assert_close(after[i], torch.nn.utils.parameters_to_vector(ref.parameters()),
                                   atol=1e-6, rtol=1e-6)


def test_batchnorm_buffers_are_an_exact_mean_under_unbiased_participation():
    """Unbiased weights (w / pi) under a parent can sum to more than one; the float buffers (running statistics)
    are averaged with the weights renormalised over the uploads, so a running variance cannot turn negative."""
    from test_engine import SmallCNN

    h = Hierarchy.balanced([6])
    torch.manual_seed(0)
    engine = QMLHFLEngine(SmallCNN(), ce_loss, h, [1], None, optimizer_kwargs={"lr": 0.1}, seed=4,
                          executor="loop", participation=[Bernoulli(0.3)])
    seen = []
    real = engine.population.aggregate

    def spy(n, r, e, base):  # called as the aggregation starts: the devices' buffers are what they upload
        out = real(n, r, e, base)
        seen.append((engine.state.buffers[0].clone(), engine.state.buffers[1][0].clone(), out))
        return out

    engine.population.aggregate = spy
    checked = 0
    for b in make_batches(6, 8, shape=(1, 6, 6)):
        engine.local_step(b)
        children, parent, (rows, w, _) = seen[-1]
        if rows is None or rows.numel() == 0:
            continue
        sent = w[rows].double()
        expected = parent.double() + ((sent / sent.sum()).unsqueeze(1) * (children[rows].double() - parent)).sum(0)
        torch.testing.assert_close(engine.state.buffers[1][0].double(), expected, atol=1e-6, rtol=1e-6)
        checked += float(sent.sum()) != 1.0  # the unbiased weights alone are not a mean
    assert checked >= 2
    m = engine.load_cloud_into(SmallCNN())
    assert bool((m.bn.running_var > 0).all())


def test_messages_name_the_real_culprit(tmp_path):
    """A CSV trace with a gap names the device of the offending line; a tree with an out-of-range parent index
    names the index; Dirichlet(alpha=inf) is refused at once."""
    from lightning_qmlhfl import Dirichlet

    trace = tmp_path / "t.csv"
    trace.write_text("device,start,end\n" + "".join(f"{i},0,100\n" for i in range(8)) + "100,0,100\n")
    with pytest.raises(TraceFormatError, match=r"line 10: device 100, but devices 8\.\.99 have no row"):
        AvailabilityTrace.from_file(trace)
    with pytest.raises(ValueError, match=r"parents\[0\]\[2\] = 5, but layer 1 has 2 nodes"):
        Hierarchy.from_parents([[0, 0, 5, 1], [0, 0]])
    with pytest.raises(ValueError, match="Dirichlet alpha must be a finite number > 0"):
        Dirichlet(alpha=math.inf)


def test_a_trace_under_which_no_device_can_upload_is_refused():
    h = Hierarchy.balanced([2, 2])
    lat = LatencyModel(compute_time=1.0, uplink_rates=[1e9, 1e9])
    short = AvailabilityTrace([[[0.0, 1.5]], [[2.0, 3.0]], [[0.0, 0.5]], [[5.0, 6.9]]])  # every window < 2 s
    kw = dict(optimizer_kwargs={"lr": 0.1}, seed=0, latency=lat)
    with pytest.raises(ValueError, match=r"no device can ever upload under this availability trace: .* longest "
                                         r"window of any device is 1\.9 s \(device 3\)"):
        QMLHFLEngine(MLP(), ce_loss, h, [2, 1], None, availability=Availability(trace=short), **kw)
    ok = AvailabilityTrace([[[0.0, 1.5]], [[2.0, 3.0]], [[0.0, 0.5]], [[5.0, 7.5]]])  # device 3 has 2.5 s
    QMLHFLEngine(MLP(), ce_loss, h, [2, 1], None, availability=Availability(trace=ok), **kw)
