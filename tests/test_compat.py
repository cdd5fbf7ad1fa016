"""Compatibility matrix: what trains under a plain ``L.Trainer()`` trains under QMLHFLStrategy, or is refused.

Each feature has a small module of its own, written the ordinary way (no QMLHFL-specific code), and is checked
(a) for the one-device equivalence: a hierarchy of one device with tau = 1 and no quantization trains exactly like
    plain Lightning fed the same batches (a train DataLoader without shuffling: the one device then walks its data
    in the same order), up to float rounding of the cloud's Eq. 6 update v + (w - v);
(b) for running under a real hierarchy with quantization under both executors;
(c) for refusals raising their promised errors.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_qmlhfl import IID, QSGD, Dirichlet, Hierarchy, Shards

# The matrix runs against `lightning` (default) or the standalone `pytorch_lightning` package
# (QMLHFL_TEST_LIGHTNING=pytorch_lightning; tests/test_pytorch_lightning.py runs it so): its Trainer, its
# LightningModules, its callbacks and its strategy registry, with lightning_qmlhfl.pytorch_lightning's strategy.
PACKAGE = os.environ.get("QMLHFL_TEST_LIGHTNING", "lightning")
if PACKAGE == "pytorch_lightning":
    import pytorch_lightning as L
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.plugins.precision import MixedPrecision

    from lightning_qmlhfl.pytorch_lightning import QMLHFLStrategy
else:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_qmlhfl import QMLHFLStrategy
from lightning_qmlhfl.data.materialize import DatasetTooLargeError
from lightning_qmlhfl.simulation.executors import VmapUnsupportedError
from lightning_qmlhfl.rng import Stream, mix

N_SAMPLES, DIM, CLASSES, BATCH = 64, 8, 3, 8


def _data(n: int = N_SAMPLES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def loader(ds=None, batch_size: int = BATCH, **kw) -> DataLoader:
    return DataLoader(ds if ds is not None else TensorDataset(*_data()), batch_size=batch_size, shuffle=False, **kw)


def val_loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data(32, seed=1)), batch_size=16)


class Classifier(L.LightningModule):
    """A small MLP classifier; subclasses change one feature each."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def one_device(**kw) -> QMLHFLStrategy:
    """One device, no quantization; tau = 1 unless given (a global round of one device with tau_1 = k is also k
    steps of plain training: the cloud takes the device's model, which continues from it)."""
    kw.setdefault("executor", "loop")
    kw.setdefault("taus", [1])
    return QMLHFLStrategy(hierarchy=Hierarchy.balanced([1]), quantizers=[None], partition=IID(), seed=0, **kw)


def hierarchy_strategy(executor: str, **kw) -> QMLHFLStrategy:
    q = QSGD(4, bucket_size=32)
    kw.setdefault("partition", IID())
    return QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[2, 2], quantizers=[q, q], seed=0,
                          executor=executor, **kw)


