"""Every compressor written out per entry in plain Python: the slowest, most obviously correct version, for the
reference tests. ``row`` is a list of floats, ``u`` the row's U[0, 1) draws."""

from __future__ import annotations

import math

from lightning_qmlhfl import QSGD, Identity, NaturalCompression, RandomK, ScaledSign, TopK


def qsgd_by_hand(row: list[float], levels: int, bucket: int | None, u: list[float]) -> list[float]:
    b = bucket or len(row)
    out = []
    for lo in range(0, len(row), b):
        chunk = row[lo:lo + b]
        norm = math.sqrt(sum(v * v for v in chunk))
        for j, v in enumerate(chunk):
            if norm == 0:
                out.append(0.0)
                continue
            r = levels * abs(v) / norm
            low = math.floor(r)
            xi = low + (1 if u[lo + j] < r - low else 0)
            out.append(norm * math.copysign(1.0, v) * xi / levels if v != 0 else 0.0)
    return out


def topk_by_hand(row: list[float], k: int) -> list[float]:
    order = sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))  # largest first, ties: lower index first
    keep = set(order[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(row)]


def randomk_by_hand(row: list[float], k: int, u: list[float]) -> list[float]:
    order = sorted(range(len(row)), key=lambda i: (u[i], i))  # the k smallest draws
    keep = set(order[:k])
    return [v * len(row) / k if i in keep else 0.0 for i, v in enumerate(row)]


def sign_by_hand(row: list[float], bucket: int | None) -> list[float]:
    b = bucket or len(row)
    out = []
    for lo in range(0, len(row), b):
        chunk = row[lo:lo + b]
        scale = sum(abs(v) for v in chunk) / len(chunk)
        out += [scale if v >= 0 else -scale for v in chunk]
    return out


def natural_by_hand(v: float, u: float) -> float:
    if v == 0:
        return 0.0
    lower = 2.0 ** math.floor(math.log2(abs(v)))
    p = abs(v) / lower - 1.0
    return math.copysign(2 * lower if u < p else lower, v)


def compress_by_hand(c, row: list[float], u: list[float] | None) -> list[float]:
    """C(row) for any of the project's compressors."""
    if isinstance(c, Identity):
        return list(row)
    if isinstance(c, QSGD):
        return qsgd_by_hand(row, c.levels, c.bucket_size, u)
    if isinstance(c, TopK):
        return topk_by_hand(row, c.k_for(len(row)))
    if isinstance(c, RandomK):
        return randomk_by_hand(row, c.k_for(len(row)), u)
    if isinstance(c, ScaledSign):
        return sign_by_hand(row, c.bucket_size)
    if isinstance(c, NaturalCompression):
        return [natural_by_hand(v, w) for v, w in zip(row, u)]
    raise TypeError(c)
