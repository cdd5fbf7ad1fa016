"""The engine's CPU speed-ups, each against its plain counterpart: the "fast" storage order of the stacked rows,
the threaded loop executor and the allocator setting (the numba aggregation kernel is tested in test_kernels)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_qmlhfl import QSGD, Hierarchy
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.simulation.executors import LoopExecutor
from lightning_qmlhfl.simulation.stacked import ParamLayout


class Net(nn.Module):
    """Conv2d + BatchNorm + Dropout + Linear: every kind of parameter the storage order treats differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


def loss_with_aux(module, batch):
    x, y = batch
    out = module(x)
    return F.cross_entropy(out, y), {"acc": (out.argmax(1) == y).float().mean()}


def batch_for(devices, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(devices, b, 2, 6, 6, generator=g), torch.randint(0, 3, (devices, b), generator=g)


# ---------------------------------------------------------------- storage order
def test_fast_order_stores_linear_transposed_and_conv_channels_last():
    torch.manual_seed(0)
    m = Net()
    fast = ParamLayout.of_parameters(m, "fast")
    module = ParamLayout.of_parameters(m, "module")
    sd = dict(m.named_parameters())
    row = fast.flatten(sd)
    # the flat row, written out: conv weight as [out, kh, kw, in], Linear weight as [in, out], the rest as is
    expected = torch.cat([sd["conv.weight"].permute(0, 2, 3, 1).reshape(-1), sd["conv.bias"],
                          sd["bn.weight"], sd["bn.bias"], sd["fc.weight"].t().reshape(-1), sd["fc.bias"]])
    assert torch.equal(row, expected.detach())
    assert torch.equal(module.flatten(sd), torch.nn.utils.parameters_to_vector(m.parameters()).detach())
    # the views are the module's tensors again, with the storage's strides
    views = fast.views(row)
    for name, t in sd.items():
        assert views[name].shape == t.shape and torch.equal(views[name], t.detach())
    assert views["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert views["fc.weight"].t().is_contiguous()
    # stacked [rows, P] views keep the leading dimension
    stack = torch.stack([row, 2 * row])
    assert torch.equal(fast.views(stack)["fc.weight"][1], 2 * sd["fc.weight"].detach())


def test_bad_param_order():
    with pytest.raises(ValueError, match="param_order must be 'fast' or 'module', got 'rows'"):
        QMLHFLEngine(Net(), loss_with_aux, Hierarchy.balanced([2]), (1,), param_order="rows")
    with pytest.raises(ValueError, match=r"storage order \(0, 0\) of 'w' is not a permutation"):
        ParamLayout([("w", torch.zeros(2, 3))], {"w": (0, 0)})


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_gradients_arrive_in_the_storage_strides(executor):
    """The point of the fast order: each executor's weight gradient has its stored parameter's strides, so the
    optimiser's update walks both contiguously. Checked on the executor's own output."""
    torch.manual_seed(0)
    e = QMLHFLEngine(Net(), loss_with_aux, Hierarchy.balanced([3]), (1,), executor=executor)
    grads, _, _ = e.executor(e.state.params[0], e.state.buffers[0], batch_for(3))
    params = e.state.param_layout.views(e.state.params[0])
    if executor == "loop":  # one [rows, P] stack in storage order
        grads = list(e.state.param_layout.views(grads).values())
    # (under vmap a convolution becomes a grouped one whose weight gradient comes in the module layout)
    matched = ("conv.weight", "fc.weight") if executor == "loop" else ("fc.weight",)
    for (name, p), g in zip(params.items(), grads):
        if name in matched:
            assert g.stride()[1:] == p.stride()[1:], (name, g.stride(), p.stride())  # within a device


def test_module_and_fast_orders_train_the_same_models_without_quantization():
    """Storage order only changes which entries share a bucket and which draw each gets: unquantized, the two
    orders train the same models. (Dropout is off: its mask is drawn in the activations' memory order, which is
    channels-last after a channels-last convolution, so the masks differ between the orders.)"""
    h = Hierarchy.balanced([2, 2])
    batches = [batch_for(4, seed=s) for s in range(4)]
    out = {}
    for order in ("fast", "module"):
        torch.manual_seed(0)
        net = Net()
        net.drop.p = 0.0
        e = QMLHFLEngine(net, loss_with_aux, h, (2, 1), None, optimizer_kwargs={"lr": 0.1}, executor="loop",
                         param_order=order)
        torch.manual_seed(1)
        for b in batches:
            e.local_step(b)
        out[order] = e.load_cloud_into(copy.deepcopy(e.module)).state_dict()
    for k, v in out["fast"].items():
        torch.testing.assert_close(v, out["module"][k], atol=1e-6, rtol=1e-5)


def test_checkpoint_of_another_order_is_refused():
    h = Hierarchy.balanced([2])
    torch.manual_seed(0)
    fast = QMLHFLEngine(Net(), loss_with_aux, h, (1,), [QSGD(4, bucket_size=None)])
    module = QMLHFLEngine(Net(), loss_with_aux, h, (1,), [QSGD(4, bucket_size=None)], param_order="module")
    with pytest.raises(ValueError, match="another parameter layout .* param_order the checkpoint was made with"):
        module.load_state_dict(fast.state_dict())
    # checkpoints from before the order was recorded were in module order
    old = module.state_dict()
    del old["param_layout"]
    module.load_state_dict(old)
    with pytest.raises(ValueError, match="another parameter layout"):
        fast.load_state_dict(old)


# ---------------------------------------------------------------- threaded loop executor
def _loop_once(threads, seed=3):
    torch.manual_seed(0)
    e = QMLHFLEngine(Net(), loss_with_aux, Hierarchy.balanced([7]), (1,), executor="loop")
    e.executor.threads = threads
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # workers are capped by the intra-op thread count
    try:
        assert e.executor._workers(e.state.params[0]) == threads
        torch.manual_seed(seed)
        grads, losses, aux = e.executor(e.state.params[0], e.state.buffers[0], batch_for(7))
        assert torch.get_num_threads() == 3  # the workers' own counts did not leak into this thread
    finally:
        torch.set_num_threads(before)
    return grads, losses, aux, e.state.buffers[0].clone(), torch.get_rng_state()


def test_threaded_loop_equals_the_plain_loop():
    """Dropout masks (torch's global generator), BatchNorm statistics and logged values come out as in the plain
    loop, because the forwards keep their row order; values agree to float tolerance (a worker's single intra-op
    thread may sum in another order than three)."""
    g1, l1, a1, b1, rng1 = _loop_once(threads=1)
    g3, l3, a3, b3, rng3 = _loop_once(threads=3)
    torch.testing.assert_close(l1, l3, atol=1e-6, rtol=1e-6)  # other masks would differ by ~0.1
    assert torch.equal(a1["acc"], a3["acc"])
    assert torch.equal(rng1, rng3)  # the same number of draws, in the same order
    torch.testing.assert_close(b1, b3, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g1, g3, atol=1e-6, rtol=1e-6)
    assert len(set(l1.tolist())) == 7  # dropout differs per device


def test_threaded_loop_stops_on_the_first_error():
    torch.manual_seed(0)
    calls = []

    def failing(module, batch):
        calls.append(threading.get_ident())
        if len(calls) == 4:
            raise RuntimeError("device 3 failed")
        return loss_with_aux(module, batch)

    e = QMLHFLEngine(Net(), failing, Hierarchy.balanced([8]), (1,), executor="loop")
    e.executor.threads = 2
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="device 3 failed"):
        e.executor(e.state.params[0], e.state.buffers[0], batch_for(8))
    assert len(calls) == 4  # nobody started device 4 after device 3 failed
    assert torch.get_num_threads() == before


def test_loop_threads_validation():
    with pytest.raises(ValueError, match="threads must be None or an integer >= 1, got 0"):
        LoopExecutor(Net(), loss_with_aux, ParamLayout([]), ParamLayout([]), threads=0)


# ---------------------------------------------------------------- draws and allocator
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_setting_applies_once_and_can_be_switched_off():
    code = "from lightning_qmlhfl.simulation.cpu_alloc import retain_large_allocations as r; print(r(), r())"
    env = {k: v for k, v in os.environ.items() if k != "QMLHFL_KEEP_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "QMLHFL_KEEP_MALLOC": "1"})
    import platform

    expected = "True True" if platform.libc_ver()[0] == "glibc" else "False False"
    assert on.stdout.split() == expected.split()
    assert off.stdout.split() == ["False", "False"]


def test_gather_batch_is_advanced_indexing():
    from lightning_qmlhfl.simulation.engine import gather_batch

    data = torch.randn(50, 3, 4)
    idx = torch.randint(0, 50, (6, 5))
    assert torch.equal(gather_batch(data, idx), data[idx])
    labels = torch.randint(0, 9, (50,))
    assert torch.equal(gather_batch(labels, idx), labels[idx])


class Tied(nn.Module):
    """A weight shared by two Linear layers, and an LSTM (its class overrides __setattr__)."""

    def __init__(self, lstm=False):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.rnn = nn.LSTM(4, 4, batch_first=True) if lstm else None

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        if self.rnn is not None:
            h = self.rnn(h.unsqueeze(1))[0].squeeze(1)
        return h


@pytest.mark.parametrize("lstm", [False, True])
def test_loop_parameter_swap_matches_functional_call(lstm):
    """The loop executor's direct parameter swap (tied weights swapped at every alias) gives functional_call's
    gradients; modules with their own __setattr__ (LSTM) use functional_call."""
    torch.manual_seed(0)
    m = Tied(lstm)
    layout = ParamLayout.of_parameters(m)
    params = torch.stack([layout.flatten(dict(m.named_parameters())) + 0.01 * k for k in range(3)])
    x, y = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))

    def loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    ex = LoopExecutor(m, loss, layout, ParamLayout([]), threads=1)
    assert (ex._swap is None) == lstm
    grads, losses, _ = ex(params, torch.zeros(3, 0), (x, y))
    for i in range(3):
        leaves = {k: v.detach().requires_grad_(True) for k, v in layout.views(params[i]).items()}
        out = torch.func.functional_call(m, leaves, (x[i],))
        expected = torch.autograd.grad(F.cross_entropy(out, y[i]), list(leaves.values()))
        for g, view in zip(expected, layout.views(grads[i]).values()):
            torch.testing.assert_close(view, g, atol=1e-6, rtol=1e-6)
    # the template's own parameters are back in place
    assert isinstance(m.a.weight, nn.Parameter) and m.b.weight is m.a.weight


