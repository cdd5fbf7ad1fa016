"""The Triton device functions of the fused compress-and-aggregate kernels (:mod:`.triton_kernels`): column tiles,
the counter-based draws, each compressor's rule and the exact conversions between storage dtypes and fp32.
The operations and their order are those of the torch reference (:mod:`.reference`); :mod:`.triton_cuda` says why
(its module docstring: random numbers, arithmetic)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["column_tile", "philox_uniforms", "copysign", "qsgd_levels", "natural", "sign_scale", "compress",
           "to_storage", "to_fp32", "upload_norm", "compressor_input"]


@triton.jit
def column_tile(start, BLOCK: tl.constexpr):
    """Column indices start + 4 i + j of a block, as an int32 tile [BLOCK // 4, 4] (row-major = memory order)."""
    return start + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]


@triton.jit
def philox_uniforms(seed, start, BLOCK: tl.constexpr):
    """U[0, 1) draws for columns start + 4 i + j (``start`` a multiple of 4), fp32 [BLOCK // 4, 4].

    Column 4 k + j takes word j of Philox4x32-10(key=seed, counter=(k, 0, 0, 0)), converted like ``tl.rand``.
    """
    counter = start // 4 + tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    word = tl.arange(0, 4)[None, :]
    return tl.where(
        word == 0,
        u0[:, None],
        tl.where(word == 1, u1[:, None], tl.where(word == 2, u2[:, None], u3[:, None])),
    )


@triton.jit
def copysign(a, x):
    """``a`` (>= 0, +0 included) with the sign bit of ``x``, on the bits (torch's ``copysign``: -0.0 included)."""
    bits = a.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def qsgd_levels(x, norm, u, s):
    """Signed QSGD levels sign(x) * xi as fp32, element for element as ``QSGD.compress_`` (before its final
    multiply by norm / s) and ``compressors.quantize_levels``.

    ``x`` fp32 compressor inputs, ``norm`` the fp32 norm of each entry's row/bucket (scalar or x's shape), ``u``
    U[0, 1) draws, ``s`` the number of levels (fp32). Division is correctly rounded (``div_rn``) like torch's.
    The sign is copied from x's sign bit, as ``copysign`` in the reference (a zero level keeps the sign of x).
    """
    safe = tl.where(norm > 0, norm, 1.0)
    r = tl.minimum(tl.math.div_rn(tl.abs(x), safe), 1.0)  # |x| / norm, clamped at 1 against rounding
    scaled = r * s
    low = tl.floor(scaled)
    xi = low + tl.where(u < scaled - low, 1.0, 0.0)  # up with probability (fractional part)
    xi = tl.minimum(xi, s)  # no-ops (xi <= s since r <= 1; a zero norm means x = 0, so xi = 0 already):
    xi = tl.where(norm > 0, xi, 0.0)  # kept as guards, they change no number
    return copysign(xi, x)


@triton.jit
def natural(x, u):
    """NaturalCompression of fp32 ``x`` with draws ``u`` (see ``compressors.natural``), on the bits, in the
    reference's order: |x| (subnormals times 2^64, exact), lower power = the bits with the mantissa cleared,
    probability = mantissa * 2^-23 (exact), twice the lower power if u < probability, subnormals times 2^-64
    again (exact), then x's sign bit. A zero stays zero (with its sign)."""
    a = tl.abs(x)
    sub = a.to(tl.int32, bitcast=True) < 0x00800000  # zero or subnormal
    a = tl.where(sub, a * 18446744073709551616.0, a)  # 2^64
    bits = a.to(tl.int32, bitcast=True)
    lower = (bits & 0x7F800000).to(tl.float32, bitcast=True)
    prob = (bits & 0x007FFFFF).to(tl.float32) * 1.1920928955078125e-07  # 2^-23
    q = tl.where(u < prob, lower * 2.0, lower)
    q = tl.where(sub, q * 5.421010862427522e-20, q)  # 2^-64
    return copysign(q, x)


@triton.jit
def sign_scale(norm, cols, P, BUCKET: tl.constexpr):
    """ScaledSign's scale fp32(||x_b||_1) / fp32(len(b)) for each entry's row (BUCKET == 0: len = P) or bucket
    (the last bucket of a row may be shorter), correctly rounded like ``ScaledSign.scales``."""
    if BUCKET == 0:
        length = (P + tl.zeros_like(cols)).to(tl.float32)  # a tile: P may be specialised to a constexpr (P == 1)
    else:
        first = (cols // BUCKET) * BUCKET
        # max(.., 1) only keeps the masked lanes past P (never stored) free of 0 / 0
        length = tl.maximum(tl.minimum(P - first, BUCKET), 1).to(tl.float32)
    return tl.math.div_rn(norm, length)


@triton.jit
def compress(x, u, norm, cols, P, s, KIND: tl.constexpr, BUCKET: tl.constexpr):
    """C(x) for fp32 ``x``: KIND 0 Identity, 1 QSGD (level * (norm / s)), 2 ScaledSign (scale if x >= 0 else
    -scale), 3 NaturalCompression; the operations of each compressor's ``compress_`` in their order."""
    if KIND == 0:
        q = x
    elif KIND == 1:
        q = qsgd_levels(x, norm, u, s) * tl.math.div_rn(norm, s)
    elif KIND == 2:
        scale = sign_scale(norm, cols, P, BUCKET)
        q = tl.where(x >= 0, scale, -scale)
    else:
        q = natural(x, u)
    return q


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to the storage ``dtype`` with round-to-nearest-even, like torch's ``copy_``.

    For bf16 the rounding is done on the bits (add 0x7FFF plus the lowest kept bit, keep the high half), and the
    high half becomes the bf16 number by a bitcast: exact for every input, subnormals included (Triton's
    interpreter truncates fp32 -> bf16 instead of rounding, and mishandles subnormals in that conversion).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def to_fp32(x):
    """A loaded storage tile as fp32, exactly. bf16 is widened on the bits (the bf16 number is the high half of
    the fp32 one; Triton's interpreter flushes bf16 subnormals in its own conversion), other dtypes by a cast."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def upload_norm(norm_ptr, c, cols, mask, NUM_BUCKETS, BUCKET: tl.constexpr):
    """fp32 norm that scales each entry of row c: a scalar (BUCKET == 0, one norm per row) or a gathered tile."""
    if BUCKET == 0:
        norm = tl.load(norm_ptr + c)
    else:
        norm = tl.load(norm_ptr + c * NUM_BUCKETS + cols // BUCKET, mask=mask, other=0.0)
    return norm


@triton.jit
def compressor_input(child_ptr, memory_ptr, c, stride_child, stride_memory, cols, mask, xp, EF: tl.constexpr):
    """The compressor input x of child row c at ``cols``, fp32, in the reference's order: child - parent, then
    + memory (EF == 1, "ef") or - memory (EF == 2, "ef21"). Returns (x, the memory tile; x itself without EF)."""
    x = to_fp32(tl.load(child_ptr + c * stride_child + cols, mask=mask, other=0.0)) - xp
    if EF == 0:
        m = x
    else:
        m = tl.load(memory_ptr + c * stride_memory + cols, mask=mask, other=0.0)
        if EF == 1:
            x = x + m
        else:
            x = x - m
    return x, m
