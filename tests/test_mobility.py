"""A dynamic hierarchy: devices moving between edge servers, edge-server failures."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lightning_qmlhfl import QSGD, Hierarchy, Identity
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.federation.mobility import EdgeFailures, Markov, RandomReassociation, Schedule, Static, make_mobility

from test_engine import MLP, ReferenceQMLHFL, ce_loss, make_batches

H = Hierarchy.balanced([2, 3, 4])  # 24 devices under 6 edge servers under 2 regional servers
TAUS = [2, 2, 1]


def _engine(mobility=None, compressors=(QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), None), template=None, h=H, **kw):
    torch.manual_seed(0)
    template = template if template is not None else MLP()
    return QMLHFLEngine(copy.deepcopy(template), ce_loss, h, TAUS, list(compressors), optimizer_kwargs={"lr": 0.1},
                        seed=2, mobility=mobility, **kw)


def _run(engine, steps=12, batches=None):
    batches = batches if batches is not None else make_batches(engine.hierarchy.num_devices, steps)
    for b in batches:
        engine.local_step(b)
    return engine


@pytest.mark.parametrize("mob", [Static(), RandomReassociation(0.0), Schedule([]), Schedule({})])
def test_no_move_reproduces_the_static_run_bit_for_bit(mob):
    a, b = _run(_engine(mob)), _run(_engine())
    for n in range(4):
        assert torch.equal(a.state.params[n], b.state.params[n])
    assert a.sim_time == b.sim_time and a.bits_sent == b.bits_sent


def test_a_move_at_a_cloud_boundary_changes_no_model_row():
    moving, static = _engine(RandomReassociation(0.5)), _engine()
    for b in make_batches(24, 4):  # one global round: the cloud aggregates at its last step
        moving.local_step(b)
        static.local_step(b)
    assert moving.last_round_stats["moves"] > 0
    for n in range(4):  # (the devices' rows as the engines present them: device_params)
        mine, theirs = (moving.device_params(), static.device_params()) if n == 0 else (moving.state.params[n],
                                                                                        static.state.params[n])
        assert torch.equal(mine, theirs)  # every row is the cloud model
        assert torch.equal(mine, moving.cloud_params().expand_as(mine))
    assert not torch.equal(moving.tree.parent_index(0), static.tree.parent_index(0))


@pytest.mark.parametrize("mob", [RandomReassociation(0.4, every=1), Markov.ring(6, 0.6),
                                 RandomReassociation(0.2, mid_period=0.3),
                                 Static(failures=EdgeFailures(0.4, "fallback")),
                                 Markov.ring(6, 0.3, failures=EdgeFailures(0.3, "skip"))], ids=repr)
def test_device_counts_sum_to_the_devices_after_every_change(mob):
    e = _engine(mob)
    versions = set()
    for b in make_batches(24, 16):
        e.local_step(b)
        assert int(e.tree.device_counts(1).sum()) == 24 and int(e.tree.device_counts(2).sum()) == 24
        assert int(e.tree.device_counts(3)[0]) == 24
        w = e.tree.aggregation_weights(1)
        sums = torch.zeros(6, dtype=torch.float64).index_add_(0, e.tree.parent_index(0), w)
        assert torch.allclose(sums[e.tree.device_counts(1) > 0], torch.ones(1, dtype=torch.float64))
        versions.add(e.tree.version)
    assert len(versions) > 1
    assert torch.isfinite(e.cloud_params()).all()


def test_permuting_device_rows_together_with_the_tree_leaves_the_results_unchanged():
    torch.manual_seed(1)
    template = MLP().double()
    perm = torch.randperm(24)  # new row i holds old device perm[i]
    inv = torch.argsort(perm)
    schedule = [torch.randint(0, 6, (24,)).tolist(), None, torch.randint(0, 6, (24,)).tolist()]
    h_perm = Hierarchy.from_parents([torch.tensor(H.parents[0])[perm].tolist(), list(H.parents[1]),
                                     list(H.parents[2])])
    batches = [(x.double(), y) for x, y in make_batches(24, 12)]
    a = _run(_engine(Schedule(schedule), [Identity()] * 3, template), batches=batches)
    b = _run(_engine(Schedule([None if s is None else torch.tensor(s)[perm].tolist() for s in schedule]),
                     [Identity()] * 3, template, h=h_perm), batches=[(x[perm], y[perm]) for x, y in batches])
    torch.testing.assert_close(b.device_params()[inv], a.device_params(), atol=1e-12, rtol=1e-12)
    for n in range(1, 4):
        torch.testing.assert_close(b.state.params[n], a.state.params[n], atol=1e-12, rtol=1e-12)


class ScheduledReference(ReferenceQMLHFL):
    """The per-node reference with a schedule of device -> edge-server arrays applied at every cloud boundary,
    after the cloud's Eq. 6 and before its re-synchronisation (every node gets the cloud model either way)."""

    def __init__(self, *args, schedule, **kw):
        super().__init__(*args, **kw)
        self.schedule, self.boundary = schedule, 0

    def aggregate(self, n, event):
        if n == self.h.num_layers:
            parents = self.schedule.get(self.boundary)
            self.boundary += 1
            super().aggregate(n, event)
            if parents is not None:
                self._rewire(parents)
            return
        super().aggregate(n, event)

    def _rewire(self, parents):
        for edge in self.layers[1]:
            edge.children = []
        for i, p in enumerate(parents):
            dev, edge = self.layers[0][i], self.layers[1][p]
            dev.parent = edge
            edge.children.append(dev)
        for node in [n for layer in self.layers[1:] for n in layer]:
            node.mass = 0.0
        for dev in self.layers[0]:
            node = dev.parent
            while node is not None:
                node.mass += 1.0
                node = node.parent


