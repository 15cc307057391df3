"""Training augmentations that move no pixel, so the stored kept-patch indices stay valid:
the colour-only ops of TrivialAugment (wide), colour jitter, and random erasing inside the
kept patches.

Why no geometric ops (rotation, shear, translation, scale, RandomResizedCrop): they move
pixels between patches, so the stored top-K indices would name patches whose content is
no longer there. The geometric ops dynatrain has are the ones whose index map is exact:
flips (--hflip/--vflip) and the patch-aligned crop of --input-size (data.py).

Both run on the model's device on the whole batch, after the uint8 batch arrived there.
Every per-sample draw comes from (seed, epoch, sample key, purpose), as the loader's draws
do (patches._sample_bits): the same for any --workers count, rank layout or resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dynavit.trainer.batch import Batch, normalize
from dynavit.trainer.patches import _sample_bits
from dynavit.trainer.errors import ConfigError

_JITTER, _ERASE, _TRIVIAL = 5, 6, 8  # purposes beside patches.py's (1..4) and mixing.py's (7)

# TrivialAugmentWide's ops that move no pixel (Müller & Hutter 2021; torchvision's op table
# and 31 magnitude bins). Left out: ShearX/Y, TranslateX/Y, Rotate (they move content between
# patches) and Sharpness (a 3x3 filter: it blends pixels across patch borders).
TRIVIAL_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize", "color", "contrast", "brightness")
BINS = 31

ERASE_MODES = ("const", "pixel")
HELP = ("Colour augmentations (--trivial-color, --color-jitter, --reprob) move no pixel; geometric ops such as "
        "rotation, shear or random-resized crop would move content between patches and break the stored kept-patch "
        "indices, so they are not offered: flips and the patch-aligned --input-size crop are the geometric ops, with "
        "exact index maps.")


def parse_jitter(value) -> list[float] | None:
    """--color-jitter as timm takes it: one value for brightness, contrast and saturation, or
    3 (B,C,S) or 4 (B,C,S,H) comma-separated."""
    if value is None or value == "" or isinstance(value, (list, tuple)):
        return None if value in (None, "") else [float(v) for v in value]
    parts = [float(v) for v in str(value).split(",")]
    if len(parts) == 1:
        parts = parts * 3
    return parts


def check_augment(cfg) -> None:
    cj = cfg.color_jitter
    if cj is not None:
        ok = isinstance(cj, (list, tuple)) and len(cj) in (3, 4) and all(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in cj) and (len(cj) < 4 or cj[3] <= 0.5)
        if not ok:
            raise ConfigError(f"--color-jitter {cj}: give B, B,C,S or B,C,S,H (each >= 0, hue <= 0.5)",
                              "--color-jitter")
    if not (math.isfinite(cfg.reprob) and 0 <= cfg.reprob <= 1):
        raise ConfigError(f"--reprob {cfg.reprob} is out of range", "--reprob")
    if cfg.remode not in ERASE_MODES:
        raise ConfigError(f"--remode {cfg.remode!r}: choose from {', '.join(ERASE_MODES)}", "--remode")


@dataclass(frozen=True)
class Augment:
    seed: int
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    reprob: float = 0.0
    remode: str = "pixel"
    patch: int = 16
    trivial: bool = False  # TrivialAugmentWide's colour-only ops

    @classmethod
    def from_config(cls, cfg, patch: int) -> "Augment | None":
        jitter = None if cfg.color_jitter is None else tuple((list(cfg.color_jitter) + [0.0])[:4])
        if (jitter is None or not any(jitter)) and cfg.reprob == 0 and not cfg.trivial_color:
            return None
        return cls(int(cfg.seed), jitter if jitter and any(jitter) else None, float(cfg.reprob), cfg.remode, patch,
                   bool(cfg.trivial_color))


def train_inputs(batch: Batch, device, mean, std, aug: Augment | None, epoch: int):
    """(normalised images, keep_idx, labels) on `device`, augmented. Without augmentation
    the same arithmetic as runtime.to_device (bit-identical)."""
    images = batch.images.to(device, non_blocking=True)
    keep_idx = None if batch.keep_idx is None else batch.keep_idx.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    if aug is None:
        return normalize(images, mean, std), keep_idx, labels
    if aug.trivial:
        images = trivial_color(images, [trivial_draw(aug.seed, epoch, key) for key in batch.keys])
    x = images.to(torch.float32) / 255.0
    if aug.jitter is not None:
        x = color_jitter(x, jitter_factors(aug, batch.keys, epoch, device))
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    x = (x - m) / s
    if aug.reprob > 0:
        x = erase_kept(x, batch.keep_idx, erase_boxes(aug, batch.keys, epoch, x.shape[-2:]), aug)
    return x, keep_idx, labels


# --- TrivialAugment, colour ops only -------------------------------------------------------

def trivial_draw(seed: int, epoch: int, key: str) -> tuple[str, float]:
    """(op, magnitude) of one sample: an op uniformly, a bin uniformly, a random sign for the
    signed ops; magnitudes as torchvision's TrivialAugmentWide."""
    bits = _sample_bits(seed, epoch, key, _TRIVIAL)
    op, m, negative = TRIVIAL_OPS[bits % len(TRIVIAL_OPS)], (bits >> 8) % BINS, (bits >> 16) & 1
    # float32 tables as torchvision's, so that a threshold lands where its own would
    if op in ("color", "contrast", "brightness"):
        v = float(torch.linspace(0.0, 0.99, BINS)[m])
        return op, 1.0 - v if negative else 1.0 + v
    if op == "posterize":
        return op, float(8 - round(m / ((BINS - 1) / 6)))
    if op == "solarize":
        return op, 255.0 * float(torch.linspace(1.0, 0.0, BINS)[m])
    return op, 0.0


