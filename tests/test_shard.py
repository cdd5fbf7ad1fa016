"""Sharded engines: every rank of a simulation split over processes, run here in threads with an in-process
communicator, against the unsharded engine: equal number for number."""

from __future__ import annotations

import copy
import threading
import pytest
import torch

from lightning_qmlhfl.distribution.comm import thread_group
from lightning_qmlhfl import QSGD, FedAdam, Hierarchy, Identity, ScaledSign, TopK
from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError, QMLHFLEngine
from lightning_qmlhfl.federation.mobility import RandomReassociation
from lightning_qmlhfl.federation.participation import Fraction, Full
from lightning_qmlhfl.config import SimulationConfig
from lightning_qmlhfl.distribution.shard import Shard, choose_cut

from helpers.ranks import run_ranks
from test_engine import MLP, SmallCNN, ce_loss, make_batches

IRREGULAR = Hierarchy.from_parents([[0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4], [0, 0, 1, 1, 1], [0, 0]])
BALANCED = Hierarchy.balanced([2, 3, 2])


def _kw(**kw):
    base = dict(optimizer="sgd", optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, seed=3, executor="loop",
                device_rng="stream")
    base.update(kw)
    return base


def run_single(h, taus, qs, template, batches, **kw):
    e = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, **_kw(**kw))
    for b in batches:
        e.local_step(b)
    return e


def run_sharded(h, taus, qs, template, batches, world, cut=None, exchange="gather", fail=None, **kw):
    """Every rank in a thread; each feeds its own devices' rows of the batches."""

    def work(r, comm):
        shard = Shard.build(h, world, r, cut, exchange)
        e = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, shard=shard, comm=comm, **_kw(**kw))
        rows = shard.rows(0)
        for t, (x, y) in enumerate(batches):
            if fail is not None and fail(r, t):
                x = x.clone()
                x[:] = float("nan")
            e.local_step((x[rows], y[rows]))
        return e

    return run_ranks(world, work)


def assert_same(one, shards):
    for e in shards:
        for m in range(one.N + 1):
            rows = e.shard.rows(m)
            assert torch.equal(e.state.params[m], one.state.params[m][rows]), (e.shard, m)
            assert torch.equal(e.state.buffers[m], one.state.buffers[m][rows]), (e.shard, m)
        assert e.bits_sent == one.bits_sent and e.sim_time == one.sim_time


CASES = {
    "qsgd-irregular": (IRREGULAR, [2, 2, 1], [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), None], MLP, (6,), {}),
    "none-irregular": (IRREGULAR, [1, 2, 2], None, MLP, (6,), {}),
    "topk-ef-batchnorm": (BALANCED, [2, 2, 1], [TopK(ratio=0.3, error_feedback="ef"), QSGD(8, bucket_size=None), Identity()],
                          SmallCNN, (1, 6, 6), {}),
    "participation-server": (BALANCED, [2, 2, 1], [QSGD(4, bucket_size=None), ScaledSign(error_feedback="ef21"), None], MLP, (6,),
                             dict(participation=[Fraction(0.5), Full(), Full()],
                                  server_optimizers=[None, FedAdam(lr=0.02), None])),
}


