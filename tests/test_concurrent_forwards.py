"""The loop executor's concurrent forwards (``forwards="concurrent"``) against its ordered loop and the plain
one-row-at-a-time loop: the same numbers for steps whose rows do not depend on each other, a clear error for
those whose do, and no chain between the workers."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_qmlhfl import Hierarchy, QMLHFLStrategy, SimulationConfig
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.simulation.executors import LoopExecutor
from lightning_qmlhfl.simulation.stacked import ParamLayout
from lightning_qmlhfl.simulation.step_guard import ConcurrentStepError


class ConvBN(nn.Module):
    """Conv2d + BatchNorm (per-row running statistics, a shared integer counter) + Linear, no random draws."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def loss_with_aux(module, batch):
    x, y = batch
    out = module(x)
    return F.cross_entropy(out, y), {"acc": (out.argmax(1) == y).float().mean()}


def batches(devices, steps, b=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(devices, b, 2, 6, 6, generator=g), torch.randint(0, 3, (devices, b), generator=g))
            for _ in range(steps)]


def train(forwards, workers, module=ConvBN, loss=loss_with_aux, devices=9, steps=6, device_rng="global"):
    """Six steps of a [3, 3] tree (tau 2, 1) on the loop executor; every row's result and the logged values."""
    torch.manual_seed(0)
    e = QMLHFLEngine(module(), loss, Hierarchy.balanced([3, 3]), (2, 1), executor="loop", forwards=forwards,
                     optimizer_kwargs={"lr": 0.1}, device_rng=device_rng)
    e.executor.threads = workers
    before = torch.get_num_threads()
    torch.set_num_threads(workers)  # the workers are capped by the intra-op thread count
    out = []
    try:
        for batch in batches(devices, steps):
            losses, aux = e.compute_gradients(batch)
            e.apply_step()
            out.append((losses.clone(), aux.get("acc", losses).clone(), torch.get_rng_state()))
        assert torch.get_num_threads() == workers  # the workers' own counts did not leak into this thread
    finally:
        torch.set_num_threads(before)
    return e, out


def test_concurrent_rows_give_the_ordered_loops_numbers():
    """Bit for bit at equal workers (each row runs on one worker with the same intra-op threads either way), and
    equal to float tolerance to the plain loop of one worker with one thread."""
    for workers in (2, 3):
        ordered, o_out = train("ordered", workers)
        concurrent, c_out = train("concurrent", workers)
        assert concurrent.executor.forwards == "concurrent"
        for p, q in zip(ordered.state.params, concurrent.state.params):
            assert torch.equal(p, q)
        assert torch.equal(ordered.state.buffers[0], concurrent.state.buffers[0])  # BatchNorm statistics per row
        for (l1, a1, _), (l2, a2, _) in zip(o_out, c_out):
            assert torch.equal(l1, l2) and torch.equal(a1, a2)
        # the shared integer buffer (num_batches_tracked) holds the count of one row's steps, as in the plain loop
        assert int(concurrent.executor._int_buffers["bn.num_batches_tracked"]) == 6
    plain, p_out = train("ordered", 1)
    for p, q in zip(plain.state.params, concurrent.state.params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert len(set(p_out[0][0].tolist())) == 9  # the rows differ (each its own batch)


class Stall(nn.Module):
    """Row 0's forward sleeps: the other worker should meanwhile run every other row."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_no_worker_waits_for_a_stalled_one():
    """The chain the ordered loop keeps (forward i + 1 after forward i) is gone: while the worker holding row 0
    sleeps, the other takes every other row. In the ordered loop it waits for row 0's forward."""
    ran: dict[int, list[int]] = {}

    def loss(module, batch):
        x, y = batch
        row = int(y[0])
        ran.setdefault(threading.get_ident(), []).append(row)
        if row == 0:
            time.sleep(0.3)
        return F.cross_entropy(module(x), y % 2)

    rows = 12
    layout = ParamLayout(list(Stall().named_parameters()))
    params = torch.randn(rows, layout.size)
    batch = (torch.randn(rows, 4, 3), torch.arange(rows).repeat_interleave(4).reshape(rows, 4))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for forwards in ("concurrent", "ordered"):
            ran.clear()
            ex = LoopExecutor(Stall(), loss, layout, ParamLayout([]), threads=2, forwards=forwards)
            ex(params, torch.zeros(rows, 0), batch)
            stalled = next(rs for rs in ran.values() if 0 in rs)
            other = next(rs for rs in ran.values() if 0 not in rs)
            if forwards == "concurrent":
                assert sorted(other) == list(range(1, rows)) and stalled == [0]
            else:
                assert other == list(range(1, rows, 2))  # its rows in turn, after row 0's forward
    finally:
        torch.set_num_threads(before)


class Dropping(ConvBN):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, training=True)


