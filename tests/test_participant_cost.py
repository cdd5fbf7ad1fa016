"""Cost in proportion to the participants: with partial participation only the devices of the current layer-1
period are touched (gathered from their parents at its start, trained in a compact stack, written back at its
end), the re-synchronisation leaves the device layer alone, the device optimizer steps the compact stack in place,
and the sampler's per-device work runs on numpy views. Each against a plain reference: the eager per-device view
(``device_params``), a per-device torch optimizer loop, a per-device sampler loop."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_qmlhfl import Hierarchy, QSGD
from lightning_qmlhfl.data import DeviceSampler
from lightning_qmlhfl.federation.participation import Full, UniformK
from lightning_qmlhfl.optimizers.device import DeviceOptimizer
from lightning_qmlhfl.simulation.engine import QMLHFLEngine

from test_engine import MLP, ce_loss, make_batches


def _engine(template, momentum=0.0):
    return QMLHFLEngine(copy.deepcopy(template), ce_loss, Hierarchy.balanced([2, 5]), [3, 2],
                        [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)], optimizer="sgd",
                        optimizer_kwargs={"lr": 0.1, "momentum": momentum}, seed=1,
                        participation=[UniformK(2), Full()])


def test_devices_that_do_not_train_are_never_written():
    """Rows of devices outside the period's draw keep their bytes through aggregations and re-synchronisations;
    the engine presents them as their parents' models (what the eager copy of Eq. 5 would have written)."""
    torch.manual_seed(0)
    e = _engine(MLP())
    trained: set[int] = set()
    untouched = e.state.params[0].clone()
    for b in make_batches(10, 12):
        active = e.upcoming_devices()
        trained |= set(active.tolist())
        e.local_step(b)
    idle = [i for i in range(10) if i not in trained]
    assert e.lazy_devices and idle, "the draw must leave some device out for the test to mean anything"
    assert torch.equal(e.state.params[0][idle], untouched[idle])
    parents = e.state.params[1].index_select(0, e.parent_index[0])
    assert e.step_in_round == 0 and torch.equal(e.device_params(), parents)


def test_a_checkpoint_in_the_middle_of_a_period_resumes_bit_for_bit():
    """The compact stack of the period's devices is written back when the state is saved."""
    torch.manual_seed(0)
    template, batches = MLP(), make_batches(10, 12)
    straight = _engine(template, momentum=0.9)
    for b in batches:
        straight.local_step(b)
    first = _engine(template, momentum=0.9)
    for b in batches[:4]:  # step 4: inside the second layer-1 period (tau_1 = 3)
        first.local_step(b)
    assert first.step_in_round % 3 != 0
    shown = first.device_params()  # from the compact stack
    sd = first.state_dict()
    assert torch.equal(first.device_params(), shown)  # the same, from the rows written back
    resumed = _engine(template, momentum=0.9)
    resumed.load_state_dict(sd)
    for b in batches[4:]:
        resumed.local_step(b)
    assert torch.equal(resumed.cloud_params(), straight.cloud_params())
    assert torch.equal(resumed.device_params(), straight.device_params())
    a, b = resumed.state_dict()["state"], straight.state_dict()["state"]
    assert sorted(a) == sorted(b)
    for k in a:  # every declared row: models, momentum, counters, population
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.3),
                                    dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01)])
def test_step_rows_with_devices_of_different_step_counts_equals_a_per_device_optimizer(kwargs):
    """Devices that stepped 0, 1 or 3 times before, stepped together: each exactly as its own torch.optim.SGD."""
    torch.manual_seed(0)
    D, P = 6, 11
    start = torch.randn(D, P)
    stack = torch.nn.Parameter(start.clone())
    opt = DeviceOptimizer(stack.data, torch.optim.SGD, kwargs)
    refs = [torch.nn.Parameter(start[i].clone()) for i in range(D)]
    ref_opts = [torch.optim.SGD([p], **kwargs) for p in refs]
    history = [[0, 1, 2, 3], [0, 1], [2, 3, 4, 5], [0, 2, 4]]  # the devices stepping in each step
    for rows in history:
        rows_t = torch.tensor(rows)
        grads = torch.randn(len(rows), P)
        compact = stack.data.index_select(0, rows_t)
        opt.step_rows(rows_t, compact, grads)
        stack.data[rows_t] = compact
        for j, i in enumerate(rows):
            refs[i].grad = grads[j].clone()
            ref_opts[i].step()
    torch.testing.assert_close(stack.data, torch.stack([p.data for p in refs]), atol=0, rtol=0)
    assert opt.device_steps.tolist() == [3, 2, 3, 2, 2, 1]


def _reference_sampler(parts, batch, seed, steps):
    """Every device walks its own permutation, drawn from one generator: a device that runs out inside a batch
    reshuffles at once (devices in order); one that ends exactly at the batch's end reshuffles after them."""
    g = torch.Generator().manual_seed(seed)
    perms = [p[torch.randperm(len(p), generator=g)] for p in parts]
    pos = [0] * len(parts)
    out = []
    for rows in steps:
        devices = list(range(len(parts))) if rows is None else rows.tolist()
        batch_rows, ended = [], []
        for i in devices:
            n = len(parts[i])
            if pos[i] + batch <= n:
                batch_rows.append(perms[i][pos[i]:pos[i] + batch].tolist())
                pos[i] += batch
                if pos[i] == n:
                    ended.append(i)
                continue
            take = []
            while len(take) < batch:
                k = min(batch - len(take), n - pos[i])
                take += perms[i][pos[i]:pos[i] + k].tolist()
                pos[i] += k
                if pos[i] == n:
                    perms[i], pos[i] = parts[i][torch.randperm(n, generator=g)], 0
            batch_rows.append(take)
        for i in ended:
            perms[i], pos[i] = parts[i][torch.randperm(len(parts[i]), generator=g)], 0
        out.append(torch.tensor(batch_rows))
    return out


def test_the_sampler_equals_a_per_device_loop_when_devices_run_out_often():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randperm(5000, generator=g)[:int(n)] for n in torch.randint(3, 70, (40,), generator=g)]
    steps = [None if k % 4 == 0 else torch.randperm(40, generator=g)[:7].sort().values for k in range(60)]
    s = DeviceSampler(parts, 16, seed=9)
    got = [s.next_indices(rows) for rows in steps]
    want = _reference_sampler(parts, 16, 9, steps)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
