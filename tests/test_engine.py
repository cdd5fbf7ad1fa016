"""The engine against a slow, obviously-correct reference: a plain loop over node objects.

The reference gives every device its own nn.Module and torch optimiser, every node its own state dict, and
writes Eqs. 4-6 and the Eq. 5 resync as per-node Python code, following ALGORITHM.md section 2 literally
(nested loops: tau_N times { ... tau_2 times { tau_1 local steps; aggregate layer 1 } ... }; aggregate the cloud).

The comparisons with the reference run the engine on ``DEVICE`` (from ``QMLHFL_TEST_DEVICE``, default "cpu"); the
reference always runs on the CPU. On a GPU machine::

    TRITON_INTERPRET=0 QMLHFL_TEST_DEVICE=cuda pytest tests/test_engine.py

runs them with the engine on CUDA, aggregating with the compiled Triton kernels (``backend="auto"``), TF32 off so
that the GPU computes in full fp32 like the reference.
"""

from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_qmlhfl import QSGD, Hierarchy, Identity, NaturalCompression, NoQuantization, RandomK, ScaledSign, TopK
from lightning_qmlhfl import kernels as aggregation_mod
from lightning_qmlhfl.kernels import row_uniforms
from lightning_qmlhfl.rng import row_seeds
from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError, QMLHFLEngine
from lightning_qmlhfl.simulation.stacked import ParamLayout

from helpers.compress_by_hand import compress_by_hand
from helpers.server_optim_by_hand import server_step_by_hand

_DEVICE_NAME = os.environ.get("QMLHFL_TEST_DEVICE", "cpu")
if not re.fullmatch(r"cpu|cuda(:\d+)?", _DEVICE_NAME):
    raise ValueError(f"QMLHFL_TEST_DEVICE must be 'cpu' or 'cuda[:i]', got {_DEVICE_NAME!r}")
DEVICE = torch.device(_DEVICE_NAME)
"""Where the engine runs in the comparisons with the reference (the reference itself runs on the CPU)."""
ON_GPU = DEVICE.type == "cuda"
if ON_GPU and (os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()):
    raise RuntimeError("QMLHFL_TEST_DEVICE=cuda runs the engine with the compiled kernels: it needs a CUDA device "
                       "and TRITON_INTERPRET=0 (conftest.py sets 1 only when it is unset)")


@pytest.fixture(autouse=True)
def _full_fp32_on_gpu():
    """TF32 off on a GPU (cuDNN convolutions default to it): the reference computes in full fp32 on the CPU."""
    if not ON_GPU:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(batch):
    """A batch (x, y) on DEVICE."""
    return tuple(t.to(DEVICE) for t in batch)


# ---------------------------------------------------------------- models and data
class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, classes=3, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d_in, hidden), nn.Linear(hidden, classes), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class SmallCNN(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.flatten(1)))


def ce_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def make_batches(num_devices, steps, shape=(6,), batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, num_devices, batch, *shape, generator=g)
    ys = torch.randint(0, 3, (steps, num_devices, batch), generator=g)
    return [(xs[t], ys[t]) for t in range(steps)]


# The engine's documented "fast" storage order of each test model, written out by hand: the reference's flat
# rows (which QSGD's uniforms index) follow it. Linear weights transposed, Conv2d weights channels-last.
FAST_ORDERS = {
    "MLP": {"fc1.weight": (1, 0), "fc2.weight": (1, 0)},
    "SmallCNN": {"conv.weight": (0, 2, 3, 1), "fc.weight": (1, 0)},
}


# ---------------------------------------------------------------- the slow reference
class RefNode:
    def __init__(self, layer, index, state):
        self.layer, self.index, self.state = layer, index, {k: v.clone() for k, v in state.items()}
        self.children: list[RefNode] = []
        self.parent: RefNode | None = None
        self.mass = 0.0