class Noisy(nn.Module):
    """Every kind of draw RowStream routes: Dropout2d and Dropout modules, in-place functional dropout, a draw
    that takes a generator (torch.randn_like takes none, so torch.randn), a Tensor method."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.drop2d = nn.Dropout2d(0.3)
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = self.drop2d(self.conv(x))
        h = F.dropout(torch.relu(h) + 0.0, 0.2, training=True, inplace=True)
        h = h + 0.01 * torch.randn(h.shape) + torch.empty(h.shape).uniform_(0, 0.01)
        return self.fc(self.drop(h.flatten(1)))


class AlphaDropping(ConvBN):
    def forward(self, x):
        return F.alpha_dropout(super().forward(x), 0.5, training=True)


def test_every_row_draws_from_its_own_stream_as_in_the_ordered_loop():
    """device_rng="stream": the masks and noise of every row, the final weights and torch's generator after each
    step (the ordered loop leaves it after the last row's draws) are those of the ordered loop, bit for bit."""
    ordered, o_out = train("ordered", 2, module=Noisy, device_rng="stream")
    concurrent, c_out = train("concurrent", 2, module=Noisy, device_rng="stream")
    for p, q in zip(ordered.state.params, concurrent.state.params):
        assert torch.equal(p, q)
    for (l1, a1, r1), (l2, a2, r2) in zip(o_out, c_out):
        assert torch.equal(l1, l2) and torch.equal(a1, a2) and torch.equal(r1, r2)
    plain, p_out = train("ordered", 1, module=Noisy, device_rng="stream")
    torch.testing.assert_close(p_out[-1][0], c_out[-1][0], atol=1e-5, rtol=1e-5)
    # the draws matter: another seed changes every loss
    torch.manual_seed(1)
    other = QMLHFLEngine(Noisy(), loss_with_aux, Hierarchy.balanced([3, 3]), (2, 1), executor="loop",
                         forwards="concurrent", device_rng="stream", seed=1)
    torch.manual_seed(0)
    first = QMLHFLEngine(Noisy(), loss_with_aux, Hierarchy.balanced([3, 3]), (2, 1), executor="loop",
                         forwards="concurrent", device_rng="stream")
    other.state.params[0].copy_(first.state.params[0])
    batch = batches(9, 1)[0]
    assert not torch.isclose(first.compute_gradients(batch)[0], other.compute_gradients(batch)[0]).any()


class Remembering(ConvBN):
    def forward(self, x):
        out = super().forward(x)
        self.last = out.detach()
        return out


class Metered(ConvBN):
    def __init__(self):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x):
        return super().forward(x)


def metered_loss(module, batch):
    out = module(batch[0])
    module.acc(out, batch[1])
    return F.cross_entropy(out, batch[1])


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("module, loss, message", [
    (Dropping, loss_with_aux, r"forwards='concurrent': the training step drew random numbers from torch's global "
                              r"generator, .*use device_rng='stream'"),
    (Remembering, loss_with_aux, r"forwards='concurrent': the step assigns module attribute\(s\) \['last'\], "
                                 r"whose value would depend on which row ran last: use forwards='ordered'"),
    (Metered, metered_loss, r"forwards='concurrent': the step updates the torchmetrics MulticlassAccuracy \(every "
                            r"row would update its states at once, in a racing order\): use forwards='ordered'"),
])
def test_steps_whose_rows_depend_on_each_other_are_refused(workers, module, loss, message):
    with pytest.raises(ConcurrentStepError, match=message):
        train("concurrent", workers, module=module, loss=loss, steps=1)
    train("ordered", workers, module=module, loss=loss, steps=1)  # the ordered loop runs them


def test_a_draw_that_bypasses_the_row_streams_is_refused():
    with pytest.raises(ConcurrentStepError, match="with 'stream' a draw that takes no generator and is not a dropout"):
        train("concurrent", 2, module=AlphaDropping, steps=1, device_rng="stream")


def test_the_metric_and_the_attribute_stay_untouched_on_the_real_module():
    torch.manual_seed(0)
    e = QMLHFLEngine(Metered(), metered_loss, Hierarchy.balanced([3]), (1,), executor="loop", forwards="concurrent")
    metric = e.executor.objective.inner.acc
    with pytest.raises(ConcurrentStepError):
        e.compute_gradients(batches(3, 1)[0])
    assert int(metric._update_count) == 0 and "forward" not in metric.__dict__


def test_forwards_option_errors():
    with pytest.raises(ValueError, match="forwards must be 'ordered' or 'concurrent', got 'parallel'"):
        SimulationConfig.build(Hierarchy.balanced([3]), [1], forwards="parallel")
    with pytest.raises(ValueError, match="forwards='concurrent' is a mode of the loop executor, which executor='vmap' "
                                         "never runs"):
        SimulationConfig.build(Hierarchy.balanced([3]), [1], forwards="concurrent", executor="vmap")
    with pytest.raises(ValueError, match="forwards='concurrent' needs modules that keep nn.Module.__setattr__, but "
                                         "LSTM overrides it"):
        LoopExecutor(nn.LSTM(3, 3), loss_with_aux, ParamLayout([]), ParamLayout([]), forwards="concurrent")


# ---------------------------------------------------------------- through the strategy
class Logging(L.LightningModule):
    """Conv + BatchNorm + Linear with self.log in training_step and a metric used in validation only."""

    def __init__(self):
        super().__init__()
        self.net = ConvBN()
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        self.log("batch_mean", x.mean(), reduce_fx="max")
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_acc(self.net(batch[0]), batch[1])
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(forwards, tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(240, 2, 6, 6, generator=g), torch.randint(0, 3, (240,), generator=g))
    model = Logging()
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([3, 2]), taus=[2, 2], compressors=[8, 8],
                              executor="loop", forwards=forwards, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, DataLoader(data, batch_size=5), DataLoader(data, batch_size=60))
    finally:
        torch.set_num_threads(before)
    assert strategy.engine.executor.forwards == forwards
    return model, {k: v.clone() for k, v in trainer.callback_metrics.items()}


def test_a_lightning_module_trains_the_same_with_concurrent_rows(tmp_path):
    """self.log captured per row, a metric outside training_step, BatchNorm: all as with the ordered loop."""
    m1, logged1 = fit("ordered", tmp_path)
    m2, logged2 = fit("concurrent", tmp_path)
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n
    assert logged1.keys() == logged2.keys() >= {"train_loss", "batch_mean", "val_acc"}
    for k in logged1:
        assert torch.equal(logged1[k], logged2[k]), k
