"""The Triton quantize-and-aggregate kernels against the torch reference (run in Triton's interpreter on CPU).

conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels. Sizes are small because the interpreter
runs every program in Python. With the same uniforms the kernel and the reference agree bit for bit on CPU
(no FMA contraction, correctly rounded divisions, children summed in the same order), so most comparisons
here are exact; the statistical tests use many seeds with fixed values, so they are deterministic too.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lightning_qmlhfl.kernels import aggregate_layer_, aggregate_layer_torch_, row_uniforms, triton_available
from lightning_qmlhfl.kernels import numba_cpu as cpu_kernels
from lightning_qmlhfl.rng import row_seeds

TRITON_AVAILABLE = triton_available()
if TRITON_AVAILABLE:
    import lightning_qmlhfl.kernels.triton_cuda as kernels
    from lightning_qmlhfl.kernels.triton_cuda import (
    aggregate_layer_triton_,
    encode_uploads_triton,
    row_norms_triton,
    triton_uniforms,
    )
from lightning_qmlhfl.compressors import QSGD, NoQuantization, row_norms

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton (or its interpreter) is not available")

BLOCK = 1024
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every dtype with a whole-row, a small-bucket and no quantizer; the rest in fp32 only (the interpreter is slow).
CASES = [(dt, q) for q in (QSGD(4), QSGD(3, bucket_size=100), NoQuantization()) for dt in DTYPES] + [
    (torch.float32, QSGD(5, bucket_size=1200)),  # buckets spanning two column blocks
    (torch.float32, QSGD(1)),
]

# An irregular tree, children not grouped by parent: parent 0 has 3 children, 1 has 1, 2 has 3, 3 has none.
PARENT_INDEX = torch.tensor([2, 0, 0, 1, 2, 0, 2])
M, C, P = 4, 7, 1501  # P is not a multiple of the block (1024), of 4, or of the bucket sizes


def make_layer(dtype: torch.dtype, seed: int = 0, P: int = P, scale: float = 0.1):
    """parent [M, P], child [C, P] near its parent, with child 3 equal to its parent (a zero-norm upload)."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(M, P, generator=g)
    child = parent[PARENT_INDEX] + scale * torch.randn(C, P, generator=g)
    child[3] = parent[PARENT_INDEX[3]]
    weights = torch.rand(C, generator=g)
    return parent.to(dtype), child.to(dtype), weights


@functools.lru_cache(maxsize=None)
def _cached_uniforms(seeds: tuple[int, ...], d: int) -> torch.Tensor:
    return triton_uniforms(torch.tensor(seeds, dtype=torch.int64), d)


def uniforms(seeds: torch.Tensor, d: int) -> torch.Tensor:
    """triton_uniforms, cached across tests (the interpreter runs Philox slowly)."""
    return _cached_uniforms(tuple(seeds.tolist()), d).clone()


def reference(parent, child, weights, quantizer, seeds, parent_index=PARENT_INDEX):
    """The torch reference fed with the kernels' draws; returns (new parent, norms)."""
    out = parent.clone()
    u = None if quantizer.is_identity else uniforms(seeds, parent.shape[1])
    norms = aggregate_layer_torch_(out, child, parent_index, weights, quantizer, seeds, uniforms=u)
    return out, norms


# ----------------------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------------------


def test_interpreter_is_active():
    assert kernels.INTERPRET and TRITON_AVAILABLE


