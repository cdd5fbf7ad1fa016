"""Differential privacy options per aggregation layer, and the arithmetic on stacked upload rows (docs/privacy.md).

An option object says what layer n does to the uploads it receives from layer n-1 (devices when n = 1):

- ``NoPrivacy()`` (``"none"``, the default): nothing.
- ``GaussianDP(noise_multiplier, clip_norm, where, target_quantile, clip_lr, count_noise)`` (``"gaussian"``): every
  upload into layer n (a sender's model difference) is clipped to L2 norm ``clip_norm`` (C), and Gaussian noise is
  added

  * ``where="local"``: by each sender to its own clipped upload, std ``noise_multiplier * C`` (the receiver never
    sees an un-noised upload);
  * ``where="central"`` (McMahan et al. 2018, DP-FedAvg): by the aggregating node to its weighted sum of the clipped
    uploads, std ``noise_multiplier * C * max_weight``: one sender moves the weighted sum by at most
    ``weight * C <= max_weight * C``, the sum's sensitivity. The node itself sees the raw uploads (it is trusted).

  ``target_quantile`` (central only) turns on adaptive clipping, the quantile method of Andrew, Thakkar, McMahan and
  Ramaswamy ("Differentially private learning with adaptive clipping", NeurIPS 2021): after each aggregation
  C <- C * exp(-clip_lr * (b - target_quantile)), b the fraction of the k uploads with norm <= C, released with
  Gaussian noise of std ``count_noise / k`` (``count_noise`` is the std of the noise on the count; default k / 20,
  their recommendation). The count is a second release about the same senders; its cost is paid by splitting the
  noise: the sum gets the multiplier z_sum = (z^-2 - (2 * count_noise)^-2)^(-1/2) >= z, so that the two releases
  together are exactly as private as one Gaussian release with multiplier z = ``noise_multiplier`` (the number the
  accountant uses). Local adaptive clipping is refused: each sender would reveal its own un-noised bit.

The option classes hold no state; the arithmetic on the stacked rows [k, P] of one aggregation is in the functions
:func:`clip_rows_`, :func:`add_gaussian_noise_`, :func:`noisy_fraction_below`, :func:`noise_multiplier_for_sum`
and :func:`adaptive_clip_update`. Accounting (what epsilon a configuration gives) is in
:mod:`lightning_qmlhfl.privacy.accounting`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import checks
from ..options import ConfigOption, Family, from_spec, per_layer

__all__ = ["Privacy", "NoPrivacy", "GaussianDP", "WHERE", "PRIVACIES", "PRIVACY_FAMILY", "make_privacy",
           "layer_privacy", "default_count_noise", "noise_multiplier_for_sum", "clip_rows_", "add_gaussian_noise_",
           "noisy_fraction_below", "adaptive_clip_update"]

WHERE = ("local", "central")


class Privacy(ConfigOption):
    """Interface (module docstring). ``config_name``: the name :func:`make_privacy` takes; ``config_options``: its
    constructor's options."""

    config_name = ""
    config_options: tuple[str, ...] = ()

    @property
    def is_off(self) -> bool:
        """True when the layer neither clips nor adds noise."""
        return False



class NoPrivacy(Privacy):
    """No clipping, no noise (the default)."""

    config_name = "none"

    @property
    def is_off(self) -> bool:
        return True


def default_count_noise(num_uploads: int) -> float:
    """Andrew et al.'s choice for the std of the noise on the clipped-count: k / 20, k the (expected) number of
    uploads per aggregation."""
    k = checks.integer(num_uploads, "the number of uploads", minimum=1)
    return k / 20.0