NUMBA_POOL = """
import sys, torch
torch.set_num_threads(1)
from lightning_qmlhfl import QSGD, Hierarchy
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
assert "numba" not in sys.modules  # imported only by the first aggregation
m = torch.nn.Linear(4, 2)
e = QMLHFLEngine(m, lambda mod, b: mod(b[0]).pow(2).mean(), Hierarchy.balanced([2]), [1], [QSGD(4, bucket_size=None)], backend="numba")
e.local_step((torch.randn(2, 3, 4),))
import numba
print(numba.config.NUMBA_NUM_THREADS)
"""


@pytest.mark.parametrize("env, expected", [(None, "1"), ("2", "2")])
def test_the_numba_pool_takes_torchs_thread_count_unless_told(env, expected):
    """A pool larger than torch's threads competes with other processes for the cores (bench/RESULTS.md)."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    if env is not None:
        environ["NUMBA_NUM_THREADS"] = env
    out = subprocess.run([sys.executable, "-c", NUMBA_POOL], capture_output=True, text=True, env=environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == expected


TORCH_COUNT = """
import torch
torch.set_num_threads(2)
from lightning_qmlhfl import QSGD
from lightning_qmlhfl.kernels import aggregate_layer_, row_uniforms
from lightning_qmlhfl.kernels.robust import segment_median
seen = []
aggregate_layer_(torch.zeros(2, 64), torch.randn(4, 64), torch.tensor([0, 0, 1, 1]), torch.full((4,), 0.5), QSGD(4),
                 torch.arange(4), backend="numba")
seen.append(torch.get_num_threads())
row_uniforms(torch.arange(3), 16, "cpu")
seen.append(torch.get_num_threads())
segment_median(torch.randn(6, 32), torch.tensor([0, 0, 0, 1, 1, 1]), 2, backend="numba")
seen.append(torch.get_num_threads())
print(*seen)
"""


def test_numbas_smaller_pool_leaves_torchs_thread_count_alone():
    """With numba's OpenMP layer, setting numba's thread count set torch's too: NUMBA_NUM_THREADS=1 (inherited, say)
    left torch with one thread after the first aggregation, which changed both its speed and its numbers."""
    environ = dict(os.environ, NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", TORCH_COUNT], capture_output=True, text=True, env=environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["2", "2", "2"]