class ReferenceQMLHFL:
    def __init__(self, template, hierarchy, taus, quantizers, lr, momentum, seed, uniforms_override=None,
                 param_order="fast", server_optimizers=None):
        self.h, self.taus, self.quantizers, self.seed = hierarchy, list(taus), list(quantizers), seed
        self.server = list(server_optimizers) if server_optimizers is not None else [None] * hierarchy.num_layers
        # storage order of each parameter in a flat row (identity when absent)
        self.orders = FAST_ORDERS[type(template).__name__] if param_order == "fast" else {}
        self.param_names = [n for n, _ in template.named_parameters()]
        self.buffer_names = [n for n, b in template.named_buffers() if b.is_floating_point()]
        init = {k: v.detach().clone() for k, v in template.state_dict().items()}
        self.models = [copy.deepcopy(template) for _ in range(hierarchy.num_devices)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in self.models]
        self.layers: list[list[RefNode]] = []
        for n, m in enumerate(hierarchy.nodes_per_layer):
            self.layers.append([RefNode(n, i, init) for i in range(m)])
        for n in range(hierarchy.num_layers):
            for i, p in enumerate(hierarchy.parents[n]):
                child, parent = self.layers[n][i], self.layers[n + 1][p]
                child.parent = parent
                parent.children.append(child)
        for dev in self.layers[0]:
            dev.mass = 1.0
            node = dev.parent
            while node is not None:
                node.mass += 1.0
                node = node.parent
        self.round = 0

    def device_state(self, i):
        m = self.models[i]
        return {k: v.detach().clone() for k, v in m.state_dict().items() if k in self.param_names + self.buffer_names}

    def set_device_state(self, i, state):
        with torch.no_grad():
            sd = self.models[i].state_dict()
            for k, v in state.items():
                sd[k].copy_(v)

    def local_step(self, batch):
        x, y = batch
        for i, (m, opt) in enumerate(zip(self.models, self.opts)):
            opt.zero_grad()
            loss = F.cross_entropy(m(x[i]), y[i])
            loss.backward()
            opt.step()

    def _order(self, k, dim):
        return self.orders.get(k, tuple(range(dim)))

    def _flat(self, state):
        return torch.cat([state[k].permute(self._order(k, state[k].dim())).reshape(-1) for k in self.param_names])

    def _unflat(self, flat, like):
        out, off = {}, 0
        for k in self.param_names:
            t = like[k]
            order = self._order(k, t.dim())
            block = flat[off : off + t.numel()].view(*(t.shape[i] for i in order))
            out[k] = block.permute(*[order.index(i) for i in range(t.dim())])  # back to the module's dims
            off += t.numel()
        return out

    def aggregate(self, n, event):
        """Eq. 4 (n < N) / Eq. 6 (n == N) at every node of layer n, then Eq. 5 down the subtree. Each child node
        keeps its own error-feedback memory (a flat vector), kept across re-synchronisations."""
        q = self.quantizers[n - 1]
        seeds = row_seeds(self.seed, self.round, n, event, self.h.nodes_per_layer[n - 1])
        if n == 1:
            for dev in self.layers[0]:
                dev.state = self.device_state(dev.index)
        for parent in self.layers[n]:
            vp = self._flat(parent.state)
            new_p = vp.clone()
            new_b = {k: parent.state[k].clone() for k in self.buffer_names}
            for child in parent.children:
                w = child.mass / parent.mass
                diff = self._flat(child.state) - vp
                mem = getattr(child, "memory", torch.zeros_like(diff))
                x = diff + mem if q.error_feedback == "ef" else diff - mem if q.error_feedback == "ef21" else diff
                u = row_uniforms(seeds[child.index : child.index + 1], diff.numel(), "cpu")[0].tolist() \
                    if q.uses_uniforms else None
                c = torch.tensor(compress_by_hand(q, x.tolist(), u))
                if q.error_feedback == "ef":
                    child.memory, qd = x - c, c
                elif q.error_feedback == "ef21":
                    child.memory = mem + c
                    qd = child.memory
                else:
                    qd = c
                new_p += w * qd
                for k in self.buffer_names:
                    new_b[k] += w * (child.state[k] - parent.state[k])
            if self.server[n - 1] is not None:
                new_p = server_step_by_hand(self.server[n - 1], parent, vp, new_p - vp)
            parent.state = {**self._unflat(new_p, parent.state), **new_b}
            self._resync(parent)

    def _resync(self, node):
        for child in node.children:
            child.state = {k: v.clone() for k, v in node.state.items()}
            if child.layer == 0:
                self.set_device_state(child.index, child.state)
            self._resync(child)

    def global_round(self, batches):
        """The nested loops of ALGORITHM.md section 2, written recursively."""
        it = iter(batches)
        events = [0] * self.h.num_layers

        def run_layer(n):  # run everything below layer n's aggregation, then aggregate layer n
            for _ in range(self.taus[n - 1]):
                if n == 1:
                    self.local_step(next(it))
                else:
                    run_layer(n - 1)
            self.aggregate(n, events[n - 1])
            events[n - 1] += 1

        run_layer(self.h.num_layers)
        self.round += 1

    def device_matrix(self):
        return torch.stack([self._flat(self.device_state(i)) for i in range(self.h.num_devices)])

    def cloud_flat(self):
        return self._flat(self.layers[-1][0].state)