def trivial_color(images: torch.Tensor, draws: list[tuple[str, float]]) -> torch.Tensor:
    """uint8 [B,3,H,W]: each sample through its drawn op (torchvision's tensor ops)."""
    import torchvision.transforms.v2.functional as TF
    ops = {"identity": lambda x, v: x, "autocontrast": lambda x, v: TF.autocontrast(x),
           "equalize": lambda x, v: TF.equalize(x), "posterize": lambda x, v: TF.posterize(x, int(v)),
           "solarize": lambda x, v: TF.solarize(x, v), "color": TF.adjust_saturation,
           "contrast": TF.adjust_contrast, "brightness": TF.adjust_brightness}
    return torch.stack([ops[op](images[i], v) for i, (op, v) in enumerate(draws)])


# --- colour jitter --------------------------------------------------------------------------

def jitter_factors(aug: Augment, keys: list[str], epoch: int, device) -> torch.Tensor:
    """[B, 4]: brightness, contrast, saturation factors in [max(0, 1−v), 1+v] and a hue shift
    in [−h, h], as torchvision's ColorJitter draws them; 16 bits of the sample's hash each."""
    lo_hi = [(max(0.0, 1 - v), 1 + v) for v in aug.jitter[:3]] + [(-aug.jitter[3], aug.jitter[3])]
    rows = []
    for key in keys:
        bits = _sample_bits(aug.seed, epoch, key, _JITTER)
        u = [((bits >> (16 * i)) & 0xFFFF) / 65536.0 for i in range(4)]
        rows.append([lo + (hi - lo) * ui for (lo, hi), ui in zip(lo_hi, u)])
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # torchvision's weights


