"""Patch saliency scores and top-K selection in torch (docs/FORMAT.md 'Patch scores'; docs/ONLINE.md: the online path).

The same definitions as the Numba kernels of ``dynavit.pipeline.saliency`` and the selection
of ``dynavit.pipeline.topk``, but batched torch code that runs on the tensor's device (CPU or
CUDA), traces under ``torch.compile`` and exports with ``torch.export`` (static shapes only:
no ``bincount``, no data-dependent sizes, no host syncs).

Inputs are images ``[B, 3, H, W]`` (the torch layout; the Numba kernels take ``[B, H, W, 3]``)
as uint8 or as floats holding pixel values in 0..255; H and W are multiples of the patch.
Every scorer returns float32 ``[B, H/P, W/P]``.

Exactness (what the tests check against the Numba kernels on uint8 images):

- ``l2``: z = (x/255 − mean)/std in float32, score = sqrt(Σ z²) over the patch's P·P·3 values
  (float32 sum of positive terms; relative error ~1e-6).
- ``sobel``: 1000·Y = 299R + 587G + 114B is an integer below 2^24 for integer pixels, so it and
  the Sobel gradients are exact in float32 (as in the Numba kernel); borders are replicated,
  which for a 3×3 kernel is exactly scipy.ndimage's ``mode='reflect'`` (the edge pixel is
  repeated). The only roundings are the float32 hypot per pixel and the float32 patch mean
  (relative error ~1e-6). Float pixels that are not integers are used as they are.
- ``entropy``: Yi = (299R + 587G + 114B + 500) // 1000 in int32 (float pixels are first
  rounded to the nearest integer and clamped to 0..255), the 256-bin histogram of each patch
  is built exactly with an integer ``scatter_add``, and H = log2(n) − (1/n)·Σ c·log2(c) is
  evaluated with the *same* float64 table of c·log2(c), the same four-lane summation order
  and the same clamp at 0 as the Numba kernel, then cast to float32 — bit-identical results.
- ``contrast`` / ``distinct``: per-patch channel sums S_c and sums of squares Q_c in float64
  (exact for integer pixels: every value is an integer below 2^53), n²·var_c = n·Q_c − S_c²
  and the colour differences (G·S_c − T_c) evaluated with the same operations as the Numba
  kernels. ``contrast`` is bit-identical; ``distinct`` differs only in the summation order
  of the image's mean contrast (relative error ~1e-15 before the cast to float32). Float
  pixels that are not integers are used as they are.

Top-K: ``topk_indices`` ranks by score descending with a stable sort, so ties go to the lower
raster index, exactly like ``select_topk``; NaN scores rank last. Because both sides compute
scores in float, two patches whose true scores are equal or within ~1e-6 may be ordered
differently by the two implementations; this only matters at the K boundary.

``round_to`` (optional): the sequence length S = num_prefix + k is rounded **up** to the next
multiple of ``round_to`` (tensor-core friendly shapes), i.e. k' = the smallest k' ≥ k with
(num_prefix + k') % round_to == 0, capped at N (at the cap S = num_prefix + N, which need not be
a multiple). The ranking is unchanged, so the rounded set is a superset of the unrounded one
and every kept patch of the K set is still kept.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from dynavit.manifests import SCORER_NAMES, k_count




__all__ = ["SCORERS", "IMAGENET_MEAN", "IMAGENET_STD", "score_l2", "score_sobel",
           "score_entropy", "score", "topk_indices", "keep_count", "to_pixels", "clog_table",
           "l2_of_normalized", "score_contrast", "score_distinct"]

SCORERS = SCORER_NAMES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# input checks and helpers

def _check_images(images: torch.Tensor, patch: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch tensor [B,3,H,W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B,3,H,W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float (0..255), got {images.dtype}")
    if isinstance(patch, (bool, np.bool_)) or not isinstance(patch, (int, np.integer)) or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    h, w = int(images.shape[2]), int(images.shape[3])
    if h == 0 or w == 0 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} (HxW) is not a positive multiple of patch {patch}")


def _patches(t: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, Gh, Gw, C, P, P] (a view where possible)."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)


def _channel_vec(name: str, value, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        v = value.detach().reshape(-1).to(device=device, dtype=dtype)
        if v.shape != (3,):
            raise ValueError(f"{name} must be 3 numbers (R, G, B), got shape {tuple(value.shape)}")
        return v
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
    return torch.tensor(arr.tolist(), dtype=dtype, device=device)


def to_pixels(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalized float [B,3,H,W] -> float32 pixels in 0..255, rounded to integers.

    x = (p/255 − mean)/std in float32 reproduces p to within ~1e-4, far below 0.5, so
    rounding recovers the original uint8 pixels exactly. Inputs in bfloat16/float16 do not
    carry enough precision for that (±1 pixel); the scores are then approximate."""
    m = _channel_vec("mean", mean, x.device).view(1, 3, 1, 1)
    s = _channel_vec("std", std, x.device).view(1, 3, 1, 1)
    p = (x.float() * s + m) * 255.0
    return torch.round(p).clamp_(0.0, 255.0)