HIERARCHIES = {
    "N1": (Hierarchy.balanced([4]), [3]),
    "N2": (Hierarchy.balanced([2, 3]), [2, 2]),
    "N3": (Hierarchy.balanced([2, 2, 2]), [2, 1, 2]),
    "N4": (Hierarchy.balanced([2, 1, 2, 2]), [1, 2, 2, 1]),
    "irregular": (Hierarchy.from_parents([[0, 0, 0, 1, 2, 2], [0, 0, 1], [0, 0]]), [2, 2, 1]),
}


def _run_both(hname, quantized, executor, rounds=2, momentum=0.5, param_order="fast", compressors=None,
              server_optimizers=None):
    h, taus = HIERARCHIES[hname]
    torch.manual_seed(0)
    template = MLP()
    qs = [QSGD(s) for s in (4, 8, 2, 16)[: h.num_layers]] if quantized else [NoQuantization()] * h.num_layers
    qs = compressors if compressors is not None else qs
    steps = math.prod(taus) * rounds
    batches = make_batches(h.num_devices, steps)
    engine = QMLHFLEngine(copy.deepcopy(template).to(DEVICE), ce_loss, h, taus, qs, optimizer="sgd",
                          optimizer_kwargs={"lr": 0.2, "momentum": momentum}, executor=executor, seed=7,
                          param_order=param_order, server_optimizers=server_optimizers)
    assert engine.device.type == DEVICE.type
    for b in batches:
        engine.local_step(on_device(b))
    ref = ReferenceQMLHFL(copy.deepcopy(template), h, taus, qs, lr=0.2, momentum=momentum, seed=7,
                          param_order=param_order, server_optimizers=server_optimizers)
    per_round = math.prod(taus)
    for r in range(rounds):
        ref.global_round(batches[r * per_round : (r + 1) * per_round])
    return engine, ref


@pytest.mark.parametrize("hname", list(HIERARCHIES))
@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_engine_matches_reference_unquantized(hname, executor):
    engine, ref = _run_both(hname, quantized=False, executor=executor)
    assert engine.round == 2
    torch.testing.assert_close(engine.state.params[0].cpu(), ref.device_matrix(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(engine.cloud_params().cpu(), ref.cloud_flat(), atol=1e-6, rtol=1e-6)
    # every intermediate node equals the reference node too
    for n in range(1, engine.N + 1):
        mine = engine.state.params[n].cpu()
        theirs = torch.stack([ref._flat(node.state) for node in ref.layers[n]])
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hname,param_order", [("N1", "fast"), ("N2", "fast"), ("N3", "fast"),
                                               ("irregular", "fast"), ("N3", "module")])
