"""Batched on-device preprocessing of image tensors: normalisation, and the CIFAR crop-and-flip augmentation drawn
from a generator (one call for a whole stacked batch, on whatever device the tensors live)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["crop_flip", "normalize", "random_crop_flip"]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Scale ``uint8`` pixels to [0, 1] and standardise each channel: ``(x / 255 - mean) / std``.

    Args:
        x: ``uint8`` ``[..., C, H, W]`` on any device.
        mean, std: ``C`` per-channel values in [0, 1] pixel units (e.g. :data:`CIFAR10_MEAN`).

    Returns:
        ``float32`` tensor of the same shape and device.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels (0..255), got dtype {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"normalize expects [..., C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {c} channels")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(c, 1, 1)
    inv = 1.0 / torch.tensor(std, dtype=torch.float32, device=x.device).view(c, 1, 1)
    return (x.to(torch.float32).mul_(1.0 / 255.0).sub_(m)).mul_(inv)


PaddingMode = Literal["zeros", "reflect"]


def crop_flip(
    x: Tensor,
    offsets_y: Tensor,
    offsets_x: Tensor,
    flips: Tensor,
    padding: int = 4,
    padding_mode: PaddingMode = "reflect",
) -> Tensor:
    """Crop each image of a batch at a given offset from its padded version and flip the chosen ones.

    Output ``[b, :, i, j] = padded[b, :, offsets_y[b] + i, offsets_x[b] + j']`` with
    ``j' = W - 1 - j`` where ``flips[b]`` else ``j``; ``padded`` is ``x`` padded by ``padding`` pixels
    on every side (``"zeros"``: zero fill, i.e. the mean pixel after :func:`normalize`; ``"reflect"``:
    mirror without repeating the edge). One gather, no loop over samples.

    Args:
        x: float ``[B, C, H, W]``.
        offsets_y, offsets_x: integer ``[B]`` in ``0 .. 2 * padding`` (``padding`` = no shift).
        flips: bool ``[B]``, True = mirror horizontally.
        padding: pixels of padding per side, ``0 <= padding`` (``< H, W`` for reflect).
        padding_mode: ``"zeros"`` or ``"reflect"``.

    Returns:
        Tensor like ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip expects [B, C, H, W], got shape {tuple(x.shape)}")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image size {h}x{w}")
    for t, what in ((offsets_y, "offsets_y"), (offsets_x, "offsets_x"), (flips, "flips")):
        if t.shape != (b,):
            raise ValueError(f"{what} must have shape ({b},), got {tuple(t.shape)}")
    if padding:
        mode = "constant" if padding_mode == "zeros" else "reflect"
        xp = F.pad(x, (padding, padding, padding, padding), mode=mode)
    else:
        xp = x
    hp, wp = h + 2 * padding, w + 2 * padding
    dev = x.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets_y.to(dev, torch.long).view(b, 1) + ar_h  # [B, H]
    col_in = torch.where(flips.to(dev, torch.bool).view(b, 1), (w - 1) - ar_w, ar_w)  # [B, W]
    cols = offsets_x.to(dev, torch.long).view(b, 1) + col_in  # [B, W]
    flat_idx = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, flat_idx).view(b, c, h, w)


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    padding_mode: PaddingMode = "reflect",
) -> Tensor:
    """Random-crop-with-padding and random horizontal flip (p = 0.5), independently per image.

    The standard CIFAR augmentation (crop ``H x W`` from the image padded by ``padding`` on each side),
    vectorised over the batch. Default padding is ``"reflect"`` (airbench's choice: after normalisation a
    constant fill would be an arbitrary colour); ``"zeros"`` pads with 0, the mean pixel.

    Args:
        x: float ``[B, C, H, W]`` or ``[..., B, C, H, W]`` (e.g. ``[D, B, C, H, W]`` with a leading device
            dimension; all leading dims are flattened, augmented independently and restored).
        padding: pixels per side; offsets are drawn uniformly from ``0 .. 2 * padding``.
        generator: optional ``torch.Generator`` for reproducible draws; the offsets and flips are drawn
            on the generator's device and moved to ``x.device``. Without one, drawn on ``x.device``.
        padding_mode: ``"zeros"`` or ``"reflect"``.

    Returns:
        Tensor with the shape, dtype and device of ``x``.
    """
    if x.dim() < 4:
        raise ValueError(f"random_crop_flip expects [..., B, C, H, W], got shape {tuple(x.shape)}")
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    n = flat.shape[0]
    draw_device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_device)
    flips = torch.rand(n, generator=generator, device=draw_device) < 0.5
    out = crop_flip(flat, offsets[0], offsets[1], flips, padding=padding, padding_mode=padding_mode)
    return out.view(*lead, *x.shape[-3:])
