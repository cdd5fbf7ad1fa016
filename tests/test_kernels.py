"""The Triton compress-and-aggregate kernels against the torch reference (run in Triton's interpreter on CPU).

conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels. Sizes are small because the interpreter
runs every program in Python. With the same uniforms the kernel and the reference agree bit for bit on CPU
(no FMA contraction, correctly rounded divisions, children summed in the same order), so most comparisons
here are exact; the statistical tests use many seeds with fixed values, so they are deterministic too.

On a GPU machine the same tests run the compiled kernels on CUDA tensors::

    TRITON_INTERPRET=0 QMLHFL_TEST_DEVICE=cuda pytest tests/test_kernels.py

``DEVICE`` (from QMLHFL_TEST_DEVICE, default "cpu") is where the Triton tests create their tensors; the torch
reference always runs on the CPU (the definition), and on a GPU results are compared with the tolerance of
``aggregate_layer_triton_``'s docstring (see :func:`assert_matches`). The numba tests are CPU tests.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re

import pytest
import torch

from lightning_qmlhfl.compressors import (QSGD, Identity, NaturalCompression, NoQuantization, RandomK, ScaledSign,
                                          TopK, row_norms)
from lightning_qmlhfl.kernels import (aggregate_layer_, aggregate_layer_torch_, backend_supports, row_uniforms,
                                      triton_available)
from lightning_qmlhfl.kernels import numba_cpu as cpu_kernels
from lightning_qmlhfl.rng import row_seeds

_DEVICE_NAME = os.environ.get("QMLHFL_TEST_DEVICE", "cpu")
if not re.fullmatch(r"cpu|cuda(:\d+)?", _DEVICE_NAME):
    raise ValueError(f"QMLHFL_TEST_DEVICE must be 'cpu' or 'cuda[:i]', got {_DEVICE_NAME!r}")
DEVICE = torch.device(_DEVICE_NAME)
"""Where the Triton tests put their tensors: "cpu" (Triton's interpreter) or "cuda" (compiled kernels)."""
ON_GPU = DEVICE.type == "cuda"
if ON_GPU and (os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()):
    raise RuntimeError("QMLHFL_TEST_DEVICE=cuda runs the compiled kernels: it needs a CUDA device and "
                       "TRITON_INTERPRET=0 (conftest.py sets 1 only when it is unset)")

TRITON_AVAILABLE = triton_available()
if TRITON_AVAILABLE:
    import lightning_qmlhfl.kernels.triton_cuda as kernels
    from lightning_qmlhfl.kernels.triton_cuda import (
        aggregate_layer_triton_,
        encode_uploads_triton,
        row_norms_triton,
        supports,
        triton_uniforms,
    )

if not TRITON_AVAILABLE:
    pytestmark = pytest.mark.skip(reason="Triton (or its interpreter) is not available")
elif not ON_GPU and not kernels.INTERPRET:
    pytestmark = pytest.mark.skip(reason="compiled Triton kernels (TRITON_INTERPRET=0) run on CUDA tensors: set "
                                         "QMLHFL_TEST_DEVICE=cuda")

BLOCK = 1024
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every dtype with a whole-row, a small-bucket and no quantizer; the rest in fp32 only (the interpreter is slow).
CASES = [(dt, q) for q in (QSGD(4, bucket_size=None), QSGD(3, bucket_size=100), NoQuantization()) for dt in DTYPES] + [
    (torch.float32, QSGD(5, bucket_size=1200)),  # buckets spanning two column blocks
    (torch.float32, QSGD(1, bucket_size=None)),
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


def on_device(*tensors):
    """The tensors on DEVICE (None stays None)."""
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor | None = None) -> None:
    """A Triton result against the CPU reference. In the interpreter: the same bits (signed zeros included).
    On a GPU: within 1e-6 of the update (``expected - before``, or ``expected``), the tolerance documented by
    ``aggregate_layer_triton_``, widened to one storage ulp for fp16/bf16."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if not ON_GPU:
        ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}[expected.element_size()]
        same = torch.equal(actual.view(ints), expected.view(ints)) if expected.is_floating_point() else \
            torch.equal(actual, expected)
        assert same, f"max |diff| {(actual.double() - expected.double()).abs().max()}"
        return
    update = expected.double() - (0 if before is None else before.double())
    finite = update[torch.isfinite(update)]  # NaN/Inf entries (a non-finite upload left untouched) compare as equal
    atol = 1e-6 * float(finite.abs().max()) if finite.numel() else 0.0
    rtol = 1e-6 if expected.dtype in (torch.float32, torch.float64) else float(torch.finfo(expected.dtype).eps)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


@functools.lru_cache(maxsize=None)
def _cached_uniforms(seeds: tuple[int, ...], d: int) -> torch.Tensor:
    return triton_uniforms(torch.tensor(seeds, dtype=torch.int64), d, DEVICE).cpu()


def uniforms(seeds: torch.Tensor, d: int) -> torch.Tensor:
    """triton_uniforms on DEVICE, as a CPU tensor, cached across tests (the interpreter runs Philox slowly)."""
    return _cached_uniforms(tuple(seeds.tolist()), d).clone()


def reference(parent, child, weights, quantizer, seeds, parent_index=PARENT_INDEX):
    """The torch reference on CPU fed with the kernels' draws; returns (new parent, norms)."""
    out = parent.clone()
    u = uniforms(seeds, parent.shape[1]) if quantizer.uses_uniforms else None
    norms = aggregate_layer_torch_(out, child, parent_index, weights, quantizer, seeds, uniforms=u)
    return out, norms


def triton(parent, child, weights, quantizer, seeds, parent_index=PARENT_INDEX, **kw):
    """aggregate_layer_triton_ on DEVICE copies of CPU inputs; returns (new parent, norms) on the CPU."""
    out, child, parent_index, weights, seeds = on_device(parent.clone(), child, parent_index, weights, seeds)
    norms = aggregate_layer_triton_(out, child, parent_index, weights, quantizer, seeds, **kw)
    return out.cpu(), norms.cpu()


# ----------------------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------------------


def test_interpreter_is_active():
    assert TRITON_AVAILABLE and kernels.INTERPRET == (not ON_GPU)


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

    seeds = row_seeds(seed=7, round_idx=3, layer=1, event=0, num_rows=2).to(DEVICE)
    d = 1001
    u = triton_uniforms(seeds, d, block=BLOCK)
    assert u.shape == (2, d) and u.dtype == torch.float32 and u.device == seeds.device
    assert bool((u >= 0).all()) and bool((u <= 1).all())
    assert torch.equal(u, triton_uniforms(seeds, d, block=256))  # draws do not depend on the launch shape
    n = 256
    words = torch.empty(5 * n, device=DEVICE)
    rand_words[(1,)](seeds[1:2].clone(), words, n, BLOCK=n)
    assert torch.equal(u[1], words[:d])  # column 4k + j = word j of Philox(counter k), converted like tl.rand
    assert torch.equal(u[1, ::4], words[4 * n :][: (d + 3) // 4])  # word 0 is exactly tl.rand(seed, k)


def test_uniforms_determinism_and_independence():
    d, block = 3000, 4096

    def draws(*key):
        return triton_uniforms(row_seeds(*key, 4), d, DEVICE, block=block).cpu()

    a = draws(5, 10, 2, 0)
    assert torch.equal(a, draws(5, 10, 2, 0))  # same seed, same draws
    b = draws(5, 11, 2, 0)  # next round
    c = draws(5, 10, 3, 0)  # another layer
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
    out, norms = triton(parent, child, weights, quantizer, seeds, block=BLOCK)
    assert norms.dtype == torch.float32 and norms.shape == expected_norms.shape
    torch.testing.assert_close(norms, expected_norms, rtol=1e-6, atol=0)
    assert_matches(norms, expected_norms)
    assert out.dtype == dtype
    assert_matches(out, expected, parent)
    assert torch.equal(out[3], parent[3])  # the childless parent is unchanged
    assert not torch.equal(out, parent)


@pytest.mark.parametrize("quantizer", [QSGD(4, bucket_size=None), QSGD(3, bucket_size=100), NoQuantization()], ids=repr)
def test_atomic_layout_matches_reference(quantizer):
    parent, child, weights = make_layer(torch.float32, seed=3)
    seeds = row_seeds(2, 0, 1, 0, C)
    expected, _ = reference(parent, child, weights, quantizer, seeds)
    out, _ = triton(parent, child, weights, quantizer, seeds, layout="atomic", block=BLOCK)
    # Atomics sum in arbitrary order on a GPU; fp32 rounding of a ~10-term sum bounds the difference.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "quantizer"),
    [(torch.float32, QSGD(4, bucket_size=None)), (torch.bfloat16, QSGD(7, bucket_size=100)), (torch.float16, NoQuantization())],
    ids=str,
)
def test_encode_matches_reference(dtype, quantizer):
    parent, child, _ = make_layer(dtype, seed=4)
    seeds = row_seeds(3, 1, 2, 1, C)
    enc = encode_uploads_triton(*on_device(parent, child, PARENT_INDEX), quantizer, seeds.to(DEVICE), block=BLOCK)
    diff = child.float() - parent.float()[PARENT_INDEX]
    if quantizer.is_identity:
        ref = quantizer.encode(diff)
        assert enc.levels is None
        assert_matches(enc.values, ref.values)
    else:
        ref = quantizer.encode(diff, uniforms=uniforms(seeds, P))
        levels = enc.levels.cpu()
        assert levels.dtype == ref.levels.dtype == quantizer.code_dtype
        mismatches = int((levels != ref.levels).sum())
        assert mismatches == 0
        assert int(levels.abs().max()) <= quantizer.levels
        assert not bool(levels[3].any())  # zero-norm row sends zeros
    torch.testing.assert_close(enc.norms.cpu(), ref.norms, rtol=1e-6, atol=0)


def test_encode_decodes_to_what_the_kernel_adds():
    parent, child, weights = make_layer(torch.float32, seed=5)
    q = QSGD(6, bucket_size=None)
    seeds = row_seeds(4, 4, 4, 0, C)
    enc = encode_uploads_triton(*on_device(parent, child, PARENT_INDEX), q, seeds.to(DEVICE), block=BLOCK)
    enc.norms, enc.levels = enc.norms.cpu(), enc.levels.cpu()
    expected = torch.zeros_like(parent).index_add_(0, PARENT_INDEX, q.decode(enc, P) * weights[:, None]) + parent
    out, _ = triton(parent, child, weights, q, seeds, block=BLOCK)
    assert_matches(out, expected, parent)


@pytest.mark.parametrize("bucket_size", [None, 100, 1000, 1200, P, 5000])
def test_row_norms_match_reference(bucket_size):
    parent, child, _ = make_layer(torch.float32, seed=6)
    norms = row_norms_triton(*on_device(parent, child, PARENT_INDEX), bucket_size, block=BLOCK).cpu()
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
    norms = row_norms_triton(*on_device(parent, child, pidx)).cpu()
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
    q = QSGD(2, bucket_size=None)
    # Child 3 equals its parent (parent 1, its only child): parent 1 must not move at all.
    out, norms = triton(parent, child, weights, q, seeds, block=BLOCK)
    assert float(norms[3, 0]) == 0.0
    assert torch.equal(out[1], parent[1])
    # Making another child equal to its parent is the same as dropping it from the sum.
    child2 = child.clone()
    child2[0] = parent[2]
    out2, _ = triton(parent, child2, weights, q, seeds, block=BLOCK)
    keep = torch.arange(C) != 0
    out3 = parent.clone()
    u = uniforms(seeds, P)[keep]
    aggregate_layer_torch_(out3, child[keep], PARENT_INDEX[keep], weights[keep], q, seeds[keep], uniforms=u)
    assert_matches(out2, out3, parent)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_upload_leaves_parent_untouched(bad):
    parent, child, weights = make_layer(torch.float32, seed=8)
    child[5, 17] = bad
    out, norms = triton(parent, child, weights, QSGD(4, bucket_size=None), row_seeds(0, 0, 0, 0, C))
    assert not bool(torch.isfinite(norms[5]).all()) and bool(torch.isfinite(norms[torch.arange(C) != 5]).all())
    assert torch.equal(out, parent)


def test_non_contiguous_inputs():
    parent, child, weights = make_layer(torch.float16, seed=9)
    parent, child, weights = on_device(parent, child, weights)
    pidx = PARENT_INDEX.to(DEVICE)
    q = QSGD(4, bucket_size=100)
    seeds = row_seeds(1, 1, 1, 1, C).to(DEVICE)
    expected = parent.clone()
    aggregate_layer_triton_(expected, child, pidx, weights, q, seeds, block=BLOCK)
    # Rows with a stride larger than P (a view into a wider stack) are used in place, no copy.
    wide = torch.zeros(M, P + 9, dtype=parent.dtype, device=DEVICE)
    wide[:, 5 : 5 + P] = parent
    child_t = child.t().contiguous().t()  # column-major: copied to contiguous
    assert child_t.stride(1) != 1
    aggregate_layer_triton_(wide[:, 5 : 5 + P], child_t, pidx, weights, q, seeds, block=BLOCK)
    assert torch.equal(wide[:, 5 : 5 + P], expected) and not bool(wide[:, :5].any()) and not bool(wide[:, -4:].any())
    # A strided parent is updated through a contiguous copy and written back.
    big = torch.zeros(M, 2 * P, dtype=parent.dtype, device=DEVICE)
    big[:, ::2] = parent
    aggregate_layer_triton_(big[:, ::2], child, pidx.int(), weights.double(), q, seeds, block=BLOCK)
    assert torch.equal(big[:, ::2], expected) and not bool(big[:, 1::2].any())


def test_no_children_and_empty_rows():
    parent, child, weights = on_device(*make_layer(torch.float32))
    pidx = PARENT_INDEX.to(DEVICE)
    out = parent.clone()
    norms = aggregate_layer_triton_(out, child[:0], pidx[:0], weights[:0], QSGD(2, bucket_size=None), row_seeds(0, 0, 0, 0, 0).to(DEVICE))
    assert norms.shape == (0, 1) and torch.equal(out, parent)
    norms = aggregate_layer_triton_(torch.zeros(M, 0, device=DEVICE), torch.zeros(C, 0, device=DEVICE), pidx, weights,
                                    QSGD(2, bucket_size=None), row_seeds(0, 0, 0, 0, C).to(DEVICE))
    assert norms.shape == (C, 1) and not bool(norms.any())


def test_bad_inputs_get_clear_errors():
    parent, child, weights = on_device(*make_layer(torch.float32))
    pidx = PARENT_INDEX.to(DEVICE)
    seeds = row_seeds(0, 0, 0, 0, C).to(DEVICE)
    q = QSGD(2, bucket_size=None)
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported; allowed"):
        aggregate_layer_triton_(parent.int(), child, pidx, weights, q, seeds)
    with pytest.raises(ValueError, match="share P"):
        aggregate_layer_triton_(parent, child[:, :-1], pidx, weights, q, seeds)
    with pytest.raises(ValueError, match=r"parent_index holds 4, outside the 4 parent rows \[0, 3\]"):
        aggregate_layer_triton_(parent, child, pidx + 2 * (pidx == 2), weights, q, seeds)
    with pytest.raises(ValueError, match="parent_index must be an integer tensor"):
        aggregate_layer_triton_(parent, child, pidx.float(), weights, q, seeds)
    with pytest.raises(ValueError, match="seeds must be an int64 tensor"):
        aggregate_layer_triton_(parent, child, pidx, weights, q, seeds.int())
    with pytest.raises(ValueError, match="weights must be a tensor of shape"):
        aggregate_layer_triton_(parent, child, pidx, weights[:-1], q, seeds)
    with pytest.raises(ValueError, match="block must be a power of two"):
        aggregate_layer_triton_(parent, child, pidx, weights, q, seeds, block=1000)
    with pytest.raises(ValueError, match="layout must be one of"):
        aggregate_layer_triton_(parent, child, pidx, weights, q, seeds, layout="sorted")
    huge = torch.empty(1, 2**31, device="meta")
    with pytest.raises(ValueError, match="P = 2147483648 columns is unsupported"):
        row_norms_triton(huge, huge, torch.zeros(1, dtype=torch.int64))


def test_gpu_compilation_without_a_gpu():
    """The real (non-interpreted) kernels compile for sm_90, with no fp32 FMAs, exact divisions, no flush-to-zero,
    vector loads; every compressor, error feedback, a rows subset and out= among the variants."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    from lightning_qmlhfl.kernels.compile_check import QUICK

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
    assert set(rows) == set(QUICK) and len(rows) == 12
    for name, r in rows.items():
        assert r["fma_f32"] == 0 and r["div_approx"] == 0 and r["ftz_f32"] == 0, (name, r)
    for name in ("segments fp32 qsgd bucket=0", "segments fp32 sign bucket=64", "segments fp32 qsgd bucket=0 ef",
                 "segments fp32 qsgd bucket=100 ef21 rows"):
        assert rows[name]["div_rn_f32"] > 0, name  # QSGD's |x| / norm and norm / s, ScaledSign's norm / length
    assert rows["segments fp32 qsgd bucket=0"]["ld_v4"] > 0  # 128-bit loads of fp32 rows
    assert rows["segments bf16 qsgd bucket=100"]["ld_v2"] > 0
    # with error feedback the memory rows are read with 128-bit loads too (child, parent, memory)
    assert rows["segments fp32 qsgd bucket=0 ef"]["ld_v4"] > rows["segments fp32 qsgd bucket=0"]["ld_v4"]
    assert rows["segments fp32 identity ef21 out"]["ld_v4"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Dispatch through the engine's entry point
# ----------------------------------------------------------------------------------------------------------------


def test_dispatch_backend_triton_matches_torch():
    parent, child, weights = make_layer(torch.bfloat16, seed=10)
    seeds = row_seeds(9, 9, 1, 0, C)
    q = QSGD(8, bucket_size=1500)
    expected, expected_norms = reference(parent, child, weights, q, seeds)
    out, dchild, dpidx, dweights, dseeds = on_device(parent.clone(), child, PARENT_INDEX, weights, seeds)
    norms = aggregate_layer_(out, dchild, dpidx, dweights, q, dseeds, backend="triton")
    assert_matches(out, expected, parent)
    assert_matches(norms, expected_norms)
    # Without quantization there is no randomness: the two backends agree as called by the engine.
    a, b = on_device(parent.clone())[0], parent.clone()
    aggregate_layer_(a, dchild, dpidx, dweights, NoQuantization(), dseeds, backend="triton")
    aggregate_layer_(b, child, PARENT_INDEX, weights, NoQuantization(), seeds, backend="torch")
    assert_matches(a, b, parent)


def test_dispatch_auto_on_cpu_takes_a_cpu_path(monkeypatch):
    parent, child, weights = make_layer(torch.float32, seed=11)
    seeds = row_seeds(1, 0, 1, 0, C)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(kernels, "aggregate_layer_triton_", boom)
    out = parent.clone()
    aggregate_layer_(out, child, PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds, backend="auto")
    expected = parent.clone()
    aggregate_layer_torch_(expected, child, PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds)
    assert torch.equal(out, expected)
    with pytest.raises(AssertionError, match="Triton path was taken"):  # the patch is what "triton" would call
        aggregate_layer_(*on_device(parent.clone(), child, PARENT_INDEX, weights), QSGD(4, bucket_size=None), seeds.to(DEVICE),
                         backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Statistics over many seeds and determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", [QSGD(2, bucket_size=None), QSGD(16, bucket_size=None), QSGD(4, bucket_size=64)], ids=repr)
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
    enc = encode_uploads_triton(*on_device(parent, child, torch.zeros(n, dtype=torch.int64)), quantizer,
                                seeds.to(DEVICE), block=d)
    enc.norms, enc.levels = enc.norms.cpu(), enc.levels.cpu()
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
    q = QSGD(64, bucket_size=None)

    def seeds_for(round_idx: int) -> torch.Tensor:
        return row_seeds(seed=5, round_idx=round_idx, layer=1, event=0, num_rows=C)

    def aggregate(seeds: torch.Tensor) -> torch.Tensor:
        return triton(parent, child, weights, q, seeds, block=BLOCK)[0]

    def levels(seeds: torch.Tensor) -> torch.Tensor:
        return encode_uploads_triton(*on_device(parent, child, PARENT_INDEX), q, seeds.to(DEVICE),
                                     block=BLOCK).levels.cpu()

    assert torch.equal(aggregate(seeds_for(0)), aggregate(seeds_for(0)))  # same seed, same output
    la, lc = levels(seeds_for(0)), levels(seeds_for(1))
    assert float((la != lc).float().mean()) > 0.2  # next round, other draws
    # Each node draws from its own seed: giving node 1 the seed of node 2 (and vice versa) changes its draws.
    swapped = torch.arange(C)
    swapped[[1, 2]] = swapped[[2, 1]]
    ls = levels(seeds_for(0)[swapped])
    assert torch.equal(ls[0], la[0]) and float((ls[1] != la[1]).float().mean()) > 0.2


# ----------------------------------------------------------------------------------------------------------------
# Every compressor of the Triton kernels, with error feedback, row subsets and out=, against the reference
# ----------------------------------------------------------------------------------------------------------------

TRITON_FUSED = [Identity(), QSGD(4, bucket_size=None), QSGD(3, bucket_size=24), ScaledSign(), ScaledSign(bucket_size=16),
                NaturalCompression()]
EF_MODES = [None, "ef", "ef21"]
SUBSET = torch.tensor([6, 1, 4, 5])  # unsorted; parent 1 (its only child is 3) and parent 3 get no upload
P_SMALL = 70  # not a multiple of 4, nor of the buckets: the last bucket is shorter (22 and 6 entries)


def with_ef(compressor, ef):
    """The same compressor with error feedback ``ef``."""
    if isinstance(compressor, QSGD):
        return QSGD(compressor.levels, compressor.bucket_size, ef)
    if isinstance(compressor, ScaledSign):
        return ScaledSign(compressor.bucket_size, ef)
    return type(compressor)(ef)


def make_ef_layer(seed: int = 0, P: int = P_SMALL):
    """make_layer's tree with P_SMALL columns, EF memory [C, P] and NaturalCompression's special entries: child 5
    differs from its parent by exact subnormals, a zero and a negative zero in its first 6 columns (memory 0
    there)."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(M, P, generator=g)
    child = parent[PARENT_INDEX] + 0.1 * torch.randn(C, P, generator=g)
    child[3] = parent[PARENT_INDEX[3]]  # a zero difference (its EF input is its memory)
    parent[PARENT_INDEX[5], :6] = 0.0
    child[5, :6] = torch.tensor([1e-40, -3e-39, 0.0, -0.0, 1e-45, -2.5e-42])
    weights = torch.rand(C, generator=g) + 0.1
    memory = 0.05 * torch.randn(C, P, generator=g)
    memory[5, :6] = 0.0
    return parent, child, weights, memory


def run_both(compressor, parent, child, weights, memory, seeds, rows=None, write_out=False, block=128):
    """The torch reference (CPU, fed the kernels' draws) and the Triton kernel (DEVICE) on the same inputs; each
    returns (parent, memory, out, norms) on the CPU. ``out`` starts as NaN so unwritten entries show."""
    ef = compressor.error_feedback is not None
    u = uniforms(seeds, parent.shape[1]) if compressor.uses_uniforms else None
    results = []
    for backend in ("torch", "triton"):
        p, m = parent.clone(), memory.clone() if ef else None
        o = torch.full(parent.shape, float("nan")) if write_out else None
        if backend == "torch":
            n = aggregate_layer_torch_(p, child, PARENT_INDEX, weights, compressor, seeds, uniforms=u, memory=m,
                                       rows=rows, out=o)
        else:
            p, m, o, c, pidx, w, s, r = on_device(p, m, o, child, PARENT_INDEX, weights, seeds, rows)
            n = aggregate_layer_triton_(p, c, pidx, w, compressor, s, memory=m, rows=r, out=o, block=block)
        results.append(tuple(None if t is None else t.cpu() for t in (p, m, o, n)))
    return results


def check_same(results, parent, memory, rows=None):
    """Triton equals the reference in every output; the parent is untouched with out=, the memory of rows that
    did not upload is untouched."""
    (p0, m0, o0, n0), (p1, m1, o1, n1) = results
    assert n1.shape == n0.shape
    assert_matches(n1, n0)
    assert_matches(p1, p0, parent)
    if o0 is not None:
        assert_matches(o1, o0)
        assert torch.equal(p1, parent)
    if m0 is not None:
        assert_matches(m1, m0, memory)
        if rows is not None:
            others = torch.tensor([r for r in range(C) if r not in rows.tolist()])
            assert torch.equal(m1[others], memory[others])


@pytest.mark.parametrize("write_out", [False, True], ids=["add", "out"])
@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
@pytest.mark.parametrize("ef", EF_MODES, ids=str)
@pytest.mark.parametrize("compressor", TRITON_FUSED, ids=repr)
def test_triton_equals_the_reference(compressor, ef, subset, write_out):
    c = with_ef(compressor, ef)
    parent, child, weights, memory = make_ef_layer()
    seeds = row_seeds(5, 2, 1, 0, C)
    rows = SUBSET if subset else None
    results = run_both(c, parent, child, weights, memory, seeds, rows, write_out)
    check_same(results, parent, memory, rows)
    p, m, o, norms = results[1]
    assert norms.shape == ((len(SUBSET) if subset else C), 1 if c.bucket_size is None else -(-P_SMALL // c.bucket_size))
    if write_out:
        assert not bool(o.isnan().any()) and not bool(o[3].any())  # every parent written, 0 without uploads
    else:
        assert torch.equal(p[3], parent[3]) and (not subset or torch.equal(p[1], parent[1]))


@pytest.mark.parametrize(("dtype", "compressor", "subset", "write_out"), [
    (torch.bfloat16, QSGD(4, bucket_size=24, error_feedback="ef"), True, True),
    (torch.float16, ScaledSign(error_feedback="ef21"), False, False),
    (torch.bfloat16, NaturalCompression(), True, False),
], ids=str)
def test_triton_half_precision_storage(dtype, compressor, subset, write_out):
    """fp16/bf16 parent and child rows (fp32 memory and out), several column blocks of 32."""
    parent, child, weights, memory = make_ef_layer(seed=1)
    parent, child = parent.to(dtype), child.to(dtype)
    rows = SUBSET if subset else None
    results = run_both(compressor, parent, child, weights, memory, row_seeds(3, 1, 2, 0, C), rows, write_out,
                       block=32)
    check_same(results, parent, memory, rows)
    assert results[1][0].dtype == dtype


def test_triton_non_finite_upload_with_error_feedback_writes_nothing():
    parent, child, weights, memory = make_ef_layer(seed=2)
    seeds = row_seeds(0, 0, 1, 0, C)
    bad_child = child.clone()
    bad_child[4, 3] = float("nan")
    bad_memory = memory.clone()
    bad_memory[1, 60] = float("inf")
    for c, ch, mem, rows, write_out in [
        (ScaledSign(bucket_size=16, error_feedback="ef"), bad_child, memory, None, True),  # NaN in a child row
        (QSGD(4, bucket_size=None, error_feedback="ef21"), child, bad_memory, SUBSET, False),  # Inf in the memory of an upload
        (NaturalCompression("ef"), bad_child, bad_memory, torch.tensor([1, 4]), True),
    ]:
        p, m, o, chd, pidx, w, s, r = on_device(parent.clone(), mem.clone(), torch.full(parent.shape, 7.0), ch,
                                                PARENT_INDEX, weights, seeds, rows)
        norms = aggregate_layer_triton_(p, chd, pidx, w, c, s, memory=m, rows=r, out=o if write_out else None,
                                        block=128).cpu()
        uploaded = list(range(C)) if rows is None else rows.tolist()
        assert norms.shape[0] == len(uploaded) and not bool(torch.isfinite(norms).all())
        assert torch.equal(p.cpu(), parent) and torch.equal(m.cpu(), mem) and bool((o.cpu() == 7.0).all())
    # the same bad rows outside the uploading subset are not read: all finite, the aggregation happens
    rows = torch.tensor([0, 2, 6])
    results = run_both(QSGD(4, bucket_size=None, error_feedback="ef21"), parent, bad_child, weights, bad_memory, seeds, rows)
    assert bool(torch.isfinite(results[1][3]).all())
    check_same(results, parent, bad_memory, rows)


def test_triton_strided_memory_and_out():
    """Memory rows that are views of a wider stack are updated in place; a column-strided memory or out goes
    through a contiguous copy that is written back."""
    parent, child, weights, memory = make_ef_layer(seed=3)
    c = QSGD(3, bucket_size=24, error_feedback="ef")
    seeds = row_seeds(1, 1, 1, 0, C)
    (p0, m0, o0, _), _ = run_both(c, parent, child, weights, memory, seeds, SUBSET, write_out=True, block=32)
    wide = torch.zeros(C, P_SMALL + 5, device=DEVICE)
    wide[:, 2 : 2 + P_SMALL] = memory.to(DEVICE)
    mem_view = wide[:, 2 : 2 + P_SMALL]
    out_t = torch.zeros(P_SMALL, M, device=DEVICE).t()  # column-major
    args = on_device(parent.clone(), child, PARENT_INDEX, weights, seeds, SUBSET)
    aggregate_layer_triton_(args[0], args[1], args[2], args[3], c, args[4], memory=mem_view, rows=args[5], out=out_t,
                            block=32)
    assert_matches(mem_view, m0, memory)
    assert not bool(wide[:, :2].any()) and not bool(wide[:, -3:].any())
    assert_matches(out_t, o0)
    mem_t = memory.t().contiguous().t().to(DEVICE)
    aggregate_layer_triton_(args[0], args[1], args[2], args[3], c, args[4], memory=mem_t, rows=args[5],
                            out=torch.zeros(M, P_SMALL, device=DEVICE), block=32)
    assert_matches(mem_t, m0, memory)


def test_triton_declares_what_it_implements():
    parent, child, weights, memory = on_device(*make_ef_layer())
    pidx, rows = on_device(PARENT_INDEX, SUBSET)
    seeds = row_seeds(0, 0, 1, 0, C).to(DEVICE)
    out = torch.zeros_like(parent)
    for comp, ef in itertools.product(TRITON_FUSED, EF_MODES):
        c = with_ef(comp, ef)
        assert backend_supports("triton", parent, child, c, memory if ef else None, rows, out)
        assert backend_supports("triton", parent.bfloat16(), child.bfloat16(), c, memory if ef else None)
        assert supports(parent, child, c, layout="atomic") == (type(c) in (QSGD, Identity) and ef is None)
    assert not supports(parent, child, QSGD(4, bucket_size=None), rows=rows, layout="atomic")
    assert not supports(parent, child, Identity(), out=out, layout="atomic")
    assert not supports(parent, child, QSGD(4, bucket_size=None, error_feedback="ef"), memory.double())  # fp32 memory only
    assert not supports(parent, child, QSGD(4, bucket_size=None), out=out.half())  # fp32 out only
    for c in (TopK(k=3), RandomK(ratio=0.1), TopK(k=3, error_feedback="ef")):
        assert not backend_supports("triton", parent, child, c, memory)
        with pytest.raises(ValueError, match=f"backend 'triton' does not implement {type(c).__name__}"):
            aggregate_layer_(parent.clone(), child, pidx, weights, c, seeds, "triton", memory=memory)
        with pytest.raises(ValueError, match="implements Identity, QSGD, ScaledSign, NaturalCompression; got"):
            aggregate_layer_triton_(parent.clone(), child, pidx, weights, c, seeds)
    with pytest.raises(ValueError, match="layout='atomic' implements QSGD and Identity without error feedback"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, QSGD(4, bucket_size=None, error_feedback="ef"), seeds,
                                memory=memory.clone(), layout="atomic")
    with pytest.raises(ValueError, match=r"layout='atomic' .* with rows"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, QSGD(4, bucket_size=None), seeds, rows=rows, layout="atomic")
    with pytest.raises(ValueError, match=r"QSGD\(4, bucket_size=None, error_feedback='ef'\) needs its memory \[7, 70\], got None"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, QSGD(4, bucket_size=None, error_feedback="ef"), seeds)
    with pytest.raises(ValueError, match=r"memory must be a float32 tensor of shape \[7, 70\]"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, ScaledSign(error_feedback="ef21"), seeds,
                                memory=memory[:3].clone())
    with pytest.raises(ValueError, match=r"out must be a float32 tensor of shape \[4, 70\]"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, Identity(), seeds, out=out[:, :5])
    with pytest.raises(ValueError, match=r"rows must index the 7 child rows \[0, 6\], got values in \[2, 7\]"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, Identity(), seeds, rows=rows + 1)
    with pytest.raises(ValueError, match="rows must be a 1-D integer tensor"):
        aggregate_layer_triton_(parent.clone(), child, pidx, weights, Identity(), seeds, rows=rows.float())
    # nothing uploads: zero aggregate in out, nothing else touched
    o = torch.full_like(parent, 3.0)
    p = parent.clone()
    norms = aggregate_layer_triton_(p, child, pidx, weights, NaturalCompression("ef"), seeds, memory=memory.clone(),
                                    rows=rows[:0], out=o)
    assert norms.shape == (0, 1) and not bool(o.any()) and torch.equal(p, parent)


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


FP32_CASES = [QSGD(4, bucket_size=None), QSGD(3, bucket_size=100), QSGD(5, bucket_size=1200), QSGD(1, bucket_size=None), QSGD(8, bucket_size=2000),
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
    tri, _ = triton(parent, child, weights, quantizer, seeds, block=BLOCK)
    assert_matches(tri, out, parent)


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
    norms = cpu_kernels.aggregate_layer_numba_(out, bad, PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds)
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
    aggregate_layer_(parent.clone(), child, PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds)
    assert calls == [1]
    aggregate_layer_(parent.half(), child.half(), PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds)  # torch path
    assert calls == [1]
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch', 'numba' or 'triton'"):
        aggregate_layer_(parent, child, PARENT_INDEX, weights, QSGD(4, bucket_size=None), seeds, backend="cuda")