class GaussianDP(Privacy):
    """Per-sender L2 clipping and Gaussian noise, local or central, with optional adaptive clipping (module
    docstring).

    ``noise_multiplier`` (z >= 0): the noise std in units of the sensitivity (the multiplier the accountant uses;
    with adaptive clipping the sum gets the larger :meth:`sum_noise_multiplier`). ``clip_norm`` (> 0): C, the
    initial clip when adaptive. ``where``: ``"local"`` or ``"central"``. ``target_quantile``: None (fixed clip) or
    the quantile in (0, 1) of the upload norms that C tracks; ``clip_lr`` (> 0): the geometric step of that update;
    ``count_noise``: None (k / 20) or the std (> 0) of the noise on the count of uploads below C.
    """

    config_name = "gaussian"
    config_options = ("noise_multiplier", "clip_norm", "where", "target_quantile", "clip_lr", "count_noise")

    def __init__(self, noise_multiplier: float = 1.0, clip_norm: float = 1.0, where: str = "central",
                 target_quantile: float | None = None, clip_lr: float = 0.2,
                 count_noise: float | None = None) -> None:
        self.noise_multiplier = checks.real(noise_multiplier, "GaussianDP noise_multiplier", 0.0)
        self.clip_norm = checks.real(clip_norm, "GaussianDP clip_norm", 0.0, low_open=True)
        self.where = checks.choice(where, "GaussianDP where", WHERE)
        self.target_quantile = checks.real(target_quantile, "GaussianDP target_quantile", 0.0, 1.0, low_open=True,
                                           high_open=True, allow_none=True)
        self.clip_lr = checks.real(clip_lr, "GaussianDP clip_lr", 0.0, low_open=True)
        self.count_noise = checks.real(count_noise, "GaussianDP count_noise", 0.0, low_open=True, allow_none=True)
        if self.target_quantile is not None and self.where == "local":
            raise ValueError(
                f"GaussianDP target_quantile={self.target_quantile!r} (adaptive clipping) needs where='central', got "
                f"where='local': with local noise every sender would reveal, un-noised, whether its norm is below "
                f"the clip")
        if self.count_noise is not None:
            if self.target_quantile is None:
                raise ValueError(f"GaussianDP count_noise={self.count_noise!r} is only used by adaptive clipping: "
                                 f"give target_quantile too, or leave count_noise None")
            noise_multiplier_for_sum(self.noise_multiplier, self.count_noise)  # raises when the split is impossible

    @property
    def adaptive(self) -> bool:
        """Whether the clip adapts (a target quantile is set)."""
        return self.target_quantile is not None

    def count_noise_for(self, num_uploads: int) -> float:
        """The std of the noise on the count of uploads below the clip: ``count_noise``, else k / 20."""
        return self.count_noise if self.count_noise is not None else default_count_noise(num_uploads)

    def sum_noise_multiplier(self, num_uploads: int | None = None) -> float:
        """The multiplier of the noise on the sum: z, or with adaptive clipping Andrew et al.'s z_sum >= z (for
        ``num_uploads`` k uploads when ``count_noise`` is None)."""
        if not self.adaptive:
            return self.noise_multiplier
        if self.count_noise is None and num_uploads is None:
            raise ValueError("GaussianDP with adaptive clipping and count_noise=None needs the number of uploads "
                             "(count_noise defaults to k / 20)")
        return noise_multiplier_for_sum(self.noise_multiplier, self.count_noise_for(num_uploads or 1))

    def upload_noise_std(self, clip: float | None = None) -> float:
        """where="local": the std of the noise each sender adds to its clipped upload, z * C."""
        return self.noise_multiplier * (self.clip_norm if clip is None else float(clip))

    def aggregate_noise_std(self, max_weight: float, num_uploads: int | None = None,
                            clip: float | None = None) -> float:
        """where="central": the std of the noise the node adds to its weighted sum, z_sum * C * max_weight
        (``clip``: the current clip when adaptive, else ``clip_norm``)."""
        w = checks.real(max_weight, "max_weight", 0.0)
        return self.sum_noise_multiplier(num_uploads) * (self.clip_norm if clip is None else float(clip)) * w


PRIVACIES: dict[str, type[Privacy]] = {"none": NoPrivacy, "gaussian": GaussianDP}

PRIVACY_FAMILY = Family(Privacy, PRIVACIES, "none", "privacy", "a privacy option")


def make_privacy(spec: object) -> Privacy:
    """From a config value: an instance, ``None`` (NoPrivacy), a name, or a dict with ``name`` and options
    (:func:`lightning_qmlhfl.options.from_spec`)."""
    return from_spec(spec, PRIVACY_FAMILY)


def layer_privacy(names: Any, num_layers: int, **options: Any) -> list[Privacy]:
    """One privacy option per layer n = 1..N from config values (a recipe's ``privacy`` group): ``names`` one name
    or a list of N; every option (``noise_multiplier``, ``clip_norm``, ``where``, ``target_quantile``,
    ``clip_lr``, ``count_noise``) one value or a list of N; each layer takes the options its class has, ``None``
    the default."""
    known = {k for cls in PRIVACIES.values() for k in cls.config_options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"privacy takes the options {sorted(known)}, got also {unknown}")
    return per_layer(names, num_layers, PRIVACY_FAMILY, "privacy",
                     split=lambda k, v: [v] * num_layers if v is None or isinstance(v, (str, bool))
                     or not isinstance(v, Sequence) else None, **options)