# ---------------------------------------------------------------------------------------------
# scorers

def score_l2(images: torch.Tensor, patch: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """sqrt(Σ z²) over each patch, z = (x/255 − mean)/std; float32 [B, Gh, Gw]."""
    _check_images(images, patch)
    m = _channel_vec("mean", mean, images.device).view(1, 3, 1, 1)
    s = _channel_vec("std", std, images.device).view(1, 3, 1, 1)
    if not isinstance(std, torch.Tensor) and np.any(np.asarray(std, dtype=np.float64) <= 0):
        raise ValueError(f"std must be positive, got {std!r}")
    z = (images.float() / 255.0 - m) / s
    return l2_of_normalized(z, patch)


def l2_of_normalized(z: torch.Tensor, patch: int) -> torch.Tensor:
    """sqrt(Σ z²) per patch of an already normalized float image [B,3,H,W]."""
    b, _, h, w = z.shape
    sq = _patches(z.float() * z.float(), patch).reshape(b, h // patch, w // patch, -1)
    return torch.sqrt(sq.sum(-1))


def _luma1000(images: torch.Tensor) -> torch.Tensor:
    """1000·Y = 299R + 587G + 114B as float32 [B, H, W] (exact for integer pixels)."""
    x = images.float()
    return 299.0 * x[:, 0] + 587.0 * x[:, 1] + 114.0 * x[:, 2]


def score_sobel(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean Sobel magnitude of the luma per patch (scipy.ndimage.sobel, mode='reflect')."""
    _check_images(images, patch)
    y = _luma1000(images)
    # 'reflect' in scipy.ndimage repeats the edge sample; with a one-pixel pad that is
    # exactly edge replication.
    yp = torch.nn.functional.pad(y.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    h, w = y.shape[1], y.shape[2]
    top, mid, bot = yp[:, 0:h], yp[:, 1:h + 1], yp[:, 2:h + 2]
    # same grouping as the Numba kernel (all terms exact integers in float32)
    gx = ((top[:, :, 2:] - top[:, :, :w]) + 2.0 * (mid[:, :, 2:] - mid[:, :, :w])
          + (bot[:, :, 2:] - bot[:, :, :w]))
    gy = ((bot[:, :, :w] + 2.0 * bot[:, :, 1:w + 1] + bot[:, :, 2:])
          - (top[:, :, :w] + 2.0 * top[:, :, 1:w + 1] + top[:, :, 2:]))
    mag = torch.sqrt(gx * gx + gy * gy)
    b = mag.shape[0]
    per = _patches(mag.unsqueeze(1), patch).reshape(b, h // patch, w // patch, -1)
    return per.sum(-1) * (1.0 / (1000.0 * patch * patch))


def clog_table(n: int, device=None) -> torch.Tensor:
    """float64 [n+1]: c·log2(c) for c = 0..n, computed with numpy exactly like the Numba side."""
    c = np.arange(n + 1, dtype=np.float64)
    tab = np.zeros(n + 1, np.float64)
    tab[1:] = c[1:] * np.log2(c[1:])
    return torch.from_numpy(tab).to(device)


def _int_luma(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        x = images.to(torch.int32)
    else:
        x = torch.round(images.float()).clamp(0.0, 255.0).to(torch.int32)
    return torch.div(299 * x[:, 0] + 587 * x[:, 1] + 114 * x[:, 2] + 500, 1000, rounding_mode="floor")


def score_entropy(images: torch.Tensor, patch: int, clog: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shannon entropy (bits) of each patch's 256-bin histogram of the integer luma.

    ``clog``: ``clog_table(patch*patch)`` already on the device (saves a host-to-device copy
    per call); must be that float64 table for the result to be exact."""
    _check_images(images, patch)
    yi = _int_luma(images)  # int32 [B, H, W] in 0..255
    b, h, w = yi.shape
    gh, gw = h // patch, w // patch
    m = b * gh * gw
    n = patch * patch
    bins = _patches(yi.unsqueeze(1), patch).reshape(m, n).to(torch.int64)
    offs = torch.arange(m, device=yi.device, dtype=torch.int64).unsqueeze(1) * 256
    hist = torch.zeros(m * 256, dtype=torch.int32, device=yi.device)
    hist.scatter_add_(0, (bins + offs).reshape(-1), torch.ones(m * n, dtype=torch.int32, device=yi.device))
    if clog is None:
        clog = clog_table(n, yi.device)
    terms = clog[hist.to(torch.int64)].reshape(m, 64, 4)
    # The Numba kernel sums lane j = bins j, j+4, j+8, ... sequentially in float64; do the same
    # (64 steps on [m, 4]) so the float64 result, and hence the float32 score, is identical.
    acc = terms[:, 0]
    for i in range(1, 64):
        acc = acc + terms[:, i]
    total = (acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])
    ent = torch.clamp(math.log2(n) - total / n, min=0.0)
    return ent.to(torch.float32).reshape(b, gh, gw)


def _channel_sums(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [B, Gh, Gw, 3] sums S_c and sums of squares Q_c over each patch."""
    x = images.to(torch.float64)
    b, _, h, w = x.shape
    p = _patches(x, patch).reshape(b, h // patch, w // patch, 3, patch * patch)
    return p.sum(-1), (p * p).sum(-1)


def _contrast_from_sums(s: torch.Tensor, q: torch.Tensor, patch: int) -> torch.Tensor:
    n = patch * patch
    tot = (n * q - s * s).sum(-1)  # n²·Σ_c var_c; exact for integer pixels
    return torch.sqrt(torch.clamp(tot, min=0.0) / (3.0 * n * n)) / 255.0  # float64 [B,Gh,Gw]


def score_contrast(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Pooled standard deviation of each patch's pixel values (per-channel means removed),
    in units of the 0..255 range: sqrt(mean_c var_c)/255; float32 [B, Gh, Gw]."""
    _check_images(images, patch)
    s, q = _channel_sums(images, patch)
    return _contrast_from_sums(s, q, patch).to(torch.float32)


def score_distinct(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Distance of each patch's (mean colour, contrast) from the image's mean colour and its
    patches' mean contrast, all in units of the 0..255 range; float32 [B, Gh, Gw]."""
    _check_images(images, patch)
    s, q = _channel_sums(images, patch)
    sigma = _contrast_from_sums(s, q, patch)
    b, gh, gw, _ = s.shape
    g = gh * gw
    n = patch * patch
    tc = s.sum(dim=(1, 2), keepdim=True)  # the image's channel totals (exact)
    d = (g * s - tc) / (255.0 * n * g)
    ms = sigma.sum(dim=(1, 2), keepdim=True) / g
    dt = sigma - ms
    return torch.sqrt((d * d).sum(-1) + dt * dt).to(torch.float32)


def score(images: torch.Tensor, patch: int, scorer: str, mean=IMAGENET_MEAN,
          std=IMAGENET_STD) -> torch.Tensor:
    """Dispatch by name; the torch counterpart of ``pipeline.saliency.score_patches`` with
    [B,3,H,W] input. ``mean``/``std`` only affect ``l2``."""
    if scorer == "l2":
        return score_l2(images, patch, mean, std)
    if scorer == "sobel":
        return score_sobel(images, patch)
    if scorer == "entropy":
        return score_entropy(images, patch)
    if scorer == "contrast":
        return score_contrast(images, patch)
    if scorer == "distinct":
        return score_distinct(images, patch)
    raise ValueError(f"unknown scorer {scorer!r}; valid scorers: {', '.join(SCORERS)}")


# ---------------------------------------------------------------------------------------------
# top-K

def keep_count(k_percent: int, n: int, round_to: Optional[int] = None, num_prefix: int = 1) -> int:
    """Patches kept: max(1, floor(K·n/100)); with ``round_to``, raised to the smallest count
    that makes num_prefix + count a multiple of round_to (capped at n)."""
    if isinstance(k_percent, bool) or not isinstance(k_percent, (int, np.integer)) \
            or not 1 <= int(k_percent) <= 100:
        raise ValueError(f"K must be an integer percentage in 1..100, got {k_percent!r}")
    k = k_count(int(k_percent), int(n))
    if round_to is not None:
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        s = num_prefix + k
        s = -(-s // round_to) * round_to
        k = min(int(n), s - num_prefix)
    return k


def topk_indices(scores: torch.Tensor, k_percent: int, round_to: Optional[int] = None,
                 num_prefix: int = 1) -> torch.Tensor:
    """Kept raster indices int64 [B, k], ascending, of scores [B,Gh,Gw] or [B,N].

    Rank by score descending, ties to the lower raster index (stable sort), NaN last."""
    if scores.ndim == 3:
        scores = scores.reshape(scores.shape[0], -1)
    elif scores.ndim != 2:
        raise ValueError(f"scores must have shape [B,Gh,Gw] or [B,N], got {tuple(scores.shape)}")
    n = int(scores.shape[1])
    k = keep_count(k_percent, n, round_to, num_prefix)
    s = scores if scores.is_floating_point() else scores.double()
    # -s maps NaN to NaN, which torch.sort puts last (like numpy's argsort).
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values.to(torch.int64)