def color_jitter(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x: float [B,3,H,W] in [0,1]; f: [B,4] factors. torchvision's adjust_brightness,
    adjust_contrast, adjust_saturation and adjust_hue, in that fixed order, each sample with
    its own factors (a factor of 1 / hue 0 leaves the image as it is). Per pixel, plus the
    image's mean grey for contrast: no pixel moves."""
    b, c, s, h = (f[:, i].view(-1, 1, 1, 1) for i in range(4))
    x = (x * b).clamp(0, 1)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp(0, 1)
    x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)
    if bool((f[:, 3] != 0).any()):
        x = _hue_shift(x, f[:, 3])
    return x


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB → HSV, h ← (h + shift) mod 1, → RGB), batched with a
    shift per sample."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    sat = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    hue = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    # HSV → RGB as torchvision's _hsv2rgb
    i = torch.floor(hue * 6.0)
    fr = hue * 6.0 - i
    i = i.to(torch.int32) % 6
    v = maxc
    p = (v * (1.0 - sat)).clamp(0.0, 1.0)
    q = (v * (1.0 - sat * fr)).clamp(0.0, 1.0)
    t = (v * (1.0 - sat * (1.0 - fr))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a4 = torch.stack((a1, a2, a3), dim=1)  # [B, 3, 6, H, W]
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), a4)


# --- random erasing inside the kept patches -------------------------------------------------

def erase_boxes(aug: Augment, keys: list[str], epoch: int, hw) -> list[tuple[int, int, int, int, int] | None]:
    """Per sample: None, or (top, left, h, w, noise seed): timm's RandomErasing draw
    (probability --reprob, area 2 %–1/3 of the image, log-uniform aspect 0.3–3.3, up to 10
    tries) from the sample's own generator."""
    H, W = int(hw[0]), int(hw[1])
    out = []
    for key in keys:
        bits = _sample_bits(aug.seed, epoch, key, _ERASE)
        rng = np.random.default_rng(bits)
        box = None
        if rng.random() < aug.reprob:
            for _ in range(10):
                area = rng.uniform(0.02, 1 / 3) * H * W
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if 0 < h < H and 0 < w < W:
                    top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                    box = (top, left, h, w, int(rng.integers(0, 2**62)))
                    break
        out.append(box)
    return out


def kept_pixel_mask(keep_idx: torch.Tensor | None, hw, patch: int, device) -> torch.Tensor | None:
    """bool [B,1,H,W]: the pixels of each sample's kept patches (None = all, dense)."""
    if keep_idx is None:
        return None
    gh, gw = int(hw[0]) // patch, int(hw[1]) // patch
    grid = torch.zeros(keep_idx.shape[0], gh * gw, dtype=torch.bool, device=device)
    grid.scatter_(1, keep_idx.to(device), True)
    grid = grid.view(-1, 1, gh, gw)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def erase_kept(x: torch.Tensor, keep_idx, boxes, aug: Augment) -> torch.Tensor:
    """Erase each drawn box (in normalised space: 0 = the dataset mean for `const`, N(0,1)
    noise per pixel for `pixel`, as timm) but only its pixels inside kept patches: the box is
    drawn over the whole image as timm draws it; pixels of dropped patches are left as they
    are (the model never sees them)."""
    if not any(b is not None for b in boxes):
        return x
    x = x.clone()
    keep = kept_pixel_mask(keep_idx, x.shape[-2:], aug.patch, x.device)
    for i, box in enumerate(boxes):
        if box is None:
            continue
        top, left, h, w, noise_seed = box
        region = x[i, :, top:top + h, left:left + w]
        if aug.remode == "pixel":
            gen = torch.Generator().manual_seed(noise_seed)
            fill = torch.randn((x.shape[1], h, w), generator=gen).to(x.device, x.dtype)
        else:
            fill = torch.zeros_like(region)
        if keep is not None:
            fill = torch.where(keep[i, :, top:top + h, left:left + w], fill, region)
        x[i, :, top:top + h, left:left + w] = fill
    return x


__all__ = ["Augment", "ERASE_MODES", "HELP", "TRIVIAL_OPS", "trivial_color", "trivial_draw", "check_augment", "color_jitter", "erase_boxes", "erase_kept",
           "jitter_factors", "kept_pixel_mask", "parse_jitter", "train_inputs"]
