"""The robust aggregators (lightning_qmlhfl.robust.aggregators) against plain numpy references: one Python loop over
the segments, each segment's rows taken out and reduced with np.median, a numpy (and scipy) trimmed mean, numpy
Krum, numpy Weiszfeld and numpy centred clipping, all in float64 (the median in x's dtype, as numpy.median).

The cases have segments of many sizes (even and odd, one row, none), rows of different segments interleaved, and
either integer-valued rows (many exact ties: the median, the trimmed mean and Krum's scores are then exact in
every order of summation, so those comparisons are exact) or continuous ones; float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_qmlhfl.robust import (ROBUST_AGGREGATORS, CenteredClipping, CoordinateMedian, GeometricMedian, Krum,
                                     Mean, RobustAggregator, RobustResult, TrimmedMean, layer_robust_aggregators,
                                     make_robust_aggregator)

COUNTS = (5, 1, 0, 4, 7, 2, 6, 3, 8)  # rows per segment: odd, one, none, even, ...
P = 11
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def make_case(seed: int, dtype: torch.dtype, ties: bool, counts=COUNTS, cols: int = P):
    """x [k, P] and segment [k]: segment s has counts[s] rows, the rows of all segments shuffled together."""
    g = torch.Generator().manual_seed(seed)
    segment = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(counts)])
    segment = segment[torch.randperm(len(segment), generator=g)]
    k = len(segment)
    if ties:
        x = torch.randint(-3, 4, (k, cols), generator=g).to(dtype)
    else:
        x = (torch.randn(k, cols, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return x, segment, len(counts)


def per_segment(x: torch.Tensor, segment: torch.Tensor, S: int, fn, dtype=np.float64):
    """[S, P] from fn(rows of segment s as numpy, in row-index order), zeros for an empty segment."""
    out = np.zeros((S, x.shape[1]), dtype=dtype)
    xn, sn = x.numpy(), segment.numpy()
    for s in range(S):
        rows = xn[sn == s]
        if len(rows):
            out[s] = fn(rows)
    return out


def np_trimmed(rows: np.ndarray, beta: float) -> np.ndarray:
    n = len(rows)
    g = int(beta * n)
    return np.sort(rows.astype(np.float64), axis=0)[g:n - g].mean(axis=0)


def np_krum(rows: np.ndarray, f: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, indices into rows of the picked rows): Blanchard et al.'s scores with the documented small-segment
    rule q = max(1, n - f - 2), the m lowest scores (ties to the lower index), their mean."""
    r = rows.astype(np.float64)
    n = len(r)
    if n == 1:
        return r[0], np.array([0])
    q = max(1, n - f - 2)
    d2 = ((r[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    scores = np.array([np.sort(np.delete(d2[i], i))[:q].sum() for i in range(n)])
    pick = np.argsort(scores, kind="stable")[:min(m, n)]
    return r[np.sort(pick)].mean(axis=0), pick


def np_weiszfeld(rows: np.ndarray, iters: int, nu: float) -> np.ndarray:
    r = rows.astype(np.float64)
    if len(r) == 1:
        return r[0]
    v = r.mean(axis=0)
    for _ in range(iters):
        b = 1.0 / np.maximum(nu, np.linalg.norm(r - v, axis=1))
        v = (b[:, None] * r).sum(axis=0) / b.sum()
    return v


def np_centered_clip(rows: np.ndarray, tau: float, iters: int) -> np.ndarray:
    r = rows.astype(np.float64)
    if len(r) == 1:
        return r[0]
    v = np.zeros(r.shape[1])
    for _ in range(iters):
        d = r - v
        norm = np.linalg.norm(d, axis=1)
        scale = np.minimum(1.0, tau / np.where(norm > 0, norm, np.inf))
        v = v + (d * scale[:, None]).mean(axis=0)
    return v


def check_common(res: RobustResult, x, segment, S):
    """Shape, dtype, counts, empty segments zero, one-row segments that row bit for bit."""
    assert res.value.shape == (S, x.shape[1]) and res.value.dtype == x.dtype
    assert torch.equal(res.counts, torch.bincount(segment, minlength=S)) and res.counts.dtype == torch.int64
    for s in range(S):
        rows = (segment == s).nonzero().flatten()
        if len(rows) == 0:
            assert torch.equal(res.value[s], torch.zeros_like(res.value[s]))
        elif len(rows) == 1:
            assert torch.equal(res.value[s], x[rows[0]]), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
def test_mean(dtype, ties):
    x, seg, S = make_case(1, dtype, ties)
    res = Mean().aggregate(x, seg, S)
    check_common(res, x, seg, S)
    assert res.selected is None and res.rejected == 0 and Mean().is_mean
    np.testing.assert_allclose(res.value.numpy(), per_segment(x, seg, S, lambda r: r.astype(np.float64).mean(0)),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("backend", ["auto", "torch", "numba"])
def test_median(dtype, ties, backend):
    x, seg, S = make_case(2, dtype, ties)
    res = CoordinateMedian().aggregate(x, seg, S, backend=backend)
    check_common(res, x, seg, S)
    ref = per_segment(x, seg, S, lambda r: np.median(r, axis=0), dtype=x.numpy().dtype)
    np.testing.assert_array_equal(res.value.numpy(), ref)  # exact: numpy's even rule in x's dtype
    assert res.selected is None and res.rejected == 0 and not CoordinateMedian().is_mean


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.25, 0.49])
def test_trimmed_mean(dtype, ties, beta):
    x, seg, S = make_case(3, dtype, ties)
    for backend in ("torch", "numba"):
        res = TrimmedMean(beta).aggregate(x, seg, S, backend=backend)
        check_common(res, x, seg, S)
        ref = per_segment(x, seg, S, lambda r: np_trimmed(r, beta))
        if ties:  # fp64 sums of small integers are exact: one rounding to x's dtype, as the reference's
            np.testing.assert_array_equal(res.value.numpy(), ref.astype(x.numpy().dtype))
        else:
            np.testing.assert_allclose(res.value.numpy(), ref, **TOL[dtype])


def test_trimmed_mean_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    x, seg, S = make_case(4, torch.float64, False, counts=(10, 9, 1, 20, 4))
    for beta in (0.05, 0.1, 0.3, 0.45):
        res = TrimmedMean(beta).aggregate(x, seg, S).value.numpy()
        np.testing.assert_allclose(res, per_segment(x, seg, S, lambda r: stats.trim_mean(r, beta, axis=0)),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("f,m", [(0, 1), (1, 1), (2, 1), (1, 3), (3, 4), (5, 2)])
def test_krum(dtype, ties, f, m):
    x, seg, S = make_case(5 + f + m, dtype, ties)
    res = Krum(f, m).aggregate(x, seg, S)
    check_common(res, x, seg, S)
    expected_sel = np.zeros(len(seg), dtype=bool)
    ref = np.zeros((S, x.shape[1]))
    for s in range(S):
        idx = (seg == s).nonzero().flatten().numpy()
        if len(idx):
            ref[s], pick = np_krum(x.numpy()[idx], f, m)
            expected_sel[idx[pick]] = True
            assert len(pick) == min(m, len(idx))
    assert res.selected.dtype == torch.bool
    np.testing.assert_array_equal(res.selected.numpy(), expected_sel)
    assert res.rejected == len(seg) - expected_sel.sum()
    if m == 1:  # Krum returns one of the rows itself
        np.testing.assert_array_equal(res.value.numpy(), ref.astype(x.numpy().dtype))
    else:
        np.testing.assert_allclose(res.value.numpy(), ref, **TOL[dtype])


def test_krum_rejects_an_outlier_and_ties_go_to_the_lower_index():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [0.0, 1.0], [1.0, 1.0]])
    seg = torch.zeros(5, dtype=torch.int64)
    res = Krum(f=1).aggregate(x, seg, 1)
    # scores over q = 2 neighbours: rows 0, 1, 3, 4 all score 1 + 1 = 2: the lowest index wins
    assert res.selected.tolist() == [True, False, False, False, False] and res.rejected == 4
    assert torch.equal(res.value[0], x[0])
    res = Krum(f=1, m=4).aggregate(x, seg, 1)
    assert res.selected.tolist() == [True, True, False, True, True]
    assert torch.equal(res.value[0], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("iters,nu", [(1, 1e-6), (10, 1e-6), (25, 1e-3)])
def test_geometric_median(dtype, iters, nu):
    x, seg, S = make_case(6, dtype, False)
    res = GeometricMedian(iters, nu).aggregate(x, seg, S)
    check_common(res, x, seg, S)
    np.testing.assert_allclose(res.value.numpy(), per_segment(x, seg, S, lambda r: np_weiszfeld(r, iters, nu)),
                               **{torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: TOL[dtype]}[dtype])


def test_geometric_median_resists_an_outlier():
    x = torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.05], [1e6, -1e6]], dtype=torch.float64)
    res = GeometricMedian(iters=50).aggregate(x, torch.zeros(5, dtype=torch.int64), 1)
    assert torch.linalg.vector_norm(res.value[0] - 1.0) < 0.2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau,iters", [(1.0, 3), (0.3, 1), (5.0, 4), (1e3, 2)])
