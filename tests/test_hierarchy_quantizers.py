"""Hierarchy validation and the QSGD quantizer's statistical and numerical properties."""

import math

import pytest
import torch

from lightning_qmlhfl import QSGD, Hierarchy, NoQuantization, make_quantizer
from lightning_qmlhfl.compressors import row_norms


# ---------------------------------------------------------------- hierarchy
def test_balanced_shape_counts_and_weights():
    h = Hierarchy.balanced([4, 5, 5])
    assert h.num_layers == 3
    assert h.num_devices == 100
    assert h.nodes_per_layer == (100, 20, 4, 1)
    assert h.device_counts[1].tolist() == [5] * 20
    assert h.device_counts[2].tolist() == [25] * 4
    assert h.device_counts[3].tolist() == [100]
    # device 7 sits under edge 1 (devices 5..9), which sits under layer-2 node 0
    assert int(h.parent_index(0)[7]) == 1
    assert int(h.ancestor_index(0, 2)[7]) == 0
    assert int(h.ancestor_index(0, 2)[30]) == 1
    for n in range(1, 4):
        w = h.aggregation_weights(n)
        sums = torch.zeros(h.nodes_per_layer[n], dtype=torch.float64).index_add_(0, h.parent_index(n - 1), w)
        assert torch.allclose(sums, torch.ones_like(sums))
    assert h.aggregation_weights(3).tolist() == [0.25] * 4


def test_irregular_tree_weights():
    # layer0: 6 devices -> parents [0,0,0,1,2,2]; layer1: 3 edges -> [0,0,1]; layer2: 2 -> cloud
    h = Hierarchy.from_parents([[0, 0, 0, 1, 2, 2], [0, 0, 1], [0, 0]])
    assert h.nodes_per_layer == (6, 3, 2, 1)
    assert h.device_counts[1].tolist() == [3, 1, 2]
    assert h.device_counts[2].tolist() == [4, 2]
    assert h.aggregation_weights(1).tolist() == pytest.approx([1 / 3] * 3 + [1.0] + [0.5, 0.5])
    assert h.aggregation_weights(2).tolist() == pytest.approx([3 / 4, 1 / 4, 1.0])
    assert h.aggregation_weights(3).tolist() == pytest.approx([4 / 6, 2 / 6])
    assert h.children(1, 0) == [0, 1, 2]
    # sample weighting: node mass = summed device mass
    mass = torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 3.0])
    assert h.aggregation_weights(1, mass).tolist() == pytest.approx([0.25, 0.25, 0.5, 1.0, 0.25, 0.75])
    assert h.aggregation_weights(3, mass).tolist() == pytest.approx([8 / 12, 4 / 12])


@pytest.mark.parametrize(
    "parents, match",
    [
        ([], "at least one aggregation layer"),
        ([[]], "layer 0 is empty"),
        ([[0, 2], [0, 0, 0]], "node 1 of layer 1 has no children"),
        ([[0, 1], [0, 1]], "parent index out of range"),
        ([[0, -1], [0, 0]], "parent index out of range"),
        ([[0, 1, 1], [0, 0, 0]], "depth mismatch"),
        ([[0, 0.5]], "must be an integer"),
    ],
)
def test_from_parents_errors(parents, match):
    with pytest.raises(ValueError, match=match):
        Hierarchy.from_parents(parents)


@pytest.mark.parametrize("branching, match", [([4, 0], "branching\\[1\\]"), ([2.5], "integer"), ([], "at least one"),
                                              ("45", "list of integers"), ([True], "integer")])
def test_balanced_errors(branching, match):
    with pytest.raises(ValueError, match=match):
        Hierarchy.balanced(branching)


# ---------------------------------------------------------------- quantizer
@pytest.mark.parametrize("levels", [0, -1, 2.0, "8", True])
def test_qsgd_bad_levels(levels):
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        QSGD(levels, bucket_size=None)


@pytest.mark.parametrize("bucket", [0, 3.5])
def test_qsgd_bad_bucket(bucket):
    with pytest.raises(ValueError, match="bucket_size"):
        QSGD(4, bucket_size=bucket)


def test_make_quantizer_specs():
    assert make_quantizer(None) == NoQuantization()
    assert make_quantizer("none") == NoQuantization()
    assert make_quantizer(8) == QSGD(8)
    assert make_quantizer({"levels": 4, "bucket_size": 16}) == QSGD(4, 16)
    with pytest.raises(ValueError, match="cannot build a compressor"):
        make_quantizer(2.5)