def test_engine_matches_reference_quantized(hname, param_order):
    engine, ref = _run_both(hname, quantized=True, executor="vmap", param_order=param_order)
    torch.testing.assert_close(engine.state.params[0].cpu(), ref.device_matrix(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.cloud_params().cpu(), ref.cloud_flat(), atol=1e-5, rtol=1e-5)


COMPRESSOR_SETS = {
    "topk-ef/sign-ef21/natural": [TopK(ratio=0.3, error_feedback="ef"), ScaledSign(bucket_size=16,
                                  error_feedback="ef21"), NaturalCompression()],
    "randomk/qsgd-ef/identity-ef": [RandomK(ratio=0.5), QSGD(4, bucket_size=20, error_feedback="ef"),
                                    Identity("ef")],
    "sign-ef/natural-ef/topk-ef21": [ScaledSign(error_feedback="ef"), NaturalCompression("ef"),
                                     TopK(k=10, error_feedback="ef21")],
}


@pytest.mark.parametrize("name", list(COMPRESSOR_SETS))
def test_engine_matches_reference_with_compressors_and_error_feedback(name):
    """Every compressor, with and without EF/EF21, in the engine (fused numba paths and the torch reference)
    against the per-node loop with per-node memory, over rounds that re-synchronise every node."""
    engine, ref = _run_both("N3", quantized=False, executor="vmap", rounds=3, compressors=COMPRESSOR_SETS[name])
    torch.testing.assert_close(engine.state.params[0].cpu(), ref.device_matrix(), atol=1e-5, rtol=1e-5)
    for n in range(1, engine.N + 1):
        theirs = torch.stack([ref._flat(node.state) for node in ref.layers[n]])
        torch.testing.assert_close(engine.state.params[n].cpu(), theirs, atol=1e-5, rtol=1e-5)
        if engine.memory[n - 1] is not None:  # every sender's memory row, kept across the resyncs
            mem = torch.stack([getattr(node, "memory", torch.zeros(engine.num_params)) for node in ref.layers[n - 1]])
            torch.testing.assert_close(engine.memory[n - 1].cpu(), mem, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(COMPRESSOR_SETS))
def test_fused_backend_equals_the_torch_reference_in_the_engine(name, dtype):
    """The engine on DEVICE with ``backend="auto"`` (CUDA: the Triton kernels; CPU: numba for float32) against the
    same engine with the torch reference aggregation, over rounds with every compressor and error feedback, fp32
    and bf16 storage. Same device, same local steps, same draws: only the aggregation arithmetic differs (fp32:
    rounding; bf16 storage: a rounding difference can move an entry by one bf16 ulp and the runs drift apart by a
    few of them)."""
    h, taus = HIERARCHIES["N3"]
    batches = make_batches(h.num_devices, math.prod(taus) * 3)
    runs = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        e = QMLHFLEngine(MLP().to(device=DEVICE, dtype=dtype), ce_loss, h, taus, COMPRESSOR_SETS[name],
                         optimizer="sgd", optimizer_kwargs={"lr": 0.2, "momentum": 0.5}, executor="vmap", seed=7,
                         backend=backend)
        for x, y in batches:
            e.local_step((x.to(device=DEVICE, dtype=dtype), y.to(DEVICE)))
        runs[backend] = e
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    fused, ref = runs["auto"], runs["torch"]
    for n in range(fused.N + 1):
        assert fused.state.params[n].dtype == dtype
        torch.testing.assert_close(fused.state.params[n].float().cpu(), ref.state.params[n].float().cpu(),
                                   atol=tol, rtol=tol)
    for n in range(fused.N):
        if fused.memory[n] is not None:
            torch.testing.assert_close(fused.memory[n].cpu(), ref.memory[n].cpu(), atol=tol, rtol=tol)
    assert fused.bits_sent == ref.bits_sent


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_bf16_mixed_steps_follow_the_fp32_reference(executor):
    """Local steps under ``torch.autocast(bfloat16)`` on DEVICE, as the strategy runs ``precision="bf16-mixed"``:
    the stacked state, optimizer and aggregation stay fp32, only the forward and backward run in bf16, so the run
    stays within bf16's precision of the fp32 reference (no quantization here: a stochastic rounding step would
    turn a bf16-sized difference into a level's jump)."""
    h, taus = HIERARCHIES["N2"]
    torch.manual_seed(0)
    template = MLP()
    qs = [NoQuantization()] * h.num_layers
    batches = make_batches(h.num_devices, math.prod(taus) * 2)
    engine = QMLHFLEngine(copy.deepcopy(template).to(DEVICE), ce_loss, h, taus, qs, optimizer="sgd",
                          optimizer_kwargs={"lr": 0.2, "momentum": 0.5}, executor=executor, seed=7)
    for b in batches:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            engine.local_step(on_device(b))
    assert engine.state.params[0].dtype == torch.float32 and engine.round == 2
    ref = ReferenceQMLHFL(copy.deepcopy(template), h, taus, qs, lr=0.2, momentum=0.5, seed=7)
    for r in range(2):
        ref.global_round(batches[r * math.prod(taus) : (r + 1) * math.prod(taus)])
    got, want = engine.state.params[0].cpu(), ref.device_matrix()
    assert not torch.equal(got, want), "autocast had no effect"
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_identity_with_error_feedback_equals_the_uncompressed_run():
    a, _ = _run_both("N2", quantized=False, executor="loop", compressors=[Identity("ef"), Identity("ef")])
    b, _ = _run_both("N2", quantized=False, executor="loop", compressors=[Identity(), Identity()])
    assert torch.equal(a.state.params[0], b.state.params[0]) and torch.equal(a.cloud_params(), b.cloud_params())
    assert all(torch.equal(m, torch.zeros_like(m)) for m in a.memory)


def test_error_feedback_memory_is_checkpointed():
    h, taus = HIERARCHIES["N2"]
    cs = [TopK(ratio=0.2, error_feedback="ef"), QSGD(4)]
    batches = make_batches(h.num_devices, 8)
    torch.manual_seed(0)
    template = MLP()
    full = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, cs, optimizer_kwargs={"lr": 0.2}, seed=1)
    for b in batches:
        full.local_step(b)
    half = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, cs, optimizer_kwargs={"lr": 0.2}, seed=1)
    for b in batches[:4]:
        half.local_step(b)
    sd = half.state_dict()
    assert sd["state"]["memory/1"].abs().sum() > 0 and "memory/2" not in sd["state"]
    resumed = QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, cs, optimizer_kwargs={"lr": 0.2}, seed=1)
    resumed.load_state_dict(sd)
    for b in batches[4:]:
        resumed.local_step(b)
    assert torch.equal(resumed.state.params[0], full.state.params[0]) and torch.equal(resumed.memory[0],
                                                                                         full.memory[0])
    with pytest.raises(ValueError, match="compressors="):
        QMLHFLEngine(copy.deepcopy(template), ce_loss, h, taus, [QSGD(4), QSGD(4)], optimizer_kwargs={"lr": 0.2},
                     seed=1).load_state_dict(sd)