# ---------------------------------------------------------------------------------------------------- the arithmetic

def noise_multiplier_for_sum(noise_multiplier: float, count_noise: float) -> float:
    """Andrew et al.'s split: the multiplier z_sum of the noise on the sum such that the sum (sensitivity C, noise
    z_sum * C) and the centred count (sensitivity 1/2, noise ``count_noise``) together are one Gaussian release with
    multiplier z: z_sum = (z^-2 - (2 * count_noise)^-2)^(-1/2). Needs count_noise > z / 2; z = 0 gives 0."""
    z = checks.real(noise_multiplier, "noise_multiplier", 0.0)
    sigma_b = checks.real(count_noise, "count_noise", 0.0, low_open=True)
    if z == 0.0:
        return 0.0
    if 2.0 * sigma_b <= z:
        raise ValueError(
            f"count_noise must be > noise_multiplier / 2 = {z / 2:g} for the noise split of adaptive clipping "
            f"(Andrew et al. 2021), got {count_noise!r}: with k uploads the default is k / 20; give a larger "
            f"count_noise or a smaller noise_multiplier")
    return (z ** -2 - (2.0 * sigma_b) ** -2) ** -0.5


def _check_rows(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor [k, P] (one row per upload), got "
                         f"{type(x).__name__ if not isinstance(x, Tensor) else f'{x.dtype} {tuple(x.shape)}'}")


def clip_rows_(x: Tensor, clip: float | Tensor) -> Tensor:
    """Clip every row of ``x`` [k, P] to L2 norm <= ``clip`` in place (a number > 0, or a tensor [k] of
    per-row clips) and return the norms [k] before clipping (float32, float64 for float64 rows).

    A row with norm <= clip is left bit for bit as it was; a longer one is scaled by clip / norm (its direction is
    kept; its new norm equals clip up to one rounding of the row's dtype). Non-finite rows are not repaired."""
    _check_rows(x, "clip_rows_ x")
    if isinstance(clip, Tensor):
        if clip.shape not in ((), (x.shape[0],)) or bool((clip <= 0).any()):
            raise ValueError(f"clip must be > 0, as a number or a tensor [{x.shape[0]}], got {clip!r}")
        c = clip.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    else:
        c = checks.real(clip, "clip", 0.0, low_open=True)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(x, dim=1, dtype=acc)
    scale = torch.where(norms > c, c / norms, torch.ones_like(norms))
    x.mul_(scale.to(x.dtype).unsqueeze(1))
    return norms


def add_gaussian_noise_(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``x += N(0, std^2)`` entrywise, in place (``generator`` on x's device; None: torch's default). Returns x."""
    s = checks.real(std, "noise std", 0.0)
    if s > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x.add_(noise, alpha=s)
    return x


def noisy_fraction_below(norms: Tensor, clip: float | Tensor, count_noise: float,
                         generator: torch.Generator | None = None) -> float:
    """Andrew et al.'s b: (#{i: norm_i <= clip} + N(0, count_noise^2)) / k for the k norms of one aggregation."""
    if not isinstance(norms, Tensor) or norms.dim() != 1 or norms.numel() == 0:
        raise ValueError(f"norms must be a non-empty tensor [k], got {norms!r}")
    sigma = checks.real(count_noise, "count_noise", 0.0)
    count = float((norms <= clip).sum())
    noise = float(torch.randn((), generator=generator, dtype=torch.float64, device=norms.device)) if sigma else 0.0
    return (count + sigma * noise) / norms.numel()


def adaptive_clip_update(clip: float | Tensor, fraction_below: float | Tensor, target_quantile: float,
                         clip_lr: float) -> float | Tensor:
    """Andrew et al.'s geometric update C * exp(-clip_lr * (b - target_quantile)): the clip shrinks when more than
    the target fraction of the uploads was below it, and grows otherwise."""
    gamma = checks.real(target_quantile, "target_quantile", 0.0, 1.0, low_open=True, high_open=True)
    eta = checks.real(clip_lr, "clip_lr", 0.0, low_open=True)
    if isinstance(clip, Tensor) or isinstance(fraction_below, Tensor):
        return clip * torch.exp(-eta * (torch.as_tensor(fraction_below) - gamma))
    c = checks.real(clip, "clip", 0.0, low_open=True)
    b = checks.real(fraction_below, "fraction_below")
    return c * math.exp(-eta * (b - gamma))