def test_centered_clipping(dtype, tau, iters):
    x, seg, S = make_case(7, dtype, False)
    res = CenteredClipping(tau, iters).aggregate(x, seg, S)
    check_common(res, x, seg, S)
    np.testing.assert_allclose(res.value.numpy(), per_segment(x, seg, S, lambda r: np_centered_clip(r, tau, iters)),
                               **{torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: TOL[dtype]}[dtype])
    if tau == 1e3:  # nothing clipped: the first step is the mean, the second moves by zero
        np.testing.assert_allclose(res.value.numpy(), Mean().aggregate(x, seg, S).value.numpy(), **TOL[dtype])


def test_identical_rows_give_that_row():
    x = torch.tensor([[1.5, -2.0, 3.25]] * 4 + [[0.5, 0.5, 0.5]] * 3, dtype=torch.float32)
    seg = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    for a in (Mean(), CoordinateMedian(), TrimmedMean(0.3), Krum(0, 2), GeometricMedian(), CenteredClipping(10.0)):
        res = a.aggregate(x, seg, 2).value
        torch.testing.assert_close(res, x[[0, 4]], rtol=1e-6, atol=0, msg=repr(a))


def test_no_rows_and_no_columns():
    for a in (Mean(), CoordinateMedian(), TrimmedMean(), Krum(), GeometricMedian(), CenteredClipping()):
        res = a.aggregate(torch.empty(0, 4), torch.empty(0, dtype=torch.int64), 3)
        assert torch.equal(res.value, torch.zeros(3, 4)) and res.counts.tolist() == [0, 0, 0]
        res = a.aggregate(torch.empty(3, 0), torch.tensor([0, 0, 1]), 2)
        assert res.value.shape == (2, 0) and res.counts.tolist() == [2, 1]