def test_batchnorm_buffers_match_reference():
    """Float buffers follow the documented policy: simulated per device, averaged exactly (no quantization)."""
    h, taus = Hierarchy.balanced([2, 2]), [2, 1]
    torch.manual_seed(0)
    template = SmallCNN()
    batches = make_batches(h.num_devices, 4, shape=(1, 6, 6))
    engine = QMLHFLEngine(copy.deepcopy(template).to(DEVICE), ce_loss, h, taus, [QSGD(8), NoQuantization()],
                          optimizer_kwargs={"lr": 0.1}, executor="loop", seed=3)
    for b in batches:
        engine.local_step(on_device(b))
    ref = ReferenceQMLHFL(copy.deepcopy(template), h, taus, [QSGD(8), NoQuantization()], 0.1, 0.0, seed=3)
    ref.global_round(batches[:2])
    ref.global_round(batches[2:])
    torch.testing.assert_close(engine.state.params[0].cpu(), ref.device_matrix(), atol=1e-5, rtol=1e-5)
    ref_buf = torch.cat([ref.layers[-1][0].state[k].reshape(-1) for k in ref.buffer_names])
    torch.testing.assert_close(engine.state.cloud_buffers().cpu(), ref_buf, atol=1e-6, rtol=1e-6)
    # the cloud model really was loaded into a module with its running statistics
    m = engine.load_cloud_into(SmallCNN())
    torch.testing.assert_close(m.bn.running_mean, ref.layers[-1][0].state["bn.running_mean"])


def test_schedule_counts_tau_2_3_2_2(monkeypatch):
    h = Hierarchy.balanced([2, 1, 1, 2])
    taus = (2, 3, 2, 2)
    calls = {"local": 0, "agg": [0, 0, 0, 0]}
    engine = QMLHFLEngine(MLP(), ce_loss, h, taus, None, optimizer_kwargs={"lr": 0.01}, executor="vmap")
    real_exec = engine.executor

    def counting_exec(p, b, batch, *rest):
        calls["local"] += 1
        return real_exec(p, b, batch, *rest)

    real_agg = aggregation_mod.aggregate_layer_

    def counting_agg(parent, child, *a, **k):
        # identify the layer by the parent's row count against the hierarchy (layers have distinct sizes here)
        n = [engine.state.params[m].data_ptr() for m in range(5)].index(parent.data_ptr())
        calls["agg"][n - 1] += 1
        return real_agg(parent, child, *a, **k)

    engine.executor = counting_exec
    monkeypatch.setattr("lightning_qmlhfl.simulation.stages.aggregate_layer_", counting_agg)
    batches = make_batches(h.num_devices, 24)
    for t, b in enumerate(batches):
        r = engine.local_step(b)
        assert r.round_completed == (t == 23)
    assert calls["local"] == 24
    assert calls["agg"] == [12, 4, 2, 1]
    assert engine.round == 1 and engine.aggregation_counts == [12, 4, 2, 1]