@pytest.mark.parametrize("world, cut", [(2, 0), (2, 1), (2, 2), (3, 0)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shards_equal_the_unsharded_engine(case, world, cut):
    h, taus, qs, model, shape, kw = CASES[case]
    if h.nodes_per_layer[cut] < world:
        pytest.skip("fewer cut-layer nodes than ranks")
    torch.manual_seed(0)
    # no dropout here: the ranks of this test are threads of one process, which share torch's generator (the
    # per-device dropout streams across processes are checked in test_ddp.py)
    template = model()
    batches = make_batches(h.num_devices, 8, shape=shape)
    one = run_single(h, taus, qs, template, batches, **kw)
    shards, errors = run_sharded(h, taus, qs, template, batches, world, cut, **kw)
    assert errors == [None] * world, errors
    assert_same(one, shards)


def test_all_reduce_exchange_is_equal_to_float_tolerance():
    h, taus, qs, model, shape, kw = CASES["qsgd-irregular"]
    torch.manual_seed(0)
    template = model()
    batches = make_batches(h.num_devices, 8, shape=shape)
    one = run_single(h, taus, [None] * 3, template, batches)
    shards, errors = run_sharded(h, taus, [None] * 3, template, batches, 2, 1, "all_reduce")
    assert errors == [None, None]
    for m in range(4):
        torch.testing.assert_close(shards[0].state.params[m], one.state.params[m][shards[0].shard.rows(m)],
                                   atol=1e-6, rtol=1e-5)


def test_a_non_finite_upload_on_one_rank_stops_every_rank_alike():
    h, taus, qs, model, shape, kw = CASES["qsgd-irregular"]
    torch.manual_seed(0)
    template = model()
    batches = make_batches(h.num_devices, 6, shape=shape)
    shards, errors = run_sharded(h, taus, qs, template, batches, 2, 1, fail=lambda r, t: r == 1 and t == 2)
    assert all(isinstance(e, NonFiniteUpdateError) for e in errors), errors
    assert str(errors[0]) == str(errors[1]) and errors[0].layer == 1


def test_global_state_resumes_any_world_size():
    h, taus, qs, model, shape, kw = CASES["topk-ef-batchnorm"]
    torch.manual_seed(0)
    template = model()
    batches = make_batches(h.num_devices, 8, shape=shape)
    one = run_single(h, taus, qs, template, batches[:4])
    half_sd = one.state_dict()
    for b in batches[4:]:
        one.local_step(b)
    # a 2-rank run of the first half, gathered: equals the single engine's state
    comms = thread_group(2)
    got = [None, None]

    def first_half(r):
        shard = Shard.build(h, 2, r, 1)
        e = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, shard=shard, comm=comms[r], **_kw())
        rows = shard.rows(0)
        for x, y in batches[:4]:
            e.local_step((x[rows], y[rows]))
        got[r] = e.global_state_dict()

    threads = [threading.Thread(target=first_half, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for m in range(h.num_layers + 1):
        assert torch.equal(got[0]["state"][f"params/{m}"], half_sd["state"][f"params/{m}"])
    assert torch.equal(got[0]["state"]["memory/1"], half_sd["state"]["memory/1"])
    # ... which a single engine continues, and a 3-rank run continues from the single engine's state
    cont = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, **_kw())
    cont.load_state_dict(got[0])
    for b in batches[4:]:
        cont.local_step(b)
    assert torch.equal(cont.cloud_params(), one.cloud_params())
    comms3 = thread_group(3)
    three = [None] * 3

    def second_half(r):
        shard = Shard.build(h, 3, r, 0)
        e = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, qs, shard=shard, comm=comms3[r], **_kw())
        e.load_state_dict(half_sd)
        rows = shard.rows(0)
        for x, y in batches[4:]:
            e.local_step((x[rows], y[rows]))
        three[r] = e

    threads = [threading.Thread(target=second_half, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert_same(one, three)


def test_placement():
    h = Hierarchy.balanced([4, 5, 5])
    assert choose_cut(h, 2) == 2 and choose_cut(h, 4) == 2  # regional servers: 2 x 50 or 4 x 25 devices
    assert choose_cut(h, 8) == 1  # 20 edge servers: 8 blocks of 10-15 devices (regional: 4 < 8)
    s = Shard.build(h, 4, 1, None)
    assert s.cut == 2 and s.rows(0).tolist() == list(range(25, 50)) and s.rows(3).tolist() == [0]
    assert abs(s.memory_fraction() - (25 + 5 + 1 + 1) / 125) < 1e-12
    uneven = Hierarchy.from_parents([[0] * 6 + [1] * 2 + [2] * 2, [0, 0, 0]])
    assert Shard.build(uneven, 2, 0, None).rows(0).tolist() == list(range(6))  # the heavy edge server alone
    with pytest.raises(ValueError, match="cut_layer must be in"):
        Shard.build(h, 2, 0, 3)
    with pytest.raises(ValueError, match="cut layer 3 has|cut layer 2 has 4 nodes, fewer than the 8 ranks"):
        Shard.build(h, 8, 0, 2)
    with pytest.raises(ValueError, match="exchange must be"):
        Shard.build(h, 2, 0, None, "reduce_scatter")
    with pytest.raises(ValueError, match="mobility with a multi-process run is not supported"):
        QMLHFLEngine(MLP(), ce_loss, h, [1, 1, 1], None, shard=Shard.build(h, 2, 0), comm=thread_group(2)[0],
                     mobility=RandomReassociation(0.1))
    one_process = SimulationConfig.build(h, [1, 1, 1], theory="measure")
    with pytest.raises(ValueError, match="theory=measure runs in one process"):
        QMLHFLEngine(MLP(), ce_loss, shard=Shard.build(h, 2, 0), comm=thread_group(2)[0], config=one_process)
    with pytest.raises(ValueError, match="tau_schedule=.* runs in one process"):
        QMLHFLEngine(MLP(), ce_loss, shard=Shard.build(h, 2, 0), comm=thread_group(2)[0],
                     config=SimulationConfig.build(h, [1, 1, 1], tau_schedule="loss_ratio"))


@pytest.mark.parametrize("exchange", ["gather", "all_reduce"])
@pytest.mark.parametrize("case", ["qsgd-irregular", "topk-ef-batchnorm"])
def test_the_bytes_exchanged_match_the_formula(case, exchange):
    h, taus, qs, model, shape, kw = CASES[case]
    torch.manual_seed(0)
    template = model()
    batches = make_batches(h.num_devices, 8, shape=shape)  # two global rounds of prod(taus) = 4 steps
    shards, errors = run_sharded(h, taus, qs, template, batches, 2, 1, exchange)
    assert errors == [None, None]
    for e in shards:
        per_round = e.shard.exchange_bytes_per_round(taus, e.state.num_params, e.state.num_buffer_elems)
        kind = "all_gather" if exchange == "gather" else "all_reduce_sum"
        calls, sent = e.comm.stats[kind]
        assert sent == 2 * per_round and calls == 2 * (1 + (e.state.num_buffer_elems > 0)) * taus[2]
        if exchange == "gather":  # one row-count exchange per gather, 8 bytes
            assert e.comm.stats["sizes"] == [calls, 8 * calls]
        assert set(e.comm.stats) <= {kind, "sizes", "all_reduce_max"}  # + the 16-byte non-finite flags
