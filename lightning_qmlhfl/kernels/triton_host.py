"""Host side of the Triton backend (:mod:`.triton_cuda`): validation of the inputs, the CSR layout of the children by
parent, and the first pass (per-upload norms) of the two-pass aggregation. Imports Triton."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..compressors import Compressor
from ..hierarchy import children_by_parent
from .triton_kernels import diff_sumsq_kernel

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run in Triton's CPU interpreter (Triton decides this when it is first imported)."""

__all__ = ["INTERPRET", "Layer", "Uploads", "check_block", "warps_for", "prepare", "per_row", "seeds_tensor", "bucket_length",
           "gather_uploads", "state_tensor", "upload_norms", "write_back", "row_norms_triton", "STORAGE_DTYPES",
           "MAX_COLS", "MAX_PROGRAMS", "DEFAULT_BLOCK"]

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_COLS = 2**31 - 2**16  # column indices (and block starts past them) must fit in int32
MAX_PROGRAMS = 2**31 - 1  # 1D grid limit
DEFAULT_BLOCK = 1024


@dataclass
class Layer:
    """Validated, kernel-ready view of one layer's aggregation inputs."""

    parent: Tensor  # [M, P], stride(1) == 1 (a contiguous copy of the caller's tensor if it was not)
    caller_parent: Tensor  # the caller's tensor (written back to when ``parent`` is a copy)
    child: Tensor  # [C, P], stride(1) == 1
    parent_index: Tensor  # int64 [C] on the device
    order: Tensor  # int64 [C]: child rows sorted by parent, stable
    segments: Tensor  # int64 [M + 1]: children of p are order[segments[p]:segments[p + 1]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parent.shape[0], self.child.shape[0], self.child.shape[1]


def check_block(block: int | None) -> int:
    if block is None:
        return DEFAULT_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (columns per program), got {block!r}")
    return block