def test_bits_accounting_per_round():
    h = Hierarchy.balanced([2, 3])
    engine = QMLHFLEngine(MLP(), ce_loss, h, (2, 3), [QSGD(8), QSGD(4)], optimizer_kwargs={"lr": 0.01})
    d = engine.num_params
    for b in make_batches(6, 6):
        engine.local_step(b)
    # 3 layer-1 aggregations with 6 uploads each; 1 cloud aggregation with 2 uploads
    assert engine.bits_sent == [3 * 6 * (32 + 5 * d), 1 * 2 * (32 + 4 * d)]
    assert engine.baseline_bits == [3 * 6 * 32 * d, 2 * 32 * d]
    assert engine.round_bits == engine.bits_sent


def _dropout_off(m):
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


@pytest.mark.parametrize("model_fn, shape", [(lambda: MLP(dropout=0.5), (6,)),
                                             (lambda: SmallCNN(dropout=0.5), (1, 6, 6))])
def test_executors_agree(model_fn, shape):
    """vmap and loop give the same numbers (dropout layers present; masks made deterministic by p=0)."""
    h = Hierarchy.balanced([2, 2])
    batches = make_batches(4, 8, shape=shape)
    results = {}
    for ex in ("vmap", "loop"):
        torch.manual_seed(0)
        # SGD with momentum: Adam would turn fp-rounding-sized gradient differences near 0 into +-lr steps.
        e = QMLHFLEngine(_dropout_off(model_fn()).to(DEVICE), ce_loss, h, (2, 2), [QSGD(4), QSGD(8)],
                         optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9}, executor=ex, seed=1)
        for b in batches:
            e.local_step(on_device(b))
        results[ex] = (e.state.params[0].cpu(), e.state.buffers[0].cpu())
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["vmap"][1], results["loop"][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_dropout_differs_per_device(executor):
    """With active dropout, devices holding identical weights and batches still draw different masks."""
    h = Hierarchy.balanced([4])
    torch.manual_seed(0)
    e = QMLHFLEngine(MLP(hidden=64, dropout=0.5), ce_loss, h, (5,), None, optimizer_kwargs={"lr": 0.01},
                     executor=executor)
    x = torch.randn(1, 8, 6).expand(4, 8, 6).contiguous()
    y = torch.zeros(4, 8, dtype=torch.long)
    r = e.local_step((x, y))
    assert len(set(r.losses.tolist())) == 4


def test_auto_executor_rule():
    h = Hierarchy.balanced([2])
    assert QMLHFLEngine(MLP(), ce_loss, h, (1,)).executor_name == "vmap"
    assert QMLHFLEngine(SmallCNN(), ce_loss, h, (1,)).executor_name == "loop"


def test_nan_upload_stops_with_layer_node_round():
    h = Hierarchy.balanced([2, 2])
    e = QMLHFLEngine(MLP(), ce_loss, h, (1, 1), [QSGD(4), QSGD(4)], optimizer_kwargs={"lr": 0.1})
    x, y = make_batches(4, 1)[0]
    e.local_step((x, y))
    x = x.clone()
    x[3, 0, 0] = float("nan")
    before = [p.clone() for p in e.state.params[1:]]
    with pytest.raises(NonFiniteUpdateError, match="node 3 of layer 0 to layer 1 in global round 1") as info:
        e.local_step((x, y))
    assert (info.value.layer, info.value.node, info.value.round) == (1, 3, 1)
    for b, p in zip(before, e.state.params[1:]):
        assert torch.equal(b, p)  # the parent was not poisoned


def test_state_dict_roundtrip_continues_identically():
    h = Hierarchy.balanced([2, 2])
    batches = make_batches(4, 12)

    def make():
        torch.manual_seed(0)
        return QMLHFLEngine(MLP(), ce_loss, h, (2, 3), [QSGD(4), QSGD(8)], optimizer="adam",
                            optimizer_kwargs={"lr": 0.01}, seed=5)

    a = make()
    for b in batches:
        a.local_step(b)
    b_eng = make()
    for b in batches[:5]:
        b_eng.local_step(b)
    sd = b_eng.state_dict()
    c = make()
    c.load_state_dict(sd)
    for b in batches[5:]:
        c.local_step(b)
    assert torch.equal(a.state.params[0], c.state.params[0])
    assert torch.equal(a.cloud_params(), c.cloud_params())
    assert a.bits_sent == c.bits_sent


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "taus, quantizers, match",
    [
        ((1,), None, "taus has length 1 but the hierarchy has N = 2"),
        ((1, 0), None, "tau_2 must be an integer >= 1, got 0"),
        ((1, 2.5), None, "tau_2 must be an integer >= 1"),
        ((1, 1), [QSGD(4)], "compressors has length 1 but the hierarchy has N = 2"),
        ((1, 1), [4, 0], "levels must be an integer >= 1"),
    ],
)
def test_engine_bad_input(taus, quantizers, match):
    with pytest.raises(ValueError, match=match):
        QMLHFLEngine(MLP(), ce_loss, Hierarchy.balanced([2, 2]), taus, quantizers)