def test_uniforms_are_tl_rand_words_and_independent_of_block():
    import triton
    import triton.language as tl

    @triton.jit
    def rand_words(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), offs)
        tl.store(out_ptr + offs * 4 + 0, u0, mask=offs < n)
        tl.store(out_ptr + offs * 4 + 1, u1, mask=offs < n)
        tl.store(out_ptr + offs * 4 + 2, u2, mask=offs < n)
        tl.store(out_ptr + offs * 4 + 3, u3, mask=offs < n)
        tl.store(out_ptr + 4 * n + offs, tl.rand(tl.load(seed_ptr), offs), mask=offs < n)

    seeds = row_seeds(seed=7, round_idx=3, layer=1, event=0, num_rows=2)
    d = 1001
    u = triton_uniforms(seeds, d, block=BLOCK)
    assert u.shape == (2, d) and u.dtype == torch.float32
    assert bool((u >= 0).all()) and bool((u <= 1).all())
    assert torch.equal(u, triton_uniforms(seeds, d, block=256))  # draws do not depend on the launch shape
    n = 256
    words = torch.empty(5 * n)
    rand_words[(1,)](seeds[1:2].clone(), words, n, BLOCK=n)
    assert torch.equal(u[1], words[:d])  # column 4k + j = word j of Philox(counter k), converted like tl.rand
    assert torch.equal(u[1, ::4], words[4 * n :][: (d + 3) // 4])  # word 0 is exactly tl.rand(seed, k)


def test_uniforms_determinism_and_independence():
    d, block = 3000, 4096
    a = triton_uniforms(row_seeds(5, 10, 2, 0, 4), d, block=block)
    assert torch.equal(a, triton_uniforms(row_seeds(5, 10, 2, 0, 4), d, block=block))  # same seed, same draws
    b = triton_uniforms(row_seeds(5, 11, 2, 0, 4), d, block=block)  # next round
    c = triton_uniforms(row_seeds(5, 10, 3, 0, 4), d, block=block)  # another layer
    for other in (b, c, a.roll(1, dims=0)):  # rolled rows: another node, same round
        assert not bool((a == other).any(dim=1).all())
        corr = torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.03
    assert abs(float(a.mean()) - 0.5) < 0.01 and abs(float(a.var()) - 1 / 12) < 0.003


# ----------------------------------------------------------------------------------------------------------------
# Kernel vs torch reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "quantizer"), CASES, ids=[f"{q!r}-{dt}" for dt, q in CASES])
def test_aggregate_matches_reference(dtype, quantizer):
    parent, child, weights = make_layer(dtype)
    seeds = row_seeds(seed=1, round_idx=2, layer=1, event=0, num_rows=C)
    expected, expected_norms = reference(parent, child, weights, quantizer, seeds)
    out = parent.clone()
    norms = aggregate_layer_triton_(out, child, PARENT_INDEX, weights, quantizer, seeds, block=BLOCK)
    assert norms.dtype == torch.float32 and norms.shape == expected_norms.shape
    torch.testing.assert_close(norms, expected_norms, rtol=1e-6, atol=0)
    assert torch.equal(norms, expected_norms)
    assert out.dtype == dtype
    assert torch.equal(out, expected), f"max |diff| {(out.float() - expected.float()).abs().max()}"
    assert torch.equal(out[3], parent[3])  # the childless parent is unchanged
    assert not torch.equal(out, parent)


@pytest.mark.parametrize("quantizer", [QSGD(4), QSGD(3, bucket_size=100), NoQuantization()], ids=repr)
def test_atomic_layout_matches_reference(quantizer):
    parent, child, weights = make_layer(torch.float32, seed=3)
    seeds = row_seeds(2, 0, 1, 0, C)
    expected, _ = reference(parent, child, weights, quantizer, seeds)
    out = parent.clone()
    aggregate_layer_triton_(out, child, PARENT_INDEX, weights, quantizer, seeds, layout="atomic", block=BLOCK)
    # Atomics sum in arbitrary order on a GPU; fp32 rounding of a ~10-term sum bounds the difference.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "quantizer"),
    [(torch.float32, QSGD(4)), (torch.bfloat16, QSGD(7, bucket_size=100)), (torch.float16, NoQuantization())],
    ids=str,
)
def test_encode_matches_reference(dtype, quantizer):
    parent, child, _ = make_layer(dtype, seed=4)
    seeds = row_seeds(3, 1, 2, 1, C)
    enc = encode_uploads_triton(parent, child, PARENT_INDEX, quantizer, seeds, block=BLOCK)
    diff = child.float() - parent.float()[PARENT_INDEX]
    if quantizer.is_identity:
        ref = quantizer.encode(diff)
        assert enc.levels is None and torch.equal(enc.values, ref.values)
    else:
        ref = quantizer.encode(diff, uniforms=uniforms(seeds, P))
        assert enc.levels.dtype == ref.levels.dtype == quantizer.code_dtype
        mismatches = int((enc.levels != ref.levels).sum())
        assert mismatches == 0
        assert int(enc.levels.abs().max()) <= quantizer.levels
        assert not bool(enc.levels[3].any())  # zero-norm row sends zeros
    torch.testing.assert_close(enc.norms, ref.norms, rtol=1e-6, atol=0)


def test_encode_decodes_to_what_the_kernel_adds():
    parent, child, weights = make_layer(torch.float32, seed=5)
    q = QSGD(6)
    seeds = row_seeds(4, 4, 4, 0, C)
    enc = encode_uploads_triton(parent, child, PARENT_INDEX, q, seeds, block=BLOCK)
    expected = torch.zeros_like(parent).index_add_(0, PARENT_INDEX, q.decode(enc, P) * weights[:, None]) + parent
    out = parent.clone()
    aggregate_layer_triton_(out, child, PARENT_INDEX, weights, q, seeds, block=BLOCK)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bucket_size", [None, 100, 1000, 1200, P, 5000])
def test_row_norms_match_reference(bucket_size):
    parent, child, _ = make_layer(torch.float32, seed=6)
    norms = row_norms_triton(parent, child, PARENT_INDEX, bucket_size, block=BLOCK)
    expected = row_norms(child - parent[PARENT_INDEX], bucket_size)
    assert norms.shape == expected.shape
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    assert not bool(norms[3].any())


def test_row_norms_tiny_and_huge_entries():
    parent = torch.zeros(2, 300)
    child = torch.zeros(3, 300)
    child[0] = 1e-30
    child[1] = 1e30
    child[2, ::3] = 3e-38  # near the fp32 normal minimum: squares underflow in fp32
    pidx = torch.tensor([0, 1, 0])
    norms = row_norms_triton(parent, child, pidx)
    expected = row_norms(child - parent[pidx])
    assert bool(torch.isfinite(norms).all()) and bool((norms > 0).all())
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(norms[:, 0], torch.tensor([1e-30 * math.sqrt(300), 1e30 * math.sqrt(300), 3e-38 * 10]))


# ----------------------------------------------------------------------------------------------------------------
# Edge cases and errors
# ----------------------------------------------------------------------------------------------------------------


def test_zero_norm_rows_contribute_exactly_zero():
    parent, child, weights = make_layer(torch.float32, seed=7)
    seeds = row_seeds(0, 0, 0, 0, C)
    q = QSGD(2)
    # Child 3 equals its parent (parent 1, its only child): parent 1 must not move at all.
    out = parent.clone()
    norms = aggregate_layer_triton_(out, child, PARENT_INDEX, weights, q, seeds, block=BLOCK)
    assert float(norms[3, 0]) == 0.0
    assert torch.equal(out[1], parent[1])
    # Making another child equal to its parent is the same as dropping it from the sum.
    child2 = child.clone()
    child2[0] = parent[2]
    out2 = parent.clone()
    aggregate_layer_triton_(out2, child2, PARENT_INDEX, weights, q, seeds, block=BLOCK)
    keep = torch.arange(C) != 0
    out3 = parent.clone()
    u = uniforms(seeds, P)[keep]
    aggregate_layer_torch_(out3, child[keep], PARENT_INDEX[keep], weights[keep], q, seeds[keep], uniforms=u)
    assert torch.equal(out2, out3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_upload_leaves_parent_untouched(bad):
    parent, child, weights = make_layer(torch.float32, seed=8)
    child[5, 17] = bad
    out = parent.clone()
    norms = aggregate_layer_triton_(out, child, PARENT_INDEX, weights, QSGD(4), row_seeds(0, 0, 0, 0, C))
    assert not bool(torch.isfinite(norms[5]).all()) and bool(torch.isfinite(norms[torch.arange(C) != 5]).all())
    assert torch.equal(out, parent)


def test_non_contiguous_inputs():
    parent, child, weights = make_layer(torch.float16, seed=9)
    q = QSGD(4, bucket_size=100)
    seeds = row_seeds(1, 1, 1, 1, C)
    expected = parent.clone()
    aggregate_layer_triton_(expected, child, PARENT_INDEX, weights, q, seeds, block=BLOCK)
    # Rows with a stride larger than P (a view into a wider stack) are used in place, no copy.
    wide = torch.zeros(M, P + 9, dtype=parent.dtype)
    wide[:, 5 : 5 + P] = parent
    child_t = child.t().contiguous().t()  # column-major: copied to contiguous
    assert child_t.stride(1) != 1
    aggregate_layer_triton_(wide[:, 5 : 5 + P], child_t, PARENT_INDEX, weights, q, seeds, block=BLOCK)
    assert torch.equal(wide[:, 5 : 5 + P], expected) and not bool(wide[:, :5].any()) and not bool(wide[:, -4:].any())
    # A strided parent is updated through a contiguous copy and written back.
    big = torch.zeros(M, 2 * P, dtype=parent.dtype)
    big[:, ::2] = parent
    aggregate_layer_triton_(big[:, ::2], child, PARENT_INDEX.int(), weights.double(), q, seeds, block=BLOCK)
    assert torch.equal(big[:, ::2], expected) and not bool(big[:, 1::2].any())


def test_no_children_and_empty_rows():
    parent, child, weights = make_layer(torch.float32)
    out = parent.clone()
    norms = aggregate_layer_triton_(out, child[:0], PARENT_INDEX[:0], weights[:0], QSGD(2), row_seeds(0, 0, 0, 0, 0))
    assert norms.shape == (0, 1) and torch.equal(out, parent)
    norms = aggregate_layer_triton_(
        torch.zeros(M, 0), torch.zeros(C, 0), PARENT_INDEX, weights, QSGD(2), row_seeds(0, 0, 0, 0, C)
    )
    assert norms.shape == (C, 1) and not bool(norms.any())


def test_bad_inputs_get_clear_errors():
    parent, child, weights = make_layer(torch.float32)
    seeds = row_seeds(0, 0, 0, 0, C)
    q = QSGD(2)
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported; allowed"):
        aggregate_layer_triton_(parent.int(), child, PARENT_INDEX, weights, q, seeds)
    with pytest.raises(ValueError, match="share P"):
        aggregate_layer_triton_(parent, child[:, :-1], PARENT_INDEX, weights, q, seeds)
    with pytest.raises(ValueError, match=r"parent_index holds 4, outside the 4 parent rows \[0, 3\]"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX + 2 * (PARENT_INDEX == 2), weights, q, seeds)
    with pytest.raises(ValueError, match="parent_index must be an integer tensor"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX.float(), weights, q, seeds)
    with pytest.raises(ValueError, match="seeds must be an int64 tensor"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX, weights, q, seeds.int())
    with pytest.raises(ValueError, match="weights must be a tensor of shape"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX, weights[:-1], q, seeds)
    with pytest.raises(ValueError, match="block must be a power of two"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX, weights, q, seeds, block=1000)
    with pytest.raises(ValueError, match="layout must be one of"):
        aggregate_layer_triton_(parent, child, PARENT_INDEX, weights, q, seeds, layout="sorted")
    huge = torch.empty(1, 2**31, device="meta")
    with pytest.raises(ValueError, match="P = 2147483648 columns is unsupported"):
        row_norms_triton(huge, huge, torch.zeros(1, dtype=torch.int64))


def test_gpu_compilation_without_a_gpu():
    """The real (non-interpreted) kernels compile for sm_90, with no fp32 FMAs, exact divisions, vector loads."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_qmlhfl.kernels.compile_check", "--quick", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert len(rows) == 6
    for name, r in rows.items():
        assert r["fma_f32"] == 0 and r["div_approx"] == 0, (name, r)
    assert rows["segments fp32 bucket=0 quantize=True"]["div_rn_f32"] > 0
    assert rows["segments fp32 bucket=0 quantize=True"]["ld_v4"] > 0  # 128-bit loads of fp32 rows
    assert rows["segments bf16 bucket=100 quantize=True"]["ld_v2"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Dispatch through the engine's entry point
# ----------------------------------------------------------------------------------------------------------------


def test_dispatch_backend_triton_matches_torch():
    parent, child, weights = make_layer(torch.bfloat16, seed=10)
    seeds = row_seeds(9, 9, 1, 0, C)
    q = QSGD(8, bucket_size=1500)
    expected, expected_norms = reference(parent, child, weights, q, seeds)
    out = parent.clone()
    norms = aggregate_layer_(out, child, PARENT_INDEX, weights, q, seeds, backend="triton")
    assert torch.equal(out, expected) and torch.equal(norms, expected_norms)
    # Without quantization there is no randomness: the two backends agree as called by the engine.
    a, b = parent.clone(), parent.clone()
    aggregate_layer_(a, child, PARENT_INDEX, weights, NoQuantization(), seeds, backend="triton")
    aggregate_layer_(b, child, PARENT_INDEX, weights, NoQuantization(), seeds, backend="torch")
    assert torch.equal(a, b)


def test_dispatch_auto_on_cpu_takes_a_cpu_path(monkeypatch):
    parent, child, weights = make_layer(torch.float32, seed=11)
    seeds = row_seeds(1, 0, 1, 0, C)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(kernels, "aggregate_layer_triton_", boom)
    out = parent.clone()
    aggregate_layer_(out, child, PARENT_INDEX, weights, QSGD(4), seeds, backend="auto")
    expected = parent.clone()
    aggregate_layer_torch_(expected, child, PARENT_INDEX, weights, QSGD(4), seeds)
    assert torch.equal(out, expected)
    with pytest.raises(AssertionError, match="Triton path was taken"):  # the patch is what "triton" would call
        aggregate_layer_(parent.clone(), child, PARENT_INDEX, weights, QSGD(4), seeds, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Statistics over many seeds and determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", [QSGD(2), QSGD(16), QSGD(4, bucket_size=64)], ids=repr)
def test_unbiased_and_variance_bound(quantizer):
    """n independent draws of Q(x) for one fixed x: one upload per seed, all with the same difference x.

    Per entry, the mean of n draws has the exact QSGD variance (norm / s)^2 f (1 - f) / n, f the fractional part
    of s |x_j| / norm; standardised errors z_j must look like N(0, 1) over the d entries (mean ~ 0, mean of
    squares ~ 1), and the mean of ||Q(x) - x||^2 must match its exact expectation and respect q ||x||^2.
    """
    n, d = 32, 8192
    g = torch.Generator().manual_seed(12)
    x = torch.randn(d, generator=g) * torch.rand(d, generator=g) ** 2  # uneven magnitudes, a few large entries
    x[:64] = 0.0
    parent = torch.zeros(1, d)
    child = x.expand(n, d).contiguous()
    seeds = row_seeds(seed=123, round_idx=0, layer=1, event=0, num_rows=n)
    enc = encode_uploads_triton(parent, child, torch.zeros(n, dtype=torch.int64), quantizer, seeds, block=d)
    q = quantizer.decode(enc, d)  # [n, d]: n draws of Q(x)
    norm = row_norms(x[None], quantizer.bucket_size)[0]
    nfull = norm if norm.numel() == 1 else norm.repeat_interleave(quantizer.bucket_size)[:d]
    s = quantizer.levels
    frac = torch.frac(s * x.abs() / nfull.clamp_min(1e-30))  # a zero bucket has zero levels
    var = (nfull / s) ** 2 * frac * (1 - frac)  # per-entry variance of one draw
    err = q.mean(0) - x
    random = var > 0
    z = err[random] / (var[random] / n).sqrt()
    k = int(random.sum())
    assert k > d // 2
    assert abs(float(z.mean())) < 4 / math.sqrt(k)  # unbiased: errors average out across entries
    assert 0.85 < float((z**2).mean()) < 1.15  # and have the exact QSGD variance
    assert bool((err[~random] == 0).all())  # entries on a level (and zeros) are reproduced exactly
    sq = ((q - x) ** 2).sum(1)  # ||Q(x) - x||^2 of each draw
    expected_sq = float(var.sum())
    assert abs(float(sq.mean()) - expected_sq) < 0.05 * expected_sq
    assert float(sq.mean()) <= quantizer.variance_bound(d) * float((x**2).sum())


def test_same_seed_same_output_other_round_or_node_other_draws():
    parent, child, weights = make_layer(torch.float32, seed=13, P=1024)
    q = QSGD(64)

    def seeds_for(round_idx: int) -> torch.Tensor:
        return row_seeds(seed=5, round_idx=round_idx, layer=1, event=0, num_rows=C)

    def aggregate(seeds: torch.Tensor) -> torch.Tensor:
        out = parent.clone()
        aggregate_layer_triton_(out, child, PARENT_INDEX, weights, q, seeds, block=BLOCK)
        return out

    def levels(seeds: torch.Tensor) -> torch.Tensor:
        return encode_uploads_triton(parent, child, PARENT_INDEX, q, seeds, block=BLOCK).levels

    assert torch.equal(aggregate(seeds_for(0)), aggregate(seeds_for(0)))  # same seed, same output
    la, lc = levels(seeds_for(0)), levels(seeds_for(1))
    assert float((la != lc).float().mean()) > 0.2  # next round, other draws
    # Each node draws from its own seed: giving node 1 the seed of node 2 (and vice versa) changes its draws.
    swapped = torch.arange(C)
    swapped[[1, 2]] = swapped[[2, 1]]
    ls = levels(seeds_for(0)[swapped])
    assert torch.equal(ls[0], la[0]) and float((ls[1] != la[1]).float().mean()) > 0.2


# ----------------------------------------------------------------------------------------------------------------
# The numba CPU kernel: the same draws and the same numbers as the Triton kernels and the torch reference
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_draws_are_the_triton_kernels_draws():
    seeds = row_seeds(seed=7, round_idx=3, layer=1, event=0, num_rows=3)
    for d in (1, 5, 1001):
        expected = uniforms(seeds, d)
        assert torch.equal(cpu_kernels.philox_uniforms(seeds, d), expected)
        assert torch.equal(row_uniforms(seeds, d, "cpu"), expected)
    assert cpu_kernels.philox_uniforms(seeds, 0).shape == (3, 0)


FP32_CASES = [QSGD(4), QSGD(3, bucket_size=100), QSGD(5, bucket_size=1200), QSGD(1), QSGD(8, bucket_size=2000),
              NoQuantization()]


@pytest.mark.parametrize("quantizer", FP32_CASES, ids=repr)
def test_numba_kernel_matches_reference(quantizer):
    parent, child, weights = make_layer(torch.float32, seed=12)
    seeds = row_seeds(4, 2, 1, 1, C)
    expected, expected_norms = reference(parent, child, weights, quantizer, seeds)
    out = parent.clone()
    norms = cpu_kernels.aggregate_layer_numba_(out, child, PARENT_INDEX, weights, quantizer, seeds)
    assert torch.equal(out, expected)
    assert torch.equal(norms, expected_norms)
    # and the same as the Triton kernel, number for number
    tri = parent.clone()
    aggregate_layer_triton_(tri, child, PARENT_INDEX, weights, quantizer, seeds, block=BLOCK)
    assert torch.equal(out, tri)


def test_numba_kernel_edge_cases():
    parent, child, weights = make_layer(torch.float32, seed=13)
    seeds = row_seeds(5, 0, 1, 0, C)
    q = QSGD(4, bucket_size=100)
    expected, _ = reference(parent, child, weights, q, seeds)
    # a parent that is a strided view of a wider stack is written back in place
    wide = torch.zeros(M, P + 9)
    wide[:, 5 : 5 + P] = parent
    cpu_kernels.aggregate_layer_numba_(wide[:, 5 : 5 + P], child, PARENT_INDEX, weights, q, seeds)
    assert torch.equal(wide[:, 5 : 5 + P], expected) and not bool(wide[:, :5].any())
    # a NaN/Inf upload: non-finite norm for that row, parents untouched
    bad = child.clone()
    bad[2, 40] = float("inf")
    out = parent.clone()
    norms = cpu_kernels.aggregate_layer_numba_(out, bad, PARENT_INDEX, weights, QSGD(4), seeds)
    assert not bool(torch.isfinite(norms[2]).all()) and torch.equal(out, parent)
    # no children, no columns
    norms = cpu_kernels.aggregate_layer_numba_(out, child[:0], PARENT_INDEX[:0], weights[:0], q, seeds[:0])
    assert norms.shape[0] == 0 and torch.equal(out, parent)
    norms = cpu_kernels.aggregate_layer_numba_(torch.zeros(M, 0), torch.zeros(C, 0), PARENT_INDEX, weights, q, seeds)
    assert norms.shape == (C, 1) and not bool(norms.any())
    # the kernel indexes without bounds checks, so bad indices and shapes are refused before it runs
    with pytest.raises(ValueError, match="parent_index holds 4, outside the 4 parent rows"):
        cpu_kernels.aggregate_layer_numba_(parent.clone(), child, PARENT_INDEX.clamp(max=2) + 2, weights, q, seeds)
    with pytest.raises(ValueError, match=r"seeds must have shape \(7,\)"):
        cpu_kernels.aggregate_layer_numba_(parent.clone(), child, PARENT_INDEX, weights, q, seeds[:3])
    with pytest.raises(ValueError, match="float32 CPU tensors and Identity, QSGD, ScaledSign or NaturalCompression"):
        cpu_kernels.aggregate_layer_numba_(parent.half(), child.half(), PARENT_INDEX, weights, q, seeds)


def test_dispatch_auto_on_cpu_uses_numba_for_float32_only(monkeypatch):
    parent, child, weights = make_layer(torch.float32, seed=14)
    seeds = row_seeds(2, 0, 1, 0, C)
    calls = []
    real = cpu_kernels.aggregate_layer_numba_
    monkeypatch.setattr(cpu_kernels, "aggregate_layer_numba_", lambda *a, **k: calls.append(1) or real(*a, **k))
    aggregate_layer_(parent.clone(), child, PARENT_INDEX, weights, QSGD(4), seeds)
    assert calls == [1]
    aggregate_layer_(parent.half(), child.half(), PARENT_INDEX, weights, QSGD(4), seeds)  # torch path
    assert calls == [1]
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch', 'numba' or 'triton'"):
        aggregate_layer_(parent, child, PARENT_INDEX, weights, QSGD(4), seeds, backend="cuda")
