"""Keep large CPU allocations in the heap, so the engine's per-step temporaries are not page-faulted every step.

glibc's malloc serves every request above its mmap threshold (at most 32 MB by default on 64-bit Linux) with a
fresh ``mmap`` and returns it to the kernel on ``free``. The engine's per-step temporaries are that large (the
weight gradients of 100 stacked 784-200-10 MLPs are 64 MB; of 1000, 640 MB), so every local step paid for
touching fresh pages: a batched weight-gradient GEMM into a fresh output took about twice as long as into a
reused one (bench/RESULTS.md has the measurements).

:func:`retain_large_allocations` raises the mmap threshold and the trim threshold with ``mallopt`` so such blocks
come from the heap and are reused. Blocks above 256 MiB (the 640 MB gradients of 1000 MLPs) still get their own
mapping: reusing those through the heap fragmented it (with a 1 GiB threshold 1000 MLPs peaked ~25 % higher; with
256 MiB the peak is the same as without the setting; bench/RESULTS.md). Effects: process-wide; memory freed by
the process stays mapped (the RSS does not shrink after a peak). It is a no-op where glibc is not the C library
(macOS, musl) and can be switched off with the environment variable ``QMLHFL_KEEP_MALLOC=1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["retain_large_allocations"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 28  # blocks up to 256 MiB come from the heap

_done: bool | None = None


def retain_large_allocations() -> bool:
    """Apply the mallopt settings once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("QMLHFL_KEEP_MALLOC", "") not in ("", "0") or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The trim threshold first: raising the mmap threshold alone would still hand freed heap tops back.
    _done = bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD * 2 - 1)) and bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    return _done
