"""QMLHFLStrategy: an unmodified LightningModule trained as QMLHFL through Trainer.fit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch.utils._pytree import tree_map

from lightning_qmlhfl import QSGD, Hierarchy
from lightning_qmlhfl.simulation.engine import NonFiniteUpdateError, QMLHFLEngine
from lightning_qmlhfl.data import IID, DeviceSampler, Dirichlet, EmptyPartitionError, Shards, materialize_dataset
from lightning_qmlhfl.data.materialize import extract_labels
from lightning_qmlhfl.rng import Stream, mix
from lightning_qmlhfl.strategy import QMLHFLStrategy

from helpers.fl_modules import MnistCNN, loaders

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("data_root")


def _trainer(strategy, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(strategy=strategy, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


def test_unmodified_module_reaches_useful_accuracy():
    torch.manual_seed(0)
    q = QSGD(8, bucket_size=512)
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 5]), taus=[5, 2], quantizers=[q, q],
                              partition=Dirichlet(alpha=0.5), seed=0)
    trainer = _trainer(strategy, max_epochs=8)
    train_dl, val_dl = loaders(n_train=3000, n_val=1000, batch_size=16)
    trainer.fit(MnistCNN(lr=0.05), train_dl, val_dl)
    acc = float(trainer.callback_metrics["val_acc"])
    assert acc >= 0.85, acc  # chance is 0.10
    assert trainer.global_step == 8 * 10  # one trainer step = one local step of every device
    assert len(strategy.history) == 8
    h = strategy.history[-1]
    assert h["round"] == 8 and h["local_steps"] == 80
    # bits: per round 10 uploads into layer 1 (twice) and 2 into the cloud; QSGD(8, bucket_size=None) = 5 bits per number plus
    # one 32-bit norm per bucket of 512
    d = strategy.engine.num_params
    upload = 32 * math.ceil(d / 512) + 5 * d
    assert h["bits_layer1"] == 8 * 2 * 10 * upload
    assert h["bits_layer2"] == 8 * 1 * 2 * upload
    assert h["bits_baseline_layer1"] == 8 * 2 * 10 * 32 * d
    assert h["sim_time"] > 0
    # the module's own parameters hold the cloud model after training
    cloud = strategy.engine.state.param_layout.views(strategy.engine.cloud_params())
    for name, p in trainer.lightning_module.named_parameters():
        assert torch.equal(p.detach(), cloud[name]), name
    # the scheduler's LR (StepLR gamma 0.9 per epoch) reached the devices: round 8 ran with 0.05 * 0.9^7
    assert math.isclose(strategy.engine.optimizer.lr, 0.05 * 0.9**7, rel_tol=1e-9)


def test_one_round_through_fit_equals_engine():
    """Trainer.fit for one global round == the engine driven by hand with the same partition, batches and seed."""
    h, taus, qs, seed = Hierarchy.balanced([2, 3]), [2, 3], [QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)], 5
    torch.manual_seed(0)
    module = MnistCNN(lr=0.05, optimizer="adam")
    init = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = QMLHFLStrategy(hierarchy=h, taus=taus, quantizers=qs, partition=Shards(2), seed=seed, executor="loop",
                              global_rounds=1)
    trainer = _trainer(strategy)
    train_dl, val_dl = loaders(n_train=600, n_val=100, batch_size=8)
    trainer.fit(module, train_dl, val_dl)
    assert trainer.global_step == 6 and strategy.engine.round == 1

    # by hand
    ref_module = MnistCNN(lr=0.05, optimizer="adam")
    ref_module.load_state_dict(init)
    data = materialize_dataset(train_dl.dataset)
    parts = Shards(2)(extract_labels(data, None), h, seed=mix(seed, Stream.PARTITION))
    sampler = DeviceSampler(parts, 8, seed=mix(seed, Stream.SAMPLER))
    losses = []

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    engine = QMLHFLEngine(ref_module, loss_fn, h, taus, qs, optimizer="adam", optimizer_kwargs={"lr": 0.05},
                          executor="loop", seed=seed)
    for _ in range(6):
        idx = sampler.next_indices()
        r = engine.local_step(tree_map(lambda t: t[idx], data))
        losses.append(r.losses.mean())
    torch.testing.assert_close(strategy.engine.cloud_params(), engine.cloud_params(), atol=0, rtol=0)
    torch.testing.assert_close(strategy.engine.state.params[0], engine.state.params[0], atol=0, rtol=0)
    # self.log("train_loss") inside training_step was logged as the mean over devices
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(float(losses[-1]), rel=1e-6)
    assert strategy.history[0]["train_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)


def test_kill_and_resume_is_bit_identical(tmp_path):
    script = HERE / "helpers" / "resume_run.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir()
    broken.mkdir()
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    r = run(str(full), "full")
    assert r.returncode == 0, r.stderr[-3000:]
    # 4 steps per round: kill at step 14 = in the middle of round 4, after round 3's checkpoint
    r = run(str(broken), "kill", "14")
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert (broken / "ckpt" / "last.ckpt").exists()
    assert not (broken / "final.pt").exists()
    # the checkpoint loads with weights_only=True and holds the whole simulation
    ck = torch.load(broken / "ckpt" / "last.ckpt", weights_only=True)
    assert ck["qmlhfl"]["engine"]["state"]["counters"]["round"] == 3
    assert ck["qmlhfl"]["engine"]["state"]["params/0"].shape[0] == 4
    r = run(str(broken), "resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(broken / "final.pt", weights_only=True)
    assert torch.equal(a["cloud"], b["cloud"])
    assert torch.equal(a["devices"], b["devices"])
    assert a["history"] == b["history"]


def test_registered_by_name_with_documented_defaults():
    trainer = L.Trainer(strategy="qmlhfl", logger=False, enable_progress_bar=False)
    s = trainer.strategy
    assert isinstance(s, QMLHFLStrategy)
    assert s.hierarchy.nodes_per_layer == (100, 20, 4, 1)
    assert s.taus == (5, 2, 2)
    assert list(s.quantizers) == [QSGD(8)] * 3
    assert isinstance(s.partitioner, Dirichlet) and s.partitioner.alpha == 0.5


def test_cuda_device_gets_an_index():
    """Lightning's CUDA accelerator calls torch.cuda.set_device(root_device), which refuses an index-less "cuda"
    (seen on the H200: the recipes with trainer.accelerator=gpu failed at setup)."""
    assert QMLHFLStrategy(device="cuda").root_device == torch.device("cuda", 0)
    assert QMLHFLStrategy(device="cuda:1").root_device == torch.device("cuda", 1)
    assert QMLHFLStrategy(device="cpu").root_device == torch.device("cpu")


def test_unsupported_optimizer_is_rejected():
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2]), taus=[1], quantizers=[None], partition=IID())
    trainer = _trainer(strategy, max_steps=1)
    train_dl, val_dl = loaders(n_train=100, n_val=50, batch_size=4)
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        trainer.fit(MnistCNN(optimizer="lbfgs"), train_dl, val_dl)


def test_empty_partition_is_an_error():
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([10, 10]), taus=[1, 1], quantizers=[None, None],
                              partition=Shards(1))
    trainer = _trainer(strategy, max_steps=1)
    train_dl, val_dl = loaders(n_train=50, n_val=50, batch_size=4)
    with pytest.raises(EmptyPartitionError, match="without data"):
        trainer.fit(MnistCNN(), train_dl, val_dl)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hierarchy=Hierarchy.balanced([2, 2]), taus=[1]), "taus has length 1"),
        (dict(hierarchy=Hierarchy.balanced([2]), taus=[0]), "tau_1 must be an integer >= 1"),
        (dict(hierarchy=Hierarchy.balanced([2]), taus=[1], quantizers=[4, 4]), "quantizers has length 2"),
        (dict(weighting="median"), "weighting must be"),
        (dict(executor="threads"), "executor must be"),
        (dict(global_rounds=0), "global_rounds must be"),
        (dict(partition={"name": "zipf"}), "unknown partition"),
        (dict(partition={"name": "dirichlet", "alpha": -1}), "alpha must be"),
        (dict(smoothness=-1.0), "smoothness"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QMLHFLStrategy(**kwargs)


def test_learning_rate_condition_warns_and_errors():
    kw = dict(hierarchy=Hierarchy.balanced([2, 2]), taus=[5, 5], quantizers=[QSGD(2, bucket_size=None), QSGD(2, bucket_size=None)], partition=IID(),
              smoothness=10.0)
    train_dl, val_dl = loaders(n_train=200, n_val=50, batch_size=4)
    with pytest.warns(UserWarning, match="Admissible: mu <"):
        _trainer(QMLHFLStrategy(**kw), max_steps=1).fit(MnistCNN(lr=0.5), train_dl, val_dl)
    with pytest.raises(ValueError, match="violates the convergence condition"):
        _trainer(QMLHFLStrategy(**kw, strict_lr=True), max_steps=1).fit(MnistCNN(lr=0.5), train_dl, val_dl)


class NanAfter(MnistCNN):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss


def test_nan_stops_training_without_poisoned_checkpoint(tmp_path):
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[2, 2], quantizers=[QSGD(4, bucket_size=None), QSGD(4, bucket_size=None)],
                              partition=IID(), seed=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(strategy, max_epochs=5, enable_checkpointing=True,
                       callbacks=[ckpt, OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")])
    train_dl, val_dl = loaders(n_train=200, n_val=50, batch_size=4)
    with pytest.raises((NonFiniteUpdateError, RuntimeError)) as info:
        trainer.fit(NanAfter(), train_dl, val_dl)
    err = info.value
    chain = [err, err.__cause__, err.__context__]
    nan_err = next(e for e in chain if isinstance(e, NonFiniteUpdateError))
    # step 6 is the first NaN step (global_step 5 during it); the first upload after it is at step 6 (layer 1)
    assert nan_err.layer == 1 and nan_err.round == 1
    assert "layer 0 to layer 1 in global round 1" in str(nan_err)
    assert not (tmp_path / "on_exception.ckpt").exists()
    # the last good checkpoint (end of round 1) is intact and finite
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(p).all() for k, p in ck["qmlhfl"]["engine"]["state"].items() if k.startswith("params/"))


def test_sampler_per_device_epochs_cover_data_without_repeats():
    parts = [torch.arange(0, 5), torch.arange(5, 17), torch.arange(17, 20)]
    s = DeviceSampler(parts, batch_size=4, seed=0)
    seen = [[] for _ in parts]
    for _ in range(15):  # 60 draws per device
        idx = s.next_indices()
        for i in range(3):
            seen[i] += idx[i].tolist()
    for i, p in enumerate(parts):
        n = len(p)
        for e in range(60 // n):  # every complete device epoch is a permutation of its own data
            assert sorted(seen[i][e * n : (e + 1) * n]) == p.tolist()
    assert s.epochs.tolist() == [12, 5, 20]


def test_partitioners():
    labels = torch.arange(10).repeat_interleave(60)  # 600 samples, 10 classes
    h = Hierarchy.balanced([3, 4])
    for part in (IID(), Dirichlet(0.3), Shards(2), Dirichlet(0.3, group_by_edge=True), Shards(2, group_by_edge=True)):
        parts = part(labels, h, seed=1)
        allidx = torch.cat(parts)
        assert len(parts) == 12 and allidx.numel() == 600 and allidx.unique().numel() == 600, part
        again = part(labels, h, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(parts, again))  # deterministic
    # 6 classes x 100 samples: every shard of the label-sorted data holds exactly one class
    six = torch.arange(6).repeat_interleave(100)
    shards = Shards(2)(six, h, seed=0)  # 24 shards of 25
    assert max(six[p].unique().numel() for p in shards) <= 2
    # grouped by edge: 6 shards of 100, two per edge; the edge's 4 devices split them IID, so all share them
    grouped = Shards(2, group_by_edge=True)(six, h, seed=0)
    for e in range(3):
        edge_classes = set(six[torch.cat(grouped[4 * e : 4 * e + 4])].tolist())
        assert len(edge_classes) <= 2
        for i in range(4):
            assert set(six[grouped[4 * e + i]].tolist()) == edge_classes
    iid = IID()(labels, h, seed=0)
    assert max(p.numel() for p in iid) - min(p.numel() for p in iid) <= 1
    with pytest.raises(EmptyPartitionError):
        Dirichlet(0.5, min_samples=100)(labels, h, seed=0)


def test_compressors_with_error_feedback_through_fit_resume_bit_for_bit(tmp_path):
    """Error-feedback memory and server-optimizer state travel through Lightning checkpoints."""
    from lightning_qmlhfl import FedAdam, FedAvgM, ScaledSign, TopK

    def make(rounds, ckpt_path=None):
        torch.manual_seed(0)
        cs = [TopK(ratio=0.05, error_feedback="ef"), ScaledSign(bucket_size=64, error_feedback="ef21")]
        strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[2, 2], compressors=cs,
                                  partition=IID(), seed=4, server_optimizers=[FedAvgM(), FedAdam(lr=0.01)])
        ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        t = _trainer(strategy, max_epochs=rounds, enable_checkpointing=True, callbacks=[ck])
        train_dl, val_dl = loaders(n_train=400, n_val=50, batch_size=8)
        t.fit(MnistCNN(lr=0.05), train_dl, val_dl, ckpt_path=ckpt_path)
        return strategy

    full = make(4)
    assert full.engine.memory[0].abs().sum() > 0 and full.engine.memory[1].abs().sum() > 0
    assert full.history[-1]["bits_round_layer1"] == 2 * 4 * full.compressors[0].bits(full.engine.num_params)
    make(2)
    resumed = make(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.engine.state.params[0], full.engine.state.params[0])
    assert all(torch.equal(a, b) for a, b in zip(resumed.engine.memory, full.engine.memory))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(resumed.engine.server_state, full.engine.server_state)
               for k in a)


def test_partial_participation_through_fit_logs_and_resumes_bit_for_bit(tmp_path):
    from lightning_qmlhfl.federation.availability import Availability
    from lightning_qmlhfl.federation.participation import Fraction, Full
    from lightning_qmlhfl.theory.latency import LatencyModel

    h = Hierarchy.balanced([2, 3])

    def make(rounds, ckpt_path=None):
        torch.manual_seed(0)
        strategy = QMLHFLStrategy(
            hierarchy=h, taus=[2, 2], compressors=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)], partition=IID(), seed=5,
            participation=[Fraction(0.5), Full()], availability=Availability(unavailable=0.1, dropout=0.1),
            latency=LatencyModel.lognormal(h, 0.01, [1e6, 1e5], compute_sigma=0.5, seed=2, deadlines=[0.16, None],
                                           straggler="drop"))
        ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        t = _trainer(strategy, max_epochs=rounds, enable_checkpointing=True, callbacks=[ck])
        train_dl, val_dl = loaders(n_train=300, n_val=50, batch_size=8)
        t.fit(MnistCNN(lr=0.05), train_dl, val_dl, ckpt_path=ckpt_path)
        return strategy, t

    full, t = make(4)
    rec = full.history[-1]
    # per round: 2 layer-1 periods x 2 edges x round(0.5 * 3) = 2 drawn devices each
    assert 0 < rec["participants_layer1"] and rec["participants_layer1"] + rec["drops_layer1"] <= 8
    assert rec["participants_layer2"] <= 2
    assert rec["sim_time"] == pytest.approx(sum(r["time_compute"] + r["time_layer1"] + r["time_layer2"]
                                                for r in full.history), rel=1e-9)
    assert "fl/participants_layer1" in t.callback_metrics and "fl/drops_layer1" in t.callback_metrics
    make(2)
    resumed, _ = make(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.engine.state.params[0], full.engine.state.params[0])
    assert resumed.history == full.history