def warps_for(block: int) -> int:
    return max(1, min(8, block // 256))


def prepare(parent: Tensor, child: Tensor, parent_index: Tensor, who: str) -> Layer:
    """Validate shapes, dtypes, devices and index range; make strides kernel-friendly; sort children by parent."""
    for name, t in (("parent", parent), ("child", child), ("parent_index", parent_index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if parent.dim() != 2 or child.dim() != 2 or parent.shape[1] != child.shape[1]:
        raise ValueError(
            f"{who}: parent [M, P] and child [C, P] must be 2-D and share P; got {tuple(parent.shape)} and "
            f"{tuple(child.shape)}"
        )
    M, P = parent.shape
    C = child.shape[0]
    if P > MAX_COLS:
        raise ValueError(
            f"{who}: P = {P} columns is unsupported by the Triton kernels (column indices are int32 Philox "
            f"counters); at most {MAX_COLS}. Use backend='torch' for larger rows."
        )
    for name, t in (("parent", parent), ("child", child)):
        if t.dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"{who}: {name} dtype {t.dtype} is not supported; allowed storage dtypes: "
                f"{', '.join(str(d) for d in STORAGE_DTYPES)}"
            )
    if child.device != parent.device:
        raise ValueError(f"{who}: parent is on {parent.device} but child is on {child.device}; use one device")
    if parent.device.type != "cuda" and not (parent.device.type == "cpu" and INTERPRET):
        raise RuntimeError(
            f"{who}: Triton kernels need CUDA tensors (got {parent.device}), or TRITON_INTERPRET=1 set before "
            "lightning_qmlhfl.kernels is imported to run them on CPU in Triton's interpreter; "
            "use backend='torch' otherwise"
        )
    if parent_index.shape != (C,):
        raise ValueError(f"{who}: parent_index must have shape ({C},), got {tuple(parent_index.shape)}")
    if parent_index.dtype == torch.bool or parent_index.is_floating_point() or parent_index.is_complex():
        raise ValueError(f"{who}: parent_index must be an integer tensor, got dtype {parent_index.dtype}")
    if M < 1:
        raise ValueError(f"{who}: parent must have at least one row, got shape {tuple(parent.shape)}")
    device = parent.device
    parent_index = parent_index.to(device=device, dtype=torch.int64)
    order, segments = children_by_parent(parent_index, M, who)
    # Rows may be strided (views into a bigger stack); columns must be unit-stride.
    caller_parent = parent
    if parent.stride(1) != 1 or parent.stride(0) < P:
        parent = parent.contiguous()
    if child.stride(1) != 1 or child.stride(0) < P:
        child = child.contiguous()
    return Layer(parent, caller_parent, child, parent_index, order, segments)


def per_row(t: Tensor, C: int, name: str, device: torch.device, dtype: torch.dtype, who: str) -> Tensor:
    if not isinstance(t, Tensor) or t.shape != (C,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{who}: {name} must be a tensor of shape ({C},), got {shape}")
    return t.to(device=device, dtype=dtype).contiguous()


def seeds_tensor(seeds: Tensor, C: int, device: torch.device, who: str) -> Tensor:
    if not isinstance(seeds, Tensor) or seeds.shape != (C,) or seeds.dtype != torch.int64:
        desc = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"{who}: seeds must be an int64 tensor of shape ({C},) (from row_seeds), got {desc}")
    return seeds.to(device).contiguous()


def bucket_length(compressor: Compressor | None, bucket_size: int | None, P: int) -> int | None:
    """The effective bucket size (None = one norm per row), with the torch reference's rule (a bucket at least as
    long as the row is the whole row). With a compressor, its own ``bucket_size`` (None for the unbucketed)."""
    if compressor is not None:
        bucket_size = compressor.bucket_size
    bad = isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1
    if bucket_size is not None and bad:
        raise ValueError(f"bucket_size must be None or an integer >= 1, got {bucket_size!r}")
    if bucket_size is None or bucket_size >= P:
        return None
    return bucket_size


@dataclass
class Uploads:
    """The child rows that upload, grouped by parent: upload k is child row ``rows[k]`` (or k when ``rows`` is
    None: all rows upload)."""

    order: Tensor  # int64 [n]: upload positions k sorted by parent, stable (each parent keeps the order of rows)
    rows: Tensor | None  # int64 [n]: the child row of each upload; None: all C rows, upload k = child k
    segments: Tensor  # int64 [M + 1]: the uploads of p are order[segments[p]:segments[p + 1]]

    @property
    def count(self) -> int:
        return self.order.shape[0]


def gather_uploads(layer: Layer, rows: Tensor | None, who: str) -> Uploads:
    """Validate ``rows`` (int child-row indices in [0, C)) and group the uploads by parent."""
    if rows is None:
        return Uploads(layer.order, None, layer.segments)
    M, C, _ = layer.shape
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype == torch.bool or rows.is_floating_point() \
            or rows.is_complex():
        desc = f"{tuple(rows.shape)} {rows.dtype}" if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{who}: rows must be a 1-D integer tensor of child row indices, got {desc}")
    rows = rows.to(device=layer.parent.device, dtype=torch.int64).contiguous()
    if rows.numel():
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= C:  # the kernels index without bounds checks
            raise ValueError(f"{who}: rows must index the {C} child rows [0, {C - 1}], got values in [{lo}, {hi}]")
    order, segments = children_by_parent(layer.parent_index[rows], M, who)
    return Uploads(order, rows, segments)


def state_tensor(t: object, shape: tuple[int, int], name: str, device: torch.device, who: str) -> Tensor:
    """A float32 [rows, P] tensor the kernel writes (``memory``, ``out``): validated, and a contiguous copy
    (written back by the caller) when its columns are not unit-stride."""
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device:
        desc = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
        raise ValueError(f"{who}: {name} must be a float32 tensor of shape {list(shape)} on {device}, got {desc}")
    if t.stride(1) != 1 or t.stride(0) < shape[1]:
        t = t.contiguous()
    return t


def upload_norms(layer: Layer, bucket_size: int | None, block: int, uploads: Uploads | None = None,
           memory: Tensor | None = None, ef: int = 0, l1: bool = False) -> Tensor:
    """Pass 1: float32 [n, buckets] norms of the compressor inputs x of the n uploads (default: all C rows, in
    child order; else in the order of ``uploads.rows``): L2 (or L1 with ``l1``), whole row when bucket_size is
    None. x = child - parent, + memory (ef 1) or - memory (ef 2)."""
    M, C, P = layer.shape
    uploads = uploads if uploads is not None else Uploads(layer.order, None, layer.segments)
    n = uploads.count
    device = layer.parent.device
    if P == 0:  # empty rows have norm 0, one "bucket", as in the torch reference
        return torch.zeros(n, 1, dtype=torch.float32, device=device)
    bucket = P if bucket_size is None else bucket_size
    nb = -(-P // bucket)
    if n == 0:
        return torch.zeros(n, nb, dtype=torch.float32, device=device)
    if bucket <= block:  # several whole buckets per program, one tile row each
        W = triton.next_power_of_2(bucket)
        R = min(block // W, triton.next_power_of_2(nb))
        blocks_per_bucket = 1
        num_col = -(-nb // R)
    else:  # a bucket spans several programs; the host adds their partial sums
        W, R = block, 1
        blocks_per_bucket = -(-bucket // block)
        num_col = nb * blocks_per_bucket
    if n * num_col > MAX_PROGRAMS:
        raise ValueError(f"{n} rows x {num_col} column blocks exceed the launch grid; use a larger block")
    partial = torch.empty(n, num_col * R, dtype=torch.float64, device=device)
    subset = uploads.rows is not None
    diff_sumsq_kernel[(n * num_col,)](
        layer.parent,
        layer.child,
        uploads.order,
        uploads.rows if subset else uploads.order,  # unused without a subset
        layer.parent_index,
        memory if ef else partial,  # unused without error feedback
        partial,
        n,
        P,
        layer.parent.stride(0),
        layer.child.stride(0),
        memory.stride(0) if ef else 0,
        bucket,
        blocks_per_bucket,
        num_col * R,
        R=R,
        W=W,
        EF=ef,
        L1=l1,
        SUBSET=subset,
        num_warps=warps_for(R * W),
        enable_fp_fusion=False,
    )
    sums = partial[:, : nb * blocks_per_bucket].reshape(n, nb, blocks_per_bucket).sum(dim=2)
    return (sums if l1 else sums.sqrt_()).to(torch.float32)


def write_back(layer: Layer) -> None:
    if layer.parent.data_ptr() != layer.caller_parent.data_ptr():
        layer.caller_parent.copy_(layer.parent)


@torch.no_grad()
def row_norms_triton(
    parent: Tensor,
    child: Tensor,
    parent_index: Tensor,
    bucket_size: int | None = None,
    *,
    block: int | None = None,
) -> Tensor:
    """L2 norms of ``child[c] - parent[parent_index[c]]`` per row, or per bucket of ``bucket_size`` columns.

    ``parent`` [M, P], ``child`` [C, P] (fp32/fp16/bf16/fp64 storage), ``parent_index`` int [C].
    Returns float32 [C, buckets] (buckets = 1 without bucketing or when bucket_size >= P), equal to
    ``quantizers.row_norms(child.float() - parent.float()[parent_index], bucket_size)`` to fp32 rounding.
    The difference is never materialised; squares are summed in fp64.
    """
    block = check_block(block)
    layer = prepare(parent, child, parent_index, "row_norms_triton")
    return upload_norms(layer, bucket_length(None, bucket_size, layer.shape[2]), block)