def test_gradients_are_not_tracked():
    x = torch.randn(6, 3, requires_grad=True)
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    for a in (Mean(), CoordinateMedian(), TrimmedMean(), Krum(), GeometricMedian(), CenteredClipping()):
        assert not a.aggregate(x, seg, 2).value.requires_grad


AGGREGATORS = [Mean(), CoordinateMedian(), TrimmedMean(), TrimmedMean(0.3), Krum(), Krum(f=2, m=3),
               GeometricMedian(), GeometricMedian(iters=4, nu=1e-3), CenteredClipping(), CenteredClipping(0.5, 7)]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=repr)
def test_config_round_trip(agg):
    cfg = agg.to_config()
    assert cfg["name"] == agg.config_name and set(cfg) == {"name", *agg.config_options}
    again = make_robust_aggregator(cfg)
    assert again == agg and hash(again) == hash(agg) and repr(again) == repr(agg)
    assert make_robust_aggregator(agg) is agg
    assert make_robust_aggregator(agg.config_name) == type(agg)()
    assert isinstance(agg, RobustAggregator) and ROBUST_AGGREGATORS[agg.config_name] is type(agg)


def test_equality_is_by_config():
    assert TrimmedMean(0.2) == TrimmedMean(0.2) and TrimmedMean(0.2) != TrimmedMean(0.1)
    assert Krum(1, 2) != Krum(2, 1) and Mean() != CoordinateMedian()
    assert len({Krum(1, 2), Krum(1, 2), Mean()}) == 2
    assert make_robust_aggregator(None) == Mean()
    assert make_robust_aggregator({"name": "krum", "f": 2, "m": None}) == Krum(2, 1)
    assert repr(Krum(2, 3)) == "Krum(f=2, m=3)"