def test_a_scheduled_sequence_of_trees_against_the_per_node_loop():
    torch.manual_seed(3)
    schedule = {0: torch.randint(0, 6, (24,)).tolist(), 2: torch.randint(0, 6, (24,)).tolist()}
    schedule[0][:4] = [5] * 4  # an uneven tree, with some edge servers emptied
    torch.manual_seed(0)
    template = MLP()
    qs = [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None), Identity()]
    batches = make_batches(24, 16)
    engine = _run(_engine(Schedule(schedule), qs, template), batches=batches)
    ref = ScheduledReference(copy.deepcopy(template), H, TAUS, qs, lr=0.1, momentum=0.0, seed=2, schedule=schedule)
    for r in range(4):
        ref.global_round(batches[r * 4:(r + 1) * 4])
    for n in range(4):
        theirs = torch.stack([ref._flat(node.state) for node in ref.layers[n]]) if n else ref.device_matrix()
        mine = engine.state.params[n] if n else engine.device_params()
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=2e-5)
    assert engine.tree.parent_index(0).tolist() == schedule[2]


def test_skipped_and_fallback_failures():
    skip = _engine(Static(failures=EdgeFailures(0.5, "skip")))
    fall = _engine(Static(failures=EdgeFailures(0.5, "fallback")))
    batches = make_batches(24, 8)
    for b in batches[:4]:  # round 1; its cloud boundary draws the failures of round 2
        skip.local_step(b)
        fall.local_step(b)
    down = skip.population.down.clone()
    for b in batches[4:]:
        skip.local_step(b)
        fall.local_step(b)
    # the devices of failed edge servers skip the round: 2 layer-1 periods x 4 devices per live edge server
    assert bool(down.any()) and skip.last_round_stats["participants_layer1"] == int((~down).sum()) * 4 * 2
    assert fall.last_round_stats["participants_layer1"] == 48  # everyone uploads, some to a fallback server
    assert not bool(fall.population.down.any()) and bool((fall.tree.parent_index(0) != fall.home).any())
    # fallback: a live edge server under the same regional server when there is one, else any live one
    g = torch.Generator().manual_seed(0)
    out = fall.change_tree.fallback(fall, torch.tensor([True, False, True, False, True, True]), g)
    assert out.tolist() == [1] * 12 + [3] * 12
    out = fall.change_tree.fallback(fall, torch.tensor([False, True, True, True, True, True]), g)
    assert out.tolist() == [0] * 24


def test_mobility_state_is_checkpointed():
    mob = RandomReassociation(0.3, every=1, mid_period=0.2, failures=EdgeFailures(0.2, "skip"))
    full = _run(_engine(mob), steps=12)
    batches = make_batches(24, 12)
    half = _engine(mob)
    for b in batches[:6]:
        half.local_step(b)
    resumed = _engine(mob)
    resumed.load_state_dict(half.state_dict())
    for b in batches[6:]:
        resumed.local_step(b)
    assert torch.equal(resumed.device_params(), full.device_params())
    assert torch.equal(resumed.tree.parent_index(0), full.tree.parent_index(0))


def test_schedule_file_and_config_values(tmp_path):
    f = tmp_path / "moves.json"
    f.write_text(json.dumps({"boundaries": {"1": [0] * 12 + [5] * 12}}))
    m = make_mobility({"model": "schedule", "file": str(f), "p": None})
    m.check(24, 6, 3)
    assert m.move(1, torch.zeros(24, dtype=torch.long), 6, torch.Generator()).tolist() == [0] * 12 + [5] * 12
    r = make_mobility({"model": "random", "p": 0.1, "every": 2, "failures": {"p": 0.05, "mode": "skip"}})
    assert isinstance(r, RandomReassociation) and r.every == 2 and r.failures.p == 0.05
    ring = make_mobility({"model": "markov", "ring_p": 0.5}, num_edges=6)
    assert torch.allclose(ring.transition.sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("build, match", [
    (lambda: _engine(Schedule({0: [7] * 24})), "holds the edge server 7, outside"),
    (lambda: _engine(Schedule({0: [0] * 10})), "has 10 entries but there are 24 devices"),
    (lambda: _engine(Schedule({0: [[0, 1]] * 24})), "must be a list of integer edge-server indices"),
    (lambda: _engine(RandomReassociation(0.1, every=4)), "every=4: the hierarchy has only 3 layers"),
    (lambda: _engine(Markov.ring(5, 0.2)), r"transition is \(5, 5\) but there are 6 edge servers"),
    (lambda: RandomReassociation(1.5), r"p must be a probability in \[0, 1\]"),
    (lambda: Markov([[0.5, 0.6], [0.5, 0.5]]), "rows must be probabilities that sum to 1"),
    (lambda: EdgeFailures(0.1, "reroute"), "mode must be 'skip' or 'fallback'"),
    (lambda: QMLHFLEngine(MLP(), ce_loss, Hierarchy.balanced([4]), [1], None, mobility=RandomReassociation(0.1)),
     "at least N = 2 layers"),
    (lambda: make_mobility({"model": "teleport"}), "unknown mobility model 'teleport'"),
    (lambda: make_mobility({"model": "static", "p": 0.3}), "does not take the options"),
])
def test_bad_input(build, match):
    with pytest.raises(ValueError, match=match):
        build()
