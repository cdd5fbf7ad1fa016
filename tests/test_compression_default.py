"""The default compressor (QSGD with buckets of 512) and the warning for uploads that lose too much to
compression."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_qmlhfl import QSGD, Hierarchy, QMLHFLEngine, QMLHFLStrategy, SimulationConfig, make_compressor
from lightning_qmlhfl.compressors.qsgd import DEFAULT_BUCKET
from lightning_qmlhfl.simulation.stages import CompressionWarning, MeasureCompression
from lightning_qmlhfl.theory.convergence import quantizer_variances

from test_engine import ce_loss, make_batches


def test_qsgd_defaults_to_buckets_of_512():
    assert DEFAULT_BUCKET == 512
    assert QSGD(8).bucket_size == 512 and make_compressor(8).bucket_size == 512
    assert make_compressor({"name": "qsgd", "levels": 4}).bucket_size == 512
    assert QSGD(8, bucket_size=None).bucket_size is None
    assert repr(QSGD(8)) == "QSGD(8)" and repr(QSGD(8, bucket_size=None)) == "QSGD(8, bucket_size=None)"
    # checkpoints of format 1 wrote the reprs of the time, when one norm per upload was the default
    assert QSGD(8, bucket_size=None).legacy_repr() == "QSGD(8)"
    assert QSGD(8).legacy_repr() == "QSGD(8, bucket_size=512)"
    assert make_compressor(QSGD(8, bucket_size=None).to_config()) == QSGD(8, bucket_size=None)
    strategy = QMLHFLStrategy()
    assert all(c == QSGD(8) for c in strategy.core.config.compressors)
    # the theory's q(s, d) follows the bucket: min(b / s^2, sqrt(b) / s) with b = 512, not d
    d = 100_000
    assert quantizer_variances([QSGD(8)], d) == [pytest.approx(min(512 / 64, 512 ** 0.5 / 8))]
    assert quantizer_variances([QSGD(8, bucket_size=None)], d) == [pytest.approx(min(d / 64, d ** 0.5 / 8))]


class Wide(nn.Module):
    """An MLP with 20,000+ parameters: big enough for one norm per upload to lose most of the signal."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 2000), nn.Linear(2000, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _engine(compressor, **options):
    torch.manual_seed(0)
    config = SimulationConfig.build(Hierarchy.balanced([4]), [1], [compressor], seed=0, **options)
    return QMLHFLEngine(Wide(), ce_loss, optimizer="sgd", optimizer_kwargs={"lr": 0.1}, config=config)


def _run(engine, steps=5):
    for b in make_batches(4, steps):
        engine.local_step(b)
    return engine


def _measured(engine):
    return engine.layers[0].stage(MeasureCompression)


def test_one_norm_per_upload_of_a_large_model_warns_once():
    with pytest.warns(CompressionWarning, match=r"layer 1's uploads lose much to compression: .* QSGD\(8, "
                                                r"bucket_size=None\) .* Use buckets") as record:
        engine = _run(_engine(QSGD(8, bucket_size=None)))
    assert len([w for w in record if w.category is CompressionWarning]) == 1
    stage = _measured(engine)
    d = engine.num_params
    # realised error between the typical sqrt(d)/s regime's half and the variance bound
    assert 0.2 * d ** 0.5 / 8 < stage.mean <= QSGD(8, bucket_size=None).error_bound(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        bucketed = _run(_engine(QSGD(8)))
    assert _measured(bucketed).mean <= QSGD(8).error_bound(d) and _measured(bucketed).mean > 0


def test_measuring_changes_no_number_and_can_be_switched_off():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        a = _run(_engine(QSGD(8, bucket_size=None, error_feedback="ef")))
    b = _run(_engine(QSGD(8, bucket_size=None, error_feedback="ef"), compression_warning=None))
    assert _measured(b) is None
    assert torch.equal(a.state.params[0], b.state.params[0]) and torch.equal(a.cloud_params(), b.cloud_params())
    with pytest.raises(ValueError, match="compression_warning"):
        _engine(QSGD(8), compression_warning=-1.0)


def test_the_measured_error_is_the_uploads_own():
    """The stage's number equals ||C(x) - x||^2 / ||x||^2 of what the layer actually sent (the EF memory after
    an "ef" aggregation holds x - C(x) exactly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        engine = _engine(QSGD(2, bucket_size=None, error_feedback="ef"))
        stage = _measured(engine)
        stage.samples = 1
        params = engine.state.params
        before = {}
        real = stage.apply

        def spy(sim, ctx):
            before["x"] = (params[0][:2].double() - params[1][0].double())
            return real(sim, ctx)

        stage.apply = spy
        engine.local_step(make_batches(4, 1)[0])
    x = before["x"]
    err = engine.memory[0][:2].double()  # e = x - C(x) (memory was zero before)
    expected = float((err.pow(2).sum(1) / x.pow(2).sum(1)).mean())
    assert stage.mean == pytest.approx(expected, rel=1e-5)