def trainer(strategy=None, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("num_sanity_val_steps", 0)
    if strategy is not None:
        kw["strategy"] = strategy
    kw.setdefault("accelerator", "cpu")
    return L.Trainer(enable_progress_bar=False, enable_model_summary=False, **kw)


def fit_both(make, steps: int = 4, train=None, val=None, strategy_kw=None, **trainer_kw):
    """Train copies of one initial module ``steps`` steps under a plain Trainer and under the one-device strategy;
    return both modules and trainers."""
    torch.manual_seed(0)
    plain_module = make()
    qm_module = copy.deepcopy(plain_module)
    t_plain = trainer(max_steps=steps, **trainer_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_plain.fit(plain_module, train if train is not None else loader(), val)
    t_qm = trainer(one_device(**(strategy_kw or {})), max_steps=steps, **trainer_kw)
    t_qm.fit(qm_module, train if train is not None else loader(), val)
    return plain_module, qm_module, t_plain, t_qm


def assert_same_weights(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(sa[k], sb[k]), k


def run_hierarchy(make, executor: str, steps: int = 8, train=None, **kw):
    torch.manual_seed(0)
    module = make()
    strategy = hierarchy_strategy(executor, **kw.pop("strategy_kw", {}))
    val = kw.pop("val", None)
    t = trainer(strategy, max_steps=steps, **kw)
    t.fit(module, train if train is not None else loader(), val)
    return module, strategy, t


# ====================================================================================== the reference itself
def test_plain_module_one_device_equals_plain_lightning():
    a, b, _, t = fit_both(Classifier, steps=6)
    assert_same_weights(a, b)
    assert t.strategy.engine.round == 6


# ====================================================================================== 1. logging
class LoggingEverything(Classifier):
    """Tensors, numbers, Metric objects, log_dict, on_step/on_epoch/prog_bar/reduce_fx/sync_dist, epoch-end hooks."""

    def __init__(self):
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.seen = SumMetric()
        self.mean_loss = MeanMetric()
        self.best_val = MaxMetric()
        self.val_acc = MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.epoch_end_values: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.seen.update(torch.tensor(float(len(y))))
        self.mean_loss.update(loss)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/seen", self.seen, on_step=False, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/max_loss", loss, on_step=False, on_epoch=True, reduce_fx="max", sync_dist=True)
        self.log_dict({"train/const": 2.5, "train/twice": 2 * loss}, on_step=True)
        return {"loss": loss, "extra": loss.detach() * 3}

    def on_train_epoch_end(self):
        self.epoch_end_values.append(float(self.mean_loss.compute()))
        self.mean_loss.reset()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)

    def on_validation_epoch_end(self):
        self.best_val(self.val_acc.compute())
        self.log("val/acc", self.val_acc.compute())
        self.log("val/best", self.best_val.compute())
        self.val_acc.reset()


def test_logging_one_device_equals_plain():
    # full batches: one plain epoch is one step, as one strategy epoch (global round) is with tau = 1
    a, b, ta, tb = fit_both(LoggingEverything, steps=5, train=loader(batch_size=N_SAMPLES), val=val_loader())
    assert_same_weights(a, b)
    for key in ("train/acc", "train/seen", "train/loss_step", "train/loss_epoch", "train/max_loss", "train/const",
                "train/twice", "val/acc", "val/best"):
        torch.testing.assert_close(tb.callback_metrics[key], ta.callback_metrics[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert float(tb.callback_metrics["train/seen"]) == N_SAMPLES  # reset every epoch, as in plain Lightning
    assert "train/loss_step" in tb.progress_bar_metrics
    torch.testing.assert_close(torch.tensor(b.epoch_end_values), torch.tensor(a.epoch_end_values))
    assert len(b.epoch_end_values) == 5


@pytest.mark.parametrize("executor", ["auto", "loop"])
def test_logging_under_a_hierarchy_accumulates_metrics_over_all_devices(executor):
    seen_per_round = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen_per_round.append(float(module.seen.compute()))

    ctx = pytest.warns(RuntimeWarning, match="cannot run under torch.func.vmap.*torchmetrics") \
        if executor == "auto" else warnings.catch_warnings()
    with ctx:
        module, strategy, t = run_hierarchy(LoggingEverything, executor, steps=8, callbacks=[Probe()],
                                            val=val_loader())
    assert strategy.engine.executor_name == "loop"
    # SumMetric of batch sizes: 4 devices x 8 samples x 4 steps per round, accumulated over every device's batches
    assert seen_per_round[0] == 4 * BATCH * 4
    assert float(t.callback_metrics["train/const"]) == 2.5
    assert 0 <= float(t.callback_metrics["train/acc"]) <= 1
    assert "val/best" in t.callback_metrics


def test_explicit_vmap_refuses_metric_updates_with_the_reason():
    with pytest.raises(VmapUnsupportedError, match="torchmetrics MulticlassAccuracy.*executor='loop'"):
        run_hierarchy(LoggingEverything, "vmap", steps=2)


def test_logged_values_are_the_device_mean():
    class LogDeviceId(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.log("first_x", x[0, 0])
            return F.cross_entropy(self(x), y)

    module, strategy, t = run_hierarchy(LogDeviceId, "vmap", steps=1)
    # the value logged is the mean over the 4 devices of each device's first sample's first feature
    x, _ = _data()
    first = strategy.sampler.table[:, 0]  # each device's first index (a loader without shuffling: in order)
    expected = x[first, 0].mean()
    torch.testing.assert_close(t.callback_metrics["first_x"], expected)


# ====================================================================================== 2. vmap and user code
class UsesItem(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.last = loss.item()  # .item() and an attribute assignment: both impossible under vmap
        return loss


class DataDependent(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if loss > 0.5:  # data-dependent Python control flow
            loss = loss * 1.0
        return loss


class AssignsTensor(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.last_logits = self(x)  # a tensor stored on the module
        return F.cross_entropy(self.last_logits, y)


@pytest.mark.parametrize("make, reason", [(UsesItem, r"\.item\(\)|item"), (DataDependent, "data-dependent"),
                                          (AssignsTensor, "assigns module attribute.*last_logits")])
def test_auto_falls_back_to_the_loop_exactly(make, reason):
    with pytest.warns(RuntimeWarning, match=reason):
        a, sa, _ = run_hierarchy(make, "auto", steps=5)
    assert sa.engine.executor_name == "loop"
    b, sb, _ = run_hierarchy(make, "loop", steps=5)
    # the failed vmap attempt left nothing behind (RNG, buffers, attributes): the run equals the loop's bit for bit
    assert torch.equal(sa.engine.state.params[0], sb.engine.state.params[0])
    assert_same_weights(a, b, rtol=0, atol=0)
    with pytest.raises(VmapUnsupportedError, match=reason):
        run_hierarchy(make, "vmap", steps=1)


def test_one_device_equivalence_with_item_and_control_flow():
    a, b, _, _ = fit_both(UsesItem, strategy_kw={"executor": "auto"})
    assert_same_weights(a, b)


# ====================================================================================== 3. optimizers, schedulers
class OptimizerForms(Classifier):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def configure_optimizers(self):
        f = self.form
        if f == "list":
            return [torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)]
        if f == "tuple":
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
        if f == "dict_step":
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}
        if f == "groups":  # per-group lr, weight decay, momentum
            return torch.optim.SGD([
                {"params": self.net[0].parameters(), "lr": 0.2, "weight_decay": 0.01, "momentum": 0.5},
                {"params": self.net[2].parameters()},
            ], lr=0.05, momentum=0.9)
        if f == "adam_groups":  # per-group betas
            return torch.optim.AdamW([
                {"params": [self.net[0].weight], "betas": (0.5, 0.9)},
                {"params": [self.net[0].bias, self.net[2].weight, self.net[2].bias], "lr": 0.02},
            ], lr=0.01)
        if f == "trainer_model":
            return torch.optim.RMSprop(self.trainer.model.parameters(), lr=0.01)
        if f == "submodule":  # only the last layer is trained; the first is frozen
            return torch.optim.SGD(self.net[2].parameters(), lr=0.1)
        if f == "requires_grad":
            self.net[0].weight.requires_grad_(False)
            return torch.optim.SGD(self.parameters(), lr=0.1)
        if f == "plateau":
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
            # mode "max" on a falling loss: no improvement, so the lr drops after every validation but the first
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
        raise AssertionError(f)


@pytest.mark.parametrize("form", ["list", "tuple", "dict_step", "groups", "adam_groups", "trainer_model",
                                  "submodule", "requires_grad", "plateau"])
def test_optimizer_forms_one_device_equal_plain(form, tmp_path):
    # Lightning's epoch-interval schedulers step per epoch and step-interval frequencies count batches within an
    # epoch, so both runs get epochs of the same length: one round of tau_1 = 8 steps = one plain epoch of 8 batches
    monitor = [LearningRateMonitor()] if form == "tuple" else []
    a, b, _, tb = fit_both(lambda: OptimizerForms(form), steps=16, val=val_loader() if form == "plateau" else None,
                           callbacks=monitor, strategy_kw={"taus": [8]},
                           logger=CSVLogger(tmp_path) if monitor else False)
    assert_same_weights(a, b)
    opt = tb.optimizers[0]
    if form in ("submodule", "requires_grad"):
        frozen = ["net.0.weight", "net.0.bias"] if form == "submodule" else ["net.0.weight"]
        e = tb.strategy.engine
        assert all(n not in e.state.param_layout.names for n in frozen)  # frozen: not stacked, not sent
        d = sum(p.numel() for n, p in b.named_parameters() if n not in frozen)
        assert e.num_params == d and e.baseline_bits[0] == e.aggregation_counts[0] * 32 * d
    if form == "plateau":
        assert opt.param_groups[0]["lr"] < 0.5  # stepped on the cloud model's val_loss
    if form == "dict_step":
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 9)  # stepped every 2 steps of 16: 1/(1+8)
    if form == "tuple":
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**2)  # StepLR per epoch (global round)
        assert "lr-Adam" in tb.callback_metrics or tb.logged_metrics


def test_param_groups_under_a_hierarchy_use_each_groups_settings():
    module, strategy, _ = run_hierarchy(lambda: OptimizerForms("groups"), "vmap", steps=3)
    groups = strategy.engine.optimizer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.2, 0.05] and [g["momentum"] for g in groups] == [0.5, 0.9]
    assert [g["weight_decay"] for g in groups] == [0.01, 0]


# ====================================================================================== 4. trainer options
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_one_device_equals_plain(algorithm):
    a, b, _, _ = fit_both(lambda: Classifier(lr=0.5), steps=5, gradient_clip_val=0.05,
                          gradient_clip_algorithm=algorithm)
    assert_same_weights(a, b)
    c, _, _, _ = fit_both(lambda: Classifier(lr=0.5), steps=5)
    assert not torch.allclose(c.net[0].weight, a.net[0].weight)  # clipping changed the run


def test_gradient_clipping_is_per_device_against_a_loop():
    """Under a hierarchy every device clips its own gradient: compare one step with a per-device loop."""
    torch.manual_seed(0)
    module = Classifier(lr=0.5)
    init = copy.deepcopy(module)
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([4]), taus=[2], quantizers=[None], partition=IID(),
                              executor="vmap")
    trainer(strategy, max_steps=1, gradient_clip_val=0.05).fit(module, loader())
    e = strategy.engine
    parts = strategy.sampler.table
    x, y = _data()
    views = e.state.param_layout.views(e.state.params[0])
    for i in range(4):
        ref = copy.deepcopy(init)
        idx = parts[i, :BATCH]
        loss = F.cross_entropy(ref(x[idx]), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
        for n, p in ref.named_parameters():
            torch.testing.assert_close(views[n][i], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_one_device_equals_plain(precision):
    # on CPU, precision="16-mixed" is turned into bf16 by Lightning; the fp16 plugin with its GradScaler is explicit
    kw = {"precision": precision} if precision == "bf16-mixed" else {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    a, b, _, tb = fit_both(Classifier, steps=4, **kw)
    assert_same_weights(a, b, rtol=1e-3, atol=1e-4)
    assert tb.strategy.engine.state.params[0].dtype == torch.float32  # the stacked state stays fp32
    if precision == "16-mixed":
        assert tb.precision_plugin.scaler.get_scale() == 65536.0  # scaled losses, unscaled gradients


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precisions_stack_in_that_dtype(precision):
    a, b, _, tb = fit_both(Classifier, steps=4, precision=precision)
    tol = {"rtol": 1e-12, "atol": 1e-12} if precision == "64-true" else {"rtol": 2e-2, "atol": 2e-2}
    assert_same_weights(a, b, **tol)
    assert tb.strategy.engine.state.params[0].dtype == (torch.float64 if precision == "64-true" else torch.bfloat16)


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_mixed_precision_under_a_hierarchy(executor):
    module, strategy, _ = run_hierarchy(Classifier, executor, steps=4, precision="bf16-mixed")
    assert torch.isfinite(strategy.engine.cloud_params()).all()


def test_accumulate_grad_batches_one_device_equals_plain():
    a, b, _, tb = fit_both(Classifier, steps=3, accumulate_grad_batches=2)
    assert_same_weights(a, b)
    assert tb.global_step == 3 and tb.strategy.engine.total_steps == 3  # k mini-batches per local step


def test_trainer_options_on_the_cloud_model(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after the second validation
    strategy = hierarchy_strategy("vmap")
    t = trainer(strategy, max_epochs=10, val_check_interval=0.5, check_val_every_n_epoch=1, limit_val_batches=1,
                callbacks=[ckpt, stop], enable_checkpointing=True)
    t.fit(module, loader(), val_loader())
    assert t.should_stop and t.global_step < 10 * 4  # EarlyStopping on the cloud model's val_loss
    assert ckpt.best_model_path and torch.load(ckpt.best_model_path, weights_only=True)["qmlhfl"]
    # validate / test / predict after fit run on the cloud model, which the module's parameters hold
    cloud = strategy.engine.state.param_layout.views(strategy.engine.cloud_params())
    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), cloud[n])
    out = t.validate(module, val_loader(), verbose=False)
    x, y = _data(32, seed=1)
    first = slice(0, 16)  # limit_val_batches=1: one batch of 16
    assert out[0]["val_loss"] == pytest.approx(float(F.cross_entropy(module(x[first]), y[first])), rel=1e-5)
    preds = t.predict(module, DataLoader(x, batch_size=16))
    torch.testing.assert_close(torch.cat(preds), module(x).detach())


def test_max_time_and_fast_dev_run():
    module, strategy, t = run_hierarchy(Classifier, "vmap", steps=-1, max_time={"seconds": 2}, max_epochs=-1)
    assert t.global_step > 0
    t2 = trainer(hierarchy_strategy("vmap"), fast_dev_run=True)
    t2.fit(Classifier(), loader(), val_loader())
    assert t2.global_step == 1


def test_manual_optimization_is_refused():
    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        run_hierarchy(Manual, "vmap", steps=1)


@pytest.mark.parametrize("kw, match", [
    (dict(limit_train_batches=0.5), "limit_train_batches=0.5 would cut global rounds"),
    (dict(overfit_batches=2), "overfit_batches"),
])
def test_refused_trainer_options(kw, match):
    with pytest.raises(ValueError, match=match):
        run_hierarchy(Classifier, "vmap", steps=1, **kw)


def test_custom_gradient_clipping_hook_is_refused():
    class CustomClip(Classifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            pass

    with pytest.raises(ValueError, match="configure_gradient_clipping.*gradient_clip_val"):
        run_hierarchy(CustomClip, "vmap", steps=1)


# ====================================================================================== 5. data
class DictBatches(Classifier):
    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["inputs"]["x"]), batch["y"])
        return loss


class DictDataset(Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": {"x": self.x[i]}, "y": self.y[i], "id": i}


class DataModule(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.prepared = self.set_up = False

    def prepare_data(self):
        self.prepared = True

    def setup(self, stage):
        self.set_up = True
        self.ds = TensorDataset(*_data())

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=BATCH)


class OwnLoader(Classifier):
    def train_dataloader(self):
        return loader()


def test_datamodule_and_module_dataloader_one_device_equal_plain():
    torch.manual_seed(0)
    a = Classifier()
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    trainer(max_steps=4).fit(a, loader())
    dm = DataModule()
    trainer(one_device(), max_steps=4).fit(b, datamodule=dm)
    assert dm.prepared and dm.set_up
    assert_same_weights(a, b)
    own = OwnLoader()
    own.load_state_dict(c.state_dict())
    trainer(one_device(), max_steps=4).fit(own)
    assert_same_weights(a, own)


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_nested_dict_batches(executor):
    a, b, _, _ = fit_both(DictBatches, train=loader(DictDataset()))
    assert_same_weights(a, b)
    run_hierarchy(DictBatches, executor, steps=4, train=loader(DictDataset()))


class SequenceTagger(L.LightningModule):
    """Token ids in, one tag per token out: targets [B, T] (IID needs no labels)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 12)

    def training_step(self, batch, batch_idx):
        tokens, tags = batch
        return F.cross_entropy(self.head(self.emb(tokens)).reshape(-1, 12), tags.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _sequences():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (N_SAMPLES, 6), generator=g)
    return TensorDataset(tokens, (tokens + 1) % 12)


def test_sequence_targets_with_iid_and_label_fn():
    a, b, _, _ = fit_both(SequenceTagger, train=loader(_sequences()))
    assert_same_weights(a, b)
    with pytest.raises(ValueError, match=r"samples\[1\] is not one class id per sample.*label_fn"):
        run_hierarchy(SequenceTagger, "vmap", steps=1, train=loader(_sequences()),
                      strategy_kw={"partition": Dirichlet(0.5, min_samples=1)})
    _, strategy, _ = run_hierarchy(SequenceTagger, "vmap", steps=2, train=loader(_sequences()),
                                   strategy_kw={"partition": Shards(2), "label_fn": lambda d: d[1][:, 0]})
    labels = (_sequences().tensors[0][:, 0] + 1) % 12
    expected = Shards(2)(labels, strategy.hierarchy, seed=mix(0, Stream.PARTITION))  # split by label_fn's labels
    for row, size, part in zip(strategy.sampler.table, strategy.sampler.sizes, expected):
        assert torch.equal(row[:size], part)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, 1)

    def training_step(self, batch, batch_idx):
        x, t = batch
        return F.mse_loss(self.lin(x).squeeze(-1), t)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Unsupervised(L.LightningModule):
    """No targets at all: the batch is a single tensor."""

    def __init__(self):
        super().__init__()
        self.ae = nn.Sequential(nn.Linear(DIM, 3), nn.Linear(3, DIM))

    def training_step(self, x, batch_idx):
        return F.mse_loss(self.ae(x), x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_float_targets_and_no_targets():
    x, _ = _data()
    reg = TensorDataset(x, x.sum(1))
    a, b, _, _ = fit_both(Regressor, train=loader(reg))
    assert_same_weights(a, b)
    a, b, _, _ = fit_both(Unsupervised, train=DataLoader(x, batch_size=BATCH))
    assert_same_weights(a, b)
    with pytest.raises(ValueError, match="single tensors, without labels.*IID"):
        run_hierarchy(Unsupervised, "vmap", steps=1, train=DataLoader(x, batch_size=BATCH),
                      strategy_kw={"partition": Dirichlet(0.5)})


def test_collate_fn_is_honoured():
    def to_dict(samples):
        x = torch.stack([s[0] for s in samples])
        return {"inputs": {"x": x * 2}, "y": torch.stack([s[1] for s in samples])}

    a, b, _, _ = fit_both(DictBatches, train=loader(collate_fn=to_dict))
    assert_same_weights(a, b)

    class Padded(Dataset):  # variable-length token sequences, padded by the collate_fn
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.arange(1 + i % 5) % 12

    def pad(samples):
        return torch.nn.utils.rnn.pad_sequence(samples, batch_first=True)

    class PadModel(SequenceTagger):
        def training_step(self, tokens, batch_idx):
            return self.head(self.emb(tokens)).square().mean()

    _, strategy, _ = run_hierarchy(PadModel, "vmap", steps=2, train=DataLoader(Padded(), batch_size=4,
                                                                                    collate_fn=pad))
    assert strategy.core.data.shape == (40, 5)  # padded to the longest sequence of the dataset


def test_a_tensor_dataset_is_read_whole_as_its_samples_would_collate():
    """A plain TensorDataset skips the sample-by-sample read: the same structure, dtypes and values as collating its
    samples (a subclass, which may override __getitem__, takes the general path); contiguous tensors are read in
    place (no copy of the dataset), strided ones copied contiguous."""
    from lightning_qmlhfl.data.materialize import materialize_dataset

    x, y = _data(seed=5)
    ds = TensorDataset(x, y.to(torch.int32), torch.randn(4, len(x)).t())  # a transposed (strided) tensor too

    class Subclass(TensorDataset):
        pass

    fast, general = materialize_dataset(ds), materialize_dataset(Subclass(*ds.tensors), chunk=7)
    assert type(fast) is type(general) is list and len(fast) == len(general) == 3
    for a, b, t in zip(fast, general, ds.tensors):
        assert a.dtype == b.dtype and torch.equal(a, b) and a.stride() == b.stride() and a.is_contiguous()
        assert (a.data_ptr() == t.data_ptr()) == t.is_contiguous()  # shared where the layout allows
        assert not a.requires_grad
    assert [t.is_contiguous() for t in ds.tensors] == [True, True, False]
    with pytest.raises(DatasetTooLargeError):
        materialize_dataset(ds, max_bytes=100)


def test_training_reads_a_shared_dataset_without_writing_to_it():
    """The resident training data is the user's own tensors (no copy): a hierarchy trains from them and leaves
    them as they were."""
    x, y = _data()
    ds = TensorDataset(x, y)
    before = [t.clone() for t in ds.tensors]
    _, strategy, _ = run_hierarchy(Classifier, "loop", steps=4, train=loader(ds))
    assert strategy.train_data[0].data_ptr() == x.data_ptr()
    for a, b in zip(ds.tensors, before):
        assert torch.equal(a, b)


def test_dataset_too_large_is_refused_with_its_size():
    with pytest.raises(DatasetTooLargeError, match=r"about 0\.00 GB as tensors \(64 samples x 40 bytes\)"):
        run_hierarchy(Classifier, "vmap", steps=1, strategy_kw={"max_dataset_bytes": 1000})


def test_two_train_dataloaders_are_refused():
    with pytest.raises(ValueError, match="exactly one train dataset"):
        run_hierarchy(Classifier, "vmap", steps=1, train=[loader(), loader(TensorDataset(*_data(seed=3)))])


# ====================================================================================== 6. modules
class WithBatchNorm(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


class WithDropout(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES))


class SeqModel(L.LightningModule):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(12, 8)
        if kind == "lstm":
            self.body = nn.LSTM(8, 8, batch_first=True)
        elif kind == "gru":
            self.body = nn.GRU(8, 8, batch_first=True)
        elif kind == "mha":
            self.body = nn.MultiheadAttention(8, 2, batch_first=True)
        else:
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(8, 12)

    def forward(self, tokens):
        h = self.emb(tokens)
        if self.kind in ("lstm", "gru"):
            h = self.body(h)[0]
        elif self.kind == "mha":
            h = self.body(h, h, h, need_weights=False)[0]
        else:
            h = self.body(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        tokens, tags = batch
        return F.cross_entropy(self(tokens).reshape(-1, 12), tags.reshape(-1))

    def configure_optimizers(self):
        # SGD: attention's key bias has a zero gradient up to rounding, which Adam would amplify to full steps
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TiedWeights(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def training_step(self, batch, batch_idx):
        tokens, tags = batch
        return F.cross_entropy(self.head(self.emb(tokens)).reshape(-1, 12), tags.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class LazyAttribute(Classifier):
    def forward(self, x):
        if not hasattr(self, "scale"):
            self.scale = torch.full((DIM,), 0.5)  # created lazily in forward
        return self.net(x * self.scale)


class CompiledSubmodule(Classifier):
    def __init__(self):
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")


MODULES = {
    "batchnorm": (WithBatchNorm, None),
    "lstm": (lambda: SeqModel("lstm"), _sequences),
    "gru": (lambda: SeqModel("gru"), _sequences),
    "mha": (lambda: SeqModel("mha"), _sequences),
    "transformer": (lambda: SeqModel("transformer"), _sequences),
    "tied": (TiedWeights, _sequences),
    "lazy_attribute": (LazyAttribute, None),
    "compiled": (CompiledSubmodule, None),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_one_device_equal_plain(name):
    make, data = MODULES[name]
    a, b, _, _ = fit_both(make, train=loader(data()) if data else None)
    assert_same_weights(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("executor", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("name", sorted(MODULES) + ["dropout"])
def test_modules_under_a_hierarchy(name, executor):
    make, data = MODULES.get(name, (WithDropout, None))
    unbatchable = name in ("lstm", "gru", "lazy_attribute")
    if executor == "vmap" and unbatchable:
        with pytest.raises(VmapUnsupportedError):
            run_hierarchy(make, executor, steps=2, train=loader(data()) if data else None)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's fallback warning (lazy attribute)
        module, strategy, _ = run_hierarchy(make, executor, steps=4, train=loader(data()) if data else None)
    assert torch.isfinite(strategy.engine.cloud_params()).all()
    assert strategy.engine.round == 1
    if name == "tied":
        assert module.head.weight is module.emb.weight
        assert strategy.engine.num_params == 12 * 8


def test_batchnorm_running_statistics_are_per_device_and_averaged():
    module, strategy, _ = run_hierarchy(WithBatchNorm, "vmap", steps=4)
    e = strategy.engine
    assert e.state.num_buffer_elems == 32
    torch.testing.assert_close(module.net[1].running_mean, e.state.buffer_layout.views(
        e.state.cloud_buffers())["net.1.running_mean"])


# ====================================================================================== 7. imports
@pytest.mark.parametrize("first", ["lightning_qmlhfl", "lightning"])  # (lightning: the package under test)
def test_the_strategy_names_are_registered_in_either_import_order(first):
    """``import lightning_qmlhfl`` imports Lightning and registers the names (no import hook around Lightning's
    loader): ``Trainer(strategy="qmlhfl")`` works whichever package is imported first."""
    order = f"import lightning_qmlhfl\nimport {PACKAGE} as L\n" if first == "lightning_qmlhfl" else \
        f"import {PACKAGE} as L\nimport lightning_qmlhfl\n"
    module = "lightning_qmlhfl.pytorch_lightning" if PACKAGE == "pytorch_lightning" else "lightning_qmlhfl"
    code = (
        "import sys\n" + order +
        "assert not [f for f in sys.meta_path if type(f).__module__.startswith('lightning_qmlhfl')]\n"
        "t = L.Trainer(strategy='qmlhfl', logger=False, enable_progress_bar=False)\n"
        f"from {module} import QMLHFLStrategy\n"
        "assert type(t.strategy) is QMLHFLStrategy\n"
        "t = L.Trainer(strategy='qmlhfl_ddp_spawn', accelerator='cpu', devices=2, logger=False)\n"
        "assert type(t.strategy).__name__ == 'QMLHFLDDPStrategy'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