def _draws(q, x, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([q(x, generator=g)[0] for _ in range(n)])


@pytest.mark.parametrize("levels, bucket", [(1, None), (4, None), (16, None), (4, 8)])
def test_qsgd_unbiased_and_variance_bound(levels, bucket):
    torch.manual_seed(1)
    d = 40
    x = torch.randn(1, d) * torch.linspace(0.1, 3, d)
    q = QSGD(levels, bucket)
    n = 6000
    samples = _draws(q, x, n)
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(n)
    # unbiased: every coordinate within 5 standard errors (plus fp slack for zero-variance coordinates)
    assert ((mean - x[0]).abs() <= 5 * se + 1e-6).all()
    err = ((samples - x) ** 2).sum(1).mean()
    bound = q.variance_bound(d) * (x**2).sum()
    assert err <= bound
    # levels are integers in [-s, s]
    enc = q.encode(x, generator=torch.Generator().manual_seed(3))
    assert enc.levels.dtype in (torch.int16, torch.int32)
    assert enc.levels.abs().max() <= levels


def test_qsgd_levels_match_definition():
    """xi_j is floor(s|x_j|/||x||) or one more, and the probability of 'one more' is the fractional part."""
    x = torch.tensor([[3.0, -4.0, 0.0]])  # norm 5
    q = QSGD(2, bucket_size=None)
    # s|x|/||x|| = [1.2, 1.6, 0]
    u = torch.tensor([[0.19, 0.61, 0.0]])
    assert q.encode(x, uniforms=u).levels.tolist() == [[2, -1, 0]]
    u = torch.tensor([[0.21, 0.59, 0.99]])
    assert q.encode(x, uniforms=u).levels.tolist() == [[1, -2, 0]]
    assert torch.allclose(q(x, uniforms=u), torch.tensor([[2.5, -5.0, 0.0]]))


def test_zero_vector_is_exact_zero():
    q = QSGD(4, bucket_size=None)
    out = q(torch.zeros(3, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros(3, 17))
    qb = QSGD(4, bucket_size=5)
    x = torch.zeros(2, 17)
    x[0, 12] = 1.0  # buckets 0, 1 of row 0 are all zero; bucket 2 is not
    out = qb(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[1], torch.zeros(17))
    assert torch.equal(out[0, :10], torch.zeros(10))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_tiny_and_huge_norms(scale):
    torch.manual_seed(0)
    x = torch.randn(2, 100) * scale
    q = QSGD(8, bucket_size=None)
    out = q(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    norms = row_norms(x)
    assert torch.isfinite(norms).all() and (norms > 0).all()
    rel = (norms[:, 0] / (x.double().norm(dim=1))).double()
    assert torch.allclose(rel, torch.ones_like(rel), atol=1e-6)
    # the quantized vector has the right scale: every entry is a multiple of ||x||/s
    ratio = out / (norms / 8)
    assert torch.allclose(ratio, ratio.round(), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    torch.manual_seed(0)
    x32 = torch.randn(3, 64)
    x = x32.to(dtype)
    q = QSGD(16, bucket_size=None)
    u = torch.rand(3, 64, generator=torch.Generator().manual_seed(5))
    out = q(x, uniforms=u)
    ref = q(x.to(torch.float32), uniforms=u)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    # an fp16 vector whose squared entries overflow fp16 (> 65504) still has a finite norm
    big = torch.full((1, 8), 300.0, dtype=torch.float16)
    assert torch.isfinite(q(big, uniforms=torch.rand(1, 8))).all()


def test_bits_accounting():
    q = QSGD(8, bucket_size=None)
    # 32 (norm) + d * (1 sign + ceil(log2(9)) = 4 level bits)
    assert q.bits(1000) == 32 + 1000 * 5
    assert QSGD(8, bucket_size=300).bits(1000) == 4 * 32 + 1000 * 5
    assert QSGD(1, bucket_size=None).bits(10) == 32 + 10 * 2
    assert NoQuantization().bits(1000) == 32000 == q.baseline_bits(1000)
    assert q.variance_bound(64) == min(64 / 64, 8 / 8)
    assert QSGD(2, bucket_size=None).variance_bound(100) == min(100 / 4, 10 / 2)
    assert NoQuantization().variance_bound(100) == 0.0


def test_layer_quantizers_from_config_values():
    from lightning_qmlhfl.compressors import layer_quantizers

    assert layer_quantizers(8, None, 3) == [QSGD(8, bucket_size=None)] * 3
    assert layer_quantizers([4, None, "none"], 512, 3) == [QSGD(4, 512), NoQuantization(), NoQuantization()]
    assert layer_quantizers([4, 8], [None, 64], 2) == [QSGD(4, bucket_size=None), QSGD(8, 64)]
    with pytest.raises(ValueError, match="quantizer.levels has 2 entries .* N = 3"):
        layer_quantizers([4, 8], None, 3)
    with pytest.raises(ValueError, match="quantizer.bucket_size has 1 entries .* N = 2"):
        layer_quantizers(4, [16], 2)