def test_unsupported_optimizer_and_integer_params():
    h = Hierarchy.balanced([2])
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        QMLHFLEngine(MLP(), ce_loss, h, (1,), optimizer=torch.optim.LBFGS)
    with pytest.raises(ValueError, match="'lion' is not supported; allowed"):
        QMLHFLEngine(MLP(), ce_loss, h, (1,), optimizer="lion")
    m = MLP()
    # an integer parameter cannot require grad: it is frozen, i.e. not stacked, trained or sent
    m.register_parameter("count", nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False))
    e = QMLHFLEngine(m, ce_loss, h, (1,))
    assert "count" not in e.state.param_layout.names
    assert e.num_params == sum(p.numel() for n, p in m.named_parameters() if n != "count")
    with pytest.raises(TypeError, match="'count' has dtype torch.int64"):
        ParamLayout.of_parameters(m)  # the layout of every parameter refuses it, naming it
    with pytest.raises(ValueError, match="executor must be"):
        QMLHFLEngine(MLP(), ce_loss, h, (1,), executor="threads")
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch', 'numba' or 'triton', got 'cuda'"):
        QMLHFLEngine(MLP(), ce_loss, h, (1,), backend="cuda")


@pytest.mark.parametrize("quantizer", [QSGD(8), QSGD(3, bucket_size=7), QSGD(1), NoQuantization()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fast_torch_aggregation_equals_encode_decode(quantizer, dtype):
    """The in-place fast path of aggregate_layer_torch_ == the quantizer's public encode/decode, number for number
    (same draws), including zero rows, an irregular parent assignment and chunk boundaries (P = 300 000 gives
    one row per ~1 MB chunk)."""
    torch.manual_seed(0)
    # (13, 4, 300 000): the seeded draws come in blocks of 6 rows, the next block drawn while one is quantized
    for C, M, P in [(7, 3, 1001), (5, 2, 300_000), (13, 4, 300_000)]:
        parent_index = torch.tensor([0, 2, 2, 1, 0, 2, 1, 3, 3, 0, 1, 2, 3][:C]).clamp(max=M - 1)
        parent = torch.randn(M, P).to(dtype)
        child = (parent.float()[parent_index] + 0.1 * torch.randn(C, P)).to(dtype)
        child[1] = parent[parent_index[1]]  # a zero upload
        weights = torch.rand(C)
        seeds = row_seeds(3, 1, 2, 0, C)
        expected = parent.float().clone()
        diff = child.float() - parent.float()[parent_index]
        if quantizer.is_identity:
            q = diff
        else:
            enc = quantizer.encode(diff, uniforms=row_uniforms(seeds, P, "cpu"))
            q = quantizer.decode(enc, P)
            assert torch.equal(q[1], torch.zeros(P))
        acc = torch.zeros(M, P).index_add_(0, parent_index, q * weights[:, None])
        expected = (expected + acc).to(dtype)
        got = parent.clone()
        aggregation_mod.aggregate_layer_torch_(got, child, parent_index, weights, quantizer, seeds)
        assert got.dtype == dtype and torch.equal(got, expected)
