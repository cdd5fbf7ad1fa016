"""The segment median and trimmed-mean kernels (lightning_qmlhfl.kernels.robust): the numba and Triton backends
against the torch reference, and the dispatch.

conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, so the Triton kernel runs in Triton's CPU
interpreter here (small sizes: every program runs in Python). The median is compared exactly; the trimmed mean
exactly too on these cases (float32 results, and sums of integers, do not depend on the order of the fp64 sum),
and to 1e-13 relative for float64 continuous data, where the backends' summation orders differ.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_qmlhfl.kernels import robust
from lightning_qmlhfl.kernels.robust import (TRITON_MAX_ROWS, choose_robust_backend, segment_median,
                                             segment_trimmed_mean)

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="Triton is not installed, or TRITON_INTERPRET is not 1 "
                                                         "(its CPU interpreter)")
DTYPES = (torch.float32, torch.float64)

# (rows per segment, columns): odd, even, one-row and empty segments; segments just above a power of two (padding);
# many columns. The Triton cases are smaller: the interpreter's tl.sort runs element by element in Python.
LAYOUTS = [((5, 1, 0, 4, 7, 2, 6, 3), 13), ((9, 0, 2), 700), ((40, 3, 1, 17), 70), ((1,), 5), ((0, 0), 3),
           ((129, 64, 65), 9)]
TRITON_LAYOUTS = [((5, 1, 0, 4, 7, 2, 6, 3), 6, None), ((17, 2, 0), 3, None), ((3, 4, 1, 0), 7, 2), ((1,), 5, None)]
BETAS = (0.0, 0.15, 0.4)


def make(counts, cols, dtype, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    segment = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(counts)])
    segment = segment[torch.randperm(len(segment), generator=g)]
    if ties:
        x = torch.randint(-4, 5, (len(segment), cols), generator=g).to(dtype)
    else:
        x = torch.randn(len(segment), cols, generator=g, dtype=torch.float64).to(dtype)
    return x, segment, len(counts)


def np_median(x, segment, S):
    out = np.zeros((S, x.shape[1]), dtype=x.numpy().dtype)
    for s in range(S):
        rows = x.numpy()[segment.numpy() == s]
        if len(rows):
            out[s] = np.median(rows, axis=0)
    return out


def assert_trimmed_equal(got, ref, dtype, ties):
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32 or ties:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)


def references(x, seg, S):
    med = segment_median(x, seg, S, backend="torch")
    np.testing.assert_array_equal(med.numpy(), np_median(x, seg, S))
    return med, {beta: segment_trimmed_mean(x, seg, S, beta, backend="torch") for beta in BETAS}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_numba_matches_the_reference(dtype, ties, layout):
    counts, cols = LAYOUTS[layout]
    x, seg, S = make(counts, cols, dtype, ties, seed=layout)
    med, trims = references(x, seg, S)
    got = segment_median(x, seg, S, backend="numba")
    assert got.dtype == dtype and got.shape == (S, cols) and torch.equal(got, med)
    for beta, ref in trims.items():
        assert_trimmed_equal(segment_trimmed_mean(x, seg, S, beta, backend="numba"), ref, dtype, ties)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("layout", range(len(TRITON_LAYOUTS)))
def test_triton_matches_the_reference(dtype, ties, layout):
    from lightning_qmlhfl.kernels.robust_triton import segment_order_stats_triton

    counts, cols, block = TRITON_LAYOUTS[layout]
    x, seg, S = make(counts, cols, dtype, ties, seed=10 + layout)
    med, trims = references(x, seg, S)
    if block is None:  # through the dispatch
        median = lambda: segment_median(x, seg, S, backend="triton")  # noqa: E731
        trimmed = lambda beta: segment_trimmed_mean(x, seg, S, beta, backend="triton")  # noqa: E731
    else:  # several column blocks per segment
        order, counts_t, offsets = robust.segment_layout(seg, S)
        median = lambda: segment_order_stats_triton(x, order, offsets, None, block=block)  # noqa: E731
        trimmed = lambda beta: segment_order_stats_triton(  # noqa: E731
            x, order, offsets, robust.trim_counts(counts_t, beta), block=block)
    got = median()
    assert got.dtype == dtype and got.shape == (S, cols) and torch.equal(got, med)
    for beta, ref in trims.items():
        assert_trimmed_equal(trimmed(beta), ref, dtype, ties)


@pytest.mark.parametrize("backend", ["torch", "numba"] + (["triton"] if TRITON_CPU else []))
def test_one_row_segments_and_strided_rows(backend):
    base = torch.randn(6, 20, dtype=torch.float64)
    x = base[:, ::2]  # columns not unit-stride
    seg = torch.tensor([2, 0, 0, 3, 0, 0])
    for out in (segment_median(x, seg, 4, backend=backend), segment_trimmed_mean(x, seg, 4, 0.25, backend=backend)):
        assert torch.equal(out[2], x[0]) and torch.equal(out[3], x[3]) and torch.equal(out[1], torch.zeros(10))
    med = segment_median(x, seg, 4, backend=backend)[0]
    rows = x[[1, 2, 4, 5]].sort(dim=0).values
    assert torch.equal(med, (rows[1] + rows[2]) * 0.5)


def test_reference_in_column_chunks(monkeypatch):
    x, seg, S = make((7, 3, 0, 12), 50, torch.float32, False)
    whole = segment_median(x, seg, S, backend="torch"), segment_trimmed_mean(x, seg, S, 0.2, backend="torch")
    monkeypatch.setattr(robust, "_TILE_ELEMENTS", 100)  # 2 columns per chunk
    chunked = segment_median(x, seg, S, backend="torch"), segment_trimmed_mean(x, seg, S, 0.2, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_reference_in_half_precision():
    x, seg, S = make((5, 4, 1), 9, torch.float32, False)
    assert choose_robust_backend(x.half(), 5) == "torch"
    got = segment_median(x.half(), seg, S)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), segment_median(x, seg, S), rtol=2e-3, atol=2e-3)


def test_auto_dispatch(monkeypatch):
    x = torch.zeros(3, 2)
    assert choose_robust_backend(x, 3) == "numba"
    assert choose_robust_backend(x.double(), 3) == "numba"
    assert choose_robust_backend(x.bfloat16(), 3) == "torch"
    monkeypatch.setattr(robust.importlib.util, "find_spec", lambda name: None)  # neither numba nor triton
    assert choose_robust_backend(x, 3) == "torch"
    with pytest.raises(ValueError, match="backend 'numba' cannot run this request: numba is not installed"):
        segment_median(x, torch.zeros(3, dtype=torch.int64), 1, backend="numba")
    assert torch.equal(segment_median(x, torch.zeros(3, dtype=torch.int64), 1), torch.zeros(1, 2))


def test_forced_backends_that_cannot_run_raise(monkeypatch):
    x = torch.randn(4, 3)
    seg = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"segment_median: backend 'numba' cannot run this request: it handles "
                                         r"float32 and float64, x is torch.float16; use backend='auto'"):
        segment_median(x.half(), seg, 2, backend="numba")
    if HAS_TRITON:
        with pytest.raises(ValueError, match=r"segment_trimmed_mean: backend 'triton' cannot run this request: it "
                                             r"handles float32 and float64, x is torch.bfloat16"):
            segment_trimmed_mean(x.bfloat16(), seg, 2, 0.1, backend="triton")
        big = torch.zeros(TRITON_MAX_ROWS + 1, 2)
        with pytest.raises(ValueError, match=rf"a segment has {TRITON_MAX_ROWS + 1} rows, more than the "
                                             rf"{TRITON_MAX_ROWS} one tile sorts"):
            segment_median(big, torch.zeros(len(big), dtype=torch.int64), 1, backend="triton")
        monkeypatch.setattr(robust, "_triton_interpret", lambda: False)
        with pytest.raises(ValueError, match=r"backend 'triton' cannot run this request: it needs CUDA tensors"):
            segment_median(x, seg, 2, backend="triton")


def test_bad_arguments():
    x = torch.randn(4, 3)
    seg = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"segment_median: backend must be 'auto', 'torch', 'numba' or 'triton', "
                                         r"got 'gpu'"):
        segment_median(x, seg, 2, backend="gpu")
    with pytest.raises(ValueError, match=r"segment_trimmed_mean: beta must be a number in \[0, 0.5\), got 0.6"):
        segment_trimmed_mean(x, seg, 2, 0.6)
    with pytest.raises(ValueError, match=r"segment_median: segment holds 2, outside \[0, 2\)"):
        segment_median(x, torch.tensor([0, 2, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"segment_median: x must be a 2-D floating point tensor"):
        segment_median(x[0], seg, 2)
    with pytest.raises(ValueError, match=r"backend must be 'torch', 'numba' or 'triton', got 'auto'"):
        robust.robust_backend_reason("auto", x, 2)


@needs_triton
def test_triton_tile_shapes():
    from lightning_qmlhfl.kernels.robust_triton import tile_shape

    assert tile_shape(0) == (2, 2048) and tile_shape(1) == (2, 2048) and tile_shape(5) == (8, 512)
    assert tile_shape(64) == (64, 64) and tile_shape(TRITON_MAX_ROWS) == (1024, 4)


_COMPILE = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightning_qmlhfl.kernels.robust_triton import segment_order_stats_kernel as fn
out = []
for dtype, median in (("*fp32", True), ("*fp64", False)):
    sig = {"x_ptr": dtype, "order_ptr": "*i64", "offsets_ptr": "*i64", "trim_ptr": "*i64", "out_ptr": dtype,
           "P": "i32", "stride_x": "i32", "stride_out": "i32", "MEDIAN": "constexpr", "KMAX": "constexpr",
           "BLOCK": "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={"MEDIAN": median, "KMAX": 16, "BLOCK": 256})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
    out.append({"fma": len(re.findall(r"\\bfma\\.", ptx)), "div_rn": len(re.findall(r"\\bdiv\\.rn\\.f64", ptx)),
                "div_approx": len(re.findall(r"\\bdiv\\.(?:full|approx)", ptx))})
print(json.dumps(out))
"""


def test_triton_kernel_compiles_for_the_gpu():
    """The real (not interpreted) kernel compiles for sm_90: the median in fp32, the trimmed mean in fp64 (the
    interpreter accepts some programs the compiler rejects). Runs in a subprocess without TRITON_INTERPRET."""
    if not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    median, trimmed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert median["fma"] == trimmed["fma"] == 0 and median["div_approx"] == trimmed["div_approx"] == 0
    assert trimmed["div_rn"] > 0  # the fp64 division of the trimmed sum is correctly rounded
