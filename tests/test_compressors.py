"""Compressors C_n: exact properties, unbiasedness, bits against hand counts, error feedback, and every fused backend
number for number against the torch reference (the per-entry definitions are written out here as the slowest,
most obviously correct version)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_qmlhfl import (QSGD, Identity, NaturalCompression, NoQuantization, RandomK, ScaledSign, TopK,
                              make_compressor, upload_bits)
from lightning_qmlhfl.compressors import layer_compressors
from lightning_qmlhfl.kernels import aggregate_layer_, aggregate_layer_torch_, backend_supports, row_uniforms
from lightning_qmlhfl.rng import row_seeds

from helpers.compress_by_hand import natural_by_hand, sign_by_hand, topk_by_hand


def _x(rows=3, d=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d, generator=g) * torch.logspace(-3, 1, d)).to(dtype)


def test_topk_matches_the_definition_and_its_error_identity():
    x = _x()
    for k in (1, 5, 37):
        c = TopK(k=k)(x)
        for r in range(x.shape[0]):
            assert c[r].tolist() == pytest.approx(topk_by_hand(x[r].tolist(), k), abs=0)
        kept = (c != 0)
        err = (c - x).pow(2).sum(1).double()
        assert torch.allclose(err, x.pow(2).sum(1).double() - (x * kept).pow(2).sum(1).double(), rtol=1e-5)
    assert torch.equal(TopK(ratio=1.0)(x), x)  # k = d is the identity
    ties = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0]])
    assert TopK(k=2)(ties).tolist() == [[0.0, -2.0, 2.0, 0.0, 0.0, 0.0]]  # ties towards the lower index
    assert TopK(k=3)(ties).tolist() == [[0.0, -2.0, 2.0, 0.0, -2.0, 0.0]]
    assert TopK(ratio=0.1).k_for(37) == 4 and TopK(ratio=0.001).k_for(37) == 1


def test_randomk_is_unbiased_by_enumeration():
    d, k = 5, 2
    x = torch.tensor([[0.3, -1.5, 2.0, 0.0, 0.7]], dtype=torch.float64)
    c = RandomK(k=k)
    subsets = list(itertools.combinations(range(d), k))
    mean = torch.zeros(d, dtype=torch.float64)
    for s in subsets:
        # the draw that selects exactly subset s: its entries get the k smallest uniforms
        u = torch.ones(1, d)
        u[0, list(s)] = torch.tensor([0.1, 0.2])
        out = c(x, uniforms=u)
        expected = torch.zeros(d, dtype=torch.float64)
        expected[list(s)] = x[0, list(s)] * (d / k)
        assert torch.equal(out[0], expected)
        mean += out[0] / len(subsets)  # every k-subset is equally likely under i.i.d. uniform draws
    torch.testing.assert_close(mean, x[0], atol=1e-15, rtol=0)
    # and the seeded draws select every entry equally often
    seeds = row_seeds(0, 0, 1, 0, 20000)
    u = row_uniforms(seeds, d, "cpu")
    picked = (c(torch.ones(20000, d), uniforms=u) != 0).float().mean(0)
    assert torch.allclose(picked, torch.full((d,), k / d), atol=0.015)  # 5 sigma of a binomial(20000, 0.4)
    assert c.error_bound(d) == d / k - 1


def test_natural_compression_matches_the_definition_and_is_unbiased():
    x = torch.tensor([[1.0, -1.5, 0.75, 3.0e-39, -1e-45, 0.0, 6.5, -0.1, 1e30]])
    u = torch.tensor([[0.3, 0.3, 0.6, 0.9, 0.1, 0.5, 0.6, 0.01, 0.99]])
    out = NaturalCompression()(x, uniforms=u)
    assert out[0].tolist() == [natural_by_hand(v, w) for v, w in zip(x[0].tolist(), u[0].tolist())]
    # unbiased, by statistics: 200k draws of one vector, 6-sigma tolerance from the per-entry variance
    v = torch.tensor([0.3, -1.7, 5.5, 1e-3])
    n = 200_000
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(1))
    draws = NaturalCompression()(v.expand(n, 4).contiguous(), uniforms=u)
    lower = 2.0 ** torch.floor(torch.log2(v.abs()))
    p = v.abs() / lower - 1
    std = lower * torch.sqrt(p * (1 - p))  # the per-entry std of C(v)
    assert ((draws.double().mean(0) - v.double()).abs() <= 6 * std.double() / math.sqrt(n)).all()
    # the variance bound 1/8: E||C - v||^2 / ||v||^2
    assert float(((draws - v) ** 2).sum(1).mean() / v.pow(2).sum()) <= 1 / 8


def test_scaled_sign_matches_the_definition_and_its_error_identity():
    x = _x(d=40)
    for bucket in (None, 8, 15):
        c = ScaledSign(bucket_size=bucket)(x)
        for r in range(x.shape[0]):
            assert c[r].tolist() == pytest.approx(sign_by_hand(x[r].tolist(), bucket), rel=1e-6)
    c = ScaledSign()(x).double()
    xd = x.double()
    err = (c - xd).pow(2).sum(1)
    torch.testing.assert_close(err, xd.pow(2).sum(1) - xd.abs().sum(1).pow(2) / 40, rtol=1e-5, atol=1e-9)
    assert ScaledSign()(torch.tensor([[0.0, -1.0]])).tolist() == [[0.5, -0.5]]  # sign(0) = +1: one bit per entry


def test_bits_against_hand_counts():
    d = 21_840  # LeNet
    assert Identity().bits(d) == 32 * d
    assert QSGD(8, bucket_size=None).bits(d) == 32 + d * 5  # one norm, sign + 4 bits for 9 level values
    assert QSGD(1, bucket_size=512).bits(d) == 32 * 43 + d * 2
    assert TopK(k=100).bits(d) == 100 * (32 + 15)  # 15 = ceil(log2 21840) index bits: cheaper than a mask
    assert TopK(ratio=0.9).bits(d) == d + 32 * math.ceil(0.9 * d)  # mask + values is cheaper for large k
    assert RandomK(k=100).bits(d) == 3200
    assert ScaledSign().bits(d) == d + 32 and ScaledSign(bucket_size=32).bits(d) == d + 32 * 683
    assert NaturalCompression().bits(d) == 9 * d
    assert upload_bits(QSGD(8, bucket_size=None), d, num_buffer_elems=10) == 32 + 5 * d + 320  # buffers at 32 bits


def test_error_feedback_with_identity_keeps_memory_zero_and_equals_no_ef():
    x = _x(rows=4, d=20)
    parent = torch.zeros(2, 20)
    idx = torch.tensor([0, 0, 1, 1])
    w = torch.full((4,), 0.5)
    seeds = row_seeds(1, 0, 1, 0, 4)
    for backend in ("torch", "numba"):
        mem = torch.zeros(4, 20)
        a, b = parent.clone(), parent.clone()
        aggregate_layer_(a, x, idx, w, Identity("ef"), seeds, backend, memory=mem)
        aggregate_layer_(b, x, idx, w, Identity(), seeds, backend)
        assert torch.equal(a, b) and torch.equal(mem, torch.zeros_like(mem))


@pytest.mark.parametrize("compressor", [TopK(k=3, error_feedback="ef"), ScaledSign(error_feedback="ef"),
                                        QSGD(2, bucket_size=None, error_feedback="ef"), NaturalCompression(error_feedback="ef")])
def test_error_feedback_telescopes(compressor):
    """float64, one sender: sum_t sent_t + e_T = sum_t Delta_t."""
    d = 16
    mem = torch.zeros(1, d, dtype=torch.float64)
    parent = torch.zeros(1, d, dtype=torch.float64)
    sent, deltas = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for t in range(6):
        delta = _x(rows=1, d=d, seed=t, dtype=torch.float64)
        out = torch.zeros(1, d, dtype=torch.float64)
        aggregate_layer_torch_(parent, delta, torch.tensor([0]), torch.ones(1, dtype=torch.float64), compressor,
                               row_seeds(0, t, 1, 0, 1), memory=mem, out=out)
        sent += out[0]
        deltas += delta[0]
    torch.testing.assert_close(sent + mem[0], deltas, atol=1e-12, rtol=1e-12)
    assert mem.abs().sum() > 0


def test_ef21_tracks_the_sent_estimate():
    """EF21: the sender's g equals the sum of what it sent, and the receiver adds g."""
    d = 12
    mem = torch.zeros(1, d, dtype=torch.float64)
    parent = torch.zeros(1, d, dtype=torch.float64)
    c = TopK(k=4, error_feedback="ef21")
    total_sent = torch.zeros(d, dtype=torch.float64)
    for t in range(5):
        delta = _x(rows=1, d=d, seed=t, dtype=torch.float64)
        g_before = mem.clone()
        out = torch.zeros(1, d, dtype=torch.float64)
        aggregate_layer_torch_(parent, delta, torch.tensor([0]), torch.ones(1, dtype=torch.float64), c,
                               row_seeds(0, t, 1, 0, 1), memory=mem, out=out)
        sent = TopK(k=4)(delta - g_before)
        total_sent += sent[0]
        torch.testing.assert_close(mem[0], total_sent, atol=1e-12, rtol=0)
        torch.testing.assert_close(out[0], mem[0], atol=0, rtol=0)  # what the receiver adds: g