def test_layer_robust_aggregators():
    layers = layer_robust_aggregators(["krum", "trimmed_mean", None], 3, f=[2, None, None], beta=0.3, m=None)
    assert layers == [Krum(2, 1), TrimmedMean(0.3), Mean()]
    assert layer_robust_aggregators("geomed", 2, iters=[3, 5]) == [GeometricMedian(3), GeometricMedian(5)]
    assert layer_robust_aggregators(None, 2) == [Mean(), Mean()]
    with pytest.raises(ValueError, match=r"robust.layers\[1\] = 'bulyan' is not a robust aggregator"):
        layer_robust_aggregators(["mean", "bulyan"], 2)
    with pytest.raises(ValueError, match="robust.f has 3 entries"):
        layer_robust_aggregators("krum", 2, f=[1, 2, 3])


@pytest.mark.parametrize("make,message", [
    (lambda: TrimmedMean(0.5), r"TrimmedMean beta must be a number in \[0, 0.5\), got 0.5"),
    (lambda: TrimmedMean(-0.1), r"TrimmedMean beta must be .*got -0.1"),
    (lambda: TrimmedMean("0.1"), r"TrimmedMean beta must be .*got '0.1'"),
    (lambda: Krum(f=-1), r"Krum f must be an integer >= 0, got -1"),
    (lambda: Krum(f=1.5), r"Krum f must be an integer >= 0, got 1.5"),
    (lambda: Krum(m=0), r"Krum m must be an integer >= 1, got 0"),
    (lambda: Krum(m=True), r"Krum m must be an integer >= 1, got True"),
    (lambda: GeometricMedian(iters=0), r"GeometricMedian iters must be an integer >= 1, got 0"),
    (lambda: GeometricMedian(nu=0.0), r"GeometricMedian nu must be a finite number > 0, got 0.0"),
    (lambda: CenteredClipping(tau=-1), r"CenteredClipping tau must be a finite number > 0, got -1"),
    (lambda: CenteredClipping(tau=float("inf")), r"CenteredClipping tau must be .*got inf"),
    (lambda: CenteredClipping(iters=2.0), r"CenteredClipping iters must be an integer >= 1, got 2.0"),
    (lambda: make_robust_aggregator("bulyan"), r"unknown robust aggregator 'bulyan'; allowed: \['centered_clip'"),
    (lambda: make_robust_aggregator({"name": "krum", "beta": 0.1}), r"Krum takes the options \['f', 'm'\], got "
                                                                     r"also \['beta'\]"),
    (lambda: make_robust_aggregator(3), r"cannot build a robust aggregator from 3"),
])
def test_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs():
    x = torch.randn(4, 3)
    seg = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"Mean: segment holds 2, outside \[0, 2\)"):
        Mean().aggregate(x, torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match=r"Krum: segment holds -1"):
        Krum().aggregate(x, torch.tensor([0, -1, 1, 0]), 2)
    with pytest.raises(ValueError, match=r"segment must be an integer tensor of shape \(4,\)"):
        Mean().aggregate(x, seg[:3], 2)
    with pytest.raises(ValueError, match=r"segment must be an integer tensor .*dtype torch.float32"):
        Mean().aggregate(x, seg.float(), 2)
    with pytest.raises(ValueError, match=r"x must be a 2-D floating point tensor .*dtype torch.int64"):
        CoordinateMedian().aggregate(x.long(), seg, 2)
    with pytest.raises(ValueError, match=r"num_segments must be an integer >= 0, got -1"):
        Mean().aggregate(x, seg, -1)
    with pytest.raises(ValueError, match=r"backend must be 'auto', 'torch', 'numba' or 'triton', got 'cuda'"):
        TrimmedMean().aggregate(x, seg, 2, backend="cuda")
    with pytest.raises(TypeError, match=r"x must be a Tensor"):
        Mean().aggregate(x.numpy(), seg, 2)


def test_check_children():
    Krum(f=2).check_children(5, layer=1)
    with pytest.raises(ValueError, match=r"Krum\(f=2, m=1\) at layer 1 needs at least f \+ 3 = 5 children per "
                                         r"parent .*got a parent with 4"):
        Krum(f=2).check_children(4, layer=1)
    with pytest.raises(ValueError, match=r"Krum\(f=1, m=4\) at layer 2 averages m = 4 rows, more than n - f = 3"):
        Krum(f=1, m=4).check_children(4, layer=2)
    Krum(f=1, m=4).check_children(5, layer=2)
    for a in (Mean(), CoordinateMedian(), TrimmedMean(0.4), GeometricMedian(), CenteredClipping()):
        a.check_children(1, layer=1)
        a.check_children(0, layer=3)
    with pytest.raises(ValueError, match=r"min_children must be an integer >= 0, got -1"):
        Mean().check_children(-1, layer=1)