# ---------------------------------------------------------------- backends against the reference
FUSED = [Identity(), QSGD(4, bucket_size=None), QSGD(3, bucket_size=7), ScaledSign(), ScaledSign(bucket_size=10),
         NaturalCompression()]
EF_MODES = [None, "ef", "ef21"]


def _with_ef(c, ef):
    kw = {k: getattr(c, k) for k in ("levels", "bucket_size") if getattr(c, k) is not None}
    if isinstance(c, QSGD):
        return QSGD(c.levels, c.bucket_size, ef)
    if isinstance(c, ScaledSign):
        return ScaledSign(c.bucket_size, ef)
    return type(c)(ef) if not kw else None


def _layer(C=7, M=3, P=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(M, P, generator=g)
    child = parent[torch.arange(C) % M] + 0.1 * torch.randn(C, P, generator=g)
    child[2] = parent[2 % M]  # a zero upload
    idx = torch.arange(C) % M
    w = torch.rand(C, generator=g) + 0.1
    mem = 0.05 * torch.randn(C, P, generator=g)
    return parent, child, idx, w, mem


@pytest.mark.parametrize("ef", EF_MODES)
@pytest.mark.parametrize("compressor", FUSED, ids=repr)
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("write_out", [False, True])
def test_numba_equals_the_torch_reference(compressor, ef, subset, write_out):
    c = _with_ef(compressor, ef)
    parent, child, idx, w, mem = _layer()
    seeds = row_seeds(5, 2, 1, 0, child.shape[0])
    rows = torch.tensor([0, 2, 3, 6]) if subset else None
    results = []
    for backend in ("torch", "numba"):
        p, m = parent.clone(), mem.clone() if ef else None
        out = torch.full_like(parent, float("nan")) if write_out else None
        norms = aggregate_layer_(p, child, idx, w, c, seeds, backend, memory=m, rows=rows, out=out)
        results.append((p, m, out, norms))
    (p0, m0, o0, n0), (p1, m1, o1, n1) = results
    assert torch.equal(p0, p1)
    if write_out:
        assert torch.equal(o0, o1) and torch.equal(p0, parent)  # the parent is untouched with out=
    if ef:
        assert torch.equal(m0, m1)
        if subset:  # rows that did not upload keep their memory
            others = torch.tensor([1, 4, 5])
            assert torch.equal(m1[others], mem[others])
    torch.testing.assert_close(n0, n1, rtol=1e-6, atol=0)


def test_fp16_and_bf16_stacks_use_the_reference_with_fp32_arithmetic():
    parent, child, idx, w, _ = _layer()
    seeds = row_seeds(0, 0, 1, 0, child.shape[0])
    for dtype in (torch.float16, torch.bfloat16):
        for c in FUSED + [TopK(k=5), RandomK(ratio=0.3)]:
            p = parent.to(dtype)
            assert not backend_supports("numba", p, child.to(dtype), c)
            aggregate_layer_(p, child.to(dtype), idx, w, c, seeds)  # auto: the torch reference
            expected = parent.to(dtype).float()
            aggregate_layer_torch_(expected, child.to(dtype).float(), idx, w, c, seeds)
            torch.testing.assert_close(p.float(), expected.to(dtype).float(), rtol=0, atol=0)


def test_dispatch_never_hands_a_backend_what_it_cannot_run():
    parent, child, idx, w, _ = _layer()
    seeds = row_seeds(0, 0, 1, 0, child.shape[0])
    for c in (TopK(k=3), RandomK(k=3)):
        assert not backend_supports("numba", parent, child, c)
        aggregate_layer_(parent.clone(), child, idx, w, c, seeds)  # auto picks the reference
        with pytest.raises(ValueError, match="backend 'numba' does not implement TopK|backend 'numba' does not "
                                             "implement RandomK"):
            aggregate_layer_(parent.clone(), child, idx, w, c, seeds, "numba")
    assert backend_supports("numba", parent, child, NaturalCompression("ef21"))
    fused = {type(c) for c in (Identity(), QSGD(4, bucket_size=None), ScaledSign(), NaturalCompression(), TopK(k=3), RandomK(k=3))
             if c.fused_spec() is not None}
    assert fused == {Identity, QSGD, ScaledSign, NaturalCompression}


def test_non_finite_upload_writes_nothing():
    parent, child, idx, w, mem = _layer()
    child[4, 3] = float("nan")
    seeds = row_seeds(0, 0, 1, 0, child.shape[0])
    for backend in ("torch", "numba"):
        p, m = parent.clone(), mem.clone()
        norms = aggregate_layer_(p, child, idx, w, ScaledSign(error_feedback="ef"), seeds, backend, memory=m)
        assert not torch.isfinite(norms[4]).all() and torch.isfinite(norms[0]).all()
        assert torch.equal(p, parent) and torch.equal(m, mem)


# ---------------------------------------------------------------- configuration and bad input
def test_config_values_and_aliases():
    assert NoQuantization is Identity and repr(Identity("ef")) == "Identity(error_feedback='ef')"
    assert make_compressor({"name": "topk", "ratio": 0.01, "error_feedback": "ef"}) == TopK(ratio=0.01,
                                                                                            error_feedback="ef")
    assert make_compressor("natural") == NaturalCompression()
    assert make_compressor({"levels": 4, "bucket_size": 8}) == QSGD(4, 8)
    layers = layer_compressors(["topk", "qsgd", "sign"], 3, ratio=0.01, levels=[None, 8, None], bucket_size=512,
                               error_feedback=["ef", None, "ef21"])
    assert layers == [TopK(ratio=0.01, error_feedback="ef"), QSGD(8, 512), ScaledSign(512, "ef21")]
    assert layer_compressors("qsgd", 2, levels=[4, None]) == [QSGD(4), Identity()]


@pytest.mark.parametrize("build, match", [
    (lambda: TopK(ratio=0.0), r"ratio must be a number in \(0, 1\]"),
    (lambda: TopK(ratio=1.5), r"ratio must be a number in \(0, 1\]"),
    (lambda: RandomK(ratio=-0.1), r"ratio must be a number in \(0, 1\]"),
    (lambda: TopK(k=0), "k must be an integer >= 1"),
    (lambda: TopK(), "exactly one of ratio"),
    (lambda: TopK(ratio=0.1, k=3), "exactly one of ratio"),
    (lambda: QSGD(4, bucket_size=None, error_feedback="ef3"), "error_feedback must be None, 'ef' or 'ef21'"),
    (lambda: ScaledSign(bucket_size=0), "bucket_size must be None or an integer >= 1"),
    (lambda: make_compressor({"name": "topk", "levels": 3}), r"TopK takes the options \['ratio', 'k', "),
    (lambda: make_compressor("zip"), "unknown compressor 'zip'"),
    (lambda: layer_compressors(["topk", "qsgd"], 3, ratio=0.1), "compressor.layers has 2 entries"),
    (lambda: TopK(k=50).check_dims(40), "k = 50 is larger than the upload's d = 40"),
])
def test_bad_input(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("ef", EF_MODES)
@pytest.mark.parametrize("compressor", [Identity(), QSGD(3, bucket_size=None), QSGD(5, bucket_size=3000), ScaledSign(),
                                        ScaledSign(bucket_size=5000), NaturalCompression()], ids=repr)
def test_numba_equals_the_torch_reference_over_several_column_blocks(compressor, ef):
    """Rows wider than the numba kernel's column block (4096): blocks that end inside a bucket, buckets split
    over two blocks, a last block and a last bucket that are shorter, column offsets not a multiple of 4."""
    c = _with_ef(compressor, ef)
    parent, child, idx, w, mem = _layer(P=9001, seed=3)
    seeds = row_seeds(11, 0, 2, 1, child.shape[0])
    rows = torch.tensor([1, 2, 5, 6])
    results = []
    for backend in ("torch", "numba"):
        p, m = parent.clone(), mem.clone() if ef else None
        norms = aggregate_layer_(p, child, idx, w, c, seeds, backend, memory=m, rows=rows)
        results.append((p, m, norms))
    (p0, m0, n0), (p1, m1, n1) = results
    assert torch.equal(p0, p1) and not torch.equal(p0, parent)
    if ef:
        assert torch.equal(m0, m1)
    torch.testing.assert_close(n0, n1, rtol=1e-6, atol=0)
