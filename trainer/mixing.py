"""Mixup and CutMix that know about pruning (timm's --mixup/--cutmix/--mixup-prob/
--mixup-switch-prob, batch mode: sample i is mixed with sample B−1−i, one λ per batch).

CutMix pastes a *patch-aligned* box of image B into image A (timm's rand_bbox, on the patch
grid). The mixed image's kept set is re-selected to exactly K from the two images' stored
scores: scores.npy of B inside the box, of A outside it, top-K as dynaprep ranks (ties to
the lower raster index). The label weight of A is its share of the *kept* tokens (kept
patches outside the box / K), not of the pixels: that is what the model sees.

Mixup blends the pixels, x = λ·A + (1−λ)·B, and keeps the top-K of the blended scores
λ·s_A + (1−λ)·s_B. That is a choice: a patch's score is not linear in its pixels (the l2
score is a distance from the normalised mean), so the blended scores approximate the score
of the blended patch; they rank the patches salient in either image first, weighted as the
pixels are. The label weight is λ.

Dense runs (K = 100) keep every token: CutMix's weight is then the box's share of the grid.
Re-selection needs scores: with --select random/center mixing is refused.

Every draw (apply or not, which op, λ, box) comes from the batch's first sample key, epoch
and seed: the same for any --workers count and on resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dynavit.pipeline.topk import select_topk

from dynavit.trainer.patches import _sample_bits
from dynavit.trainer.errors import ConfigError

_MIX = 7  # purpose beside patches.py's (1..4) and augment.py's (5, 6)


def check_mixing(cfg) -> None:
    for name, value, ok in (("--mixup", cfg.mixup, cfg.mixup >= 0), ("--cutmix", cfg.cutmix, cfg.cutmix >= 0),
                            ("--mixup-prob", cfg.mixup_prob, 0 <= cfg.mixup_prob <= 1),
                            ("--mixup-switch-prob", cfg.mixup_switch_prob, 0 <= cfg.mixup_switch_prob <= 1)):
        if not (math.isfinite(value) and ok):
            raise ConfigError(f"{name} {value} is out of range", name)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.select not in ("saliency", "dense") and cfg.k not in (None, 100):
        raise ConfigError(f"--mixup/--cutmix re-select the kept patches from the stored scores; --select "
                          f"{cfg.select} has none (use saliency, or dense)", "--select")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.method != "dynavit":
        raise ConfigError("--mixup/--cutmix are offered for --method dynavit only", "--method")


def cutmix_box(grid: tuple[int, int], lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox on the patch grid: (top, bottom, left, right) in patches, a box of
    side ratio √(1−λ) centred at a uniform cell, clipped to the grid."""
    gh, gw = grid
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(gh * ratio), int(gw * ratio)
    cy, cx = int(rng.integers(0, gh)), int(rng.integers(0, gw))
    return (int(np.clip(cy - cut_h // 2, 0, gh)), int(np.clip(cy + cut_h // 2, 0, gh)),
            int(np.clip(cx - cut_w // 2, 0, gw)), int(np.clip(cx + cut_w // 2, 0, gw)))


def cutmix_keep(scores_a: np.ndarray, scores_b: np.ndarray, box, k_percent: int) -> tuple[np.ndarray, float]:
    """(kept indices ascending, A's share of them) of A with B's box pasted in."""
    top, bottom, left, right = box
    mixed = scores_a.copy()
    mixed[top:bottom, left:right] = scores_b[top:bottom, left:right]
    keep = select_topk(mixed[None], k_percent)[0].astype(np.int64)
    r, c = np.divmod(keep, scores_a.shape[1])
    in_box = (r >= top) & (r < bottom) & (c >= left) & (c < right)
    return keep, float(1.0 - in_box.mean())


@dataclass(frozen=True)
class Mixer:
    seed: int
    num_classes: int
    patch: int
    k_percent: int | None  # None: dense
    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @classmethod
    def from_config(cls, cfg, num_classes: int, patch: int, k_percent: int | None) -> "Mixer | None":
        if cfg.mixup <= 0 and cfg.cutmix <= 0:
            return None
        return cls(int(cfg.seed), num_classes, patch, k_percent, float(cfg.mixup), float(cfg.cutmix),
                   float(cfg.mixup_prob), float(cfg.mixup_switch_prob))

    def draw(self, keys: list[str], epoch: int) -> tuple[str | None, float, np.random.Generator]:
        """(None | 'mixup' | 'cutmix', λ, the generator for the box) of one batch."""
        rng = np.random.default_rng(_sample_bits(self.seed, epoch, keys[0], _MIX))
        if rng.random() >= self.prob:
            return None, 1.0, rng
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        return ("cutmix" if use_cutmix else "mixup"), float(rng.beta(alpha, alpha)), rng

    def __call__(self, x: torch.Tensor, keep_idx: torch.Tensor | None, labels: torch.Tensor,
                 scores: torch.Tensor | None, keys: list[str], epoch: int):
        """(images, keep_idx, soft targets [B, C]) of one normalised batch on its device."""
        op, lam, rng = self.draw(keys, epoch)
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).to(x.dtype)
        if op is None:
            return x, keep_idx, onehot
        partner = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
        sel = None if keep_idx is None else scores.numpy()
        if op == "mixup":
            x = lam * x + (1 - lam) * x[partner]
            if sel is not None:
                blended = lam * sel + (1 - lam) * sel[::-1]
                keep_idx = torch.from_numpy(select_topk(blended, self.k_percent).astype(np.int64)).to(x.device)
            weight = torch.full((x.shape[0],), lam, dtype=x.dtype, device=x.device)
        else:
            gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
            top, bottom, left, right = box = cutmix_box((gh, gw), lam, rng)
            p = self.patch
            x = x.clone()
            x[:, :, top * p:bottom * p, left * p:right * p] = x[partner][:, :, top * p:bottom * p, left * p:right * p]
            if sel is None:  # dense: every token kept, the box's share of the grid
                share = 1.0 - (bottom - top) * (right - left) / (gh * gw)
                weight = torch.full((x.shape[0],), share, dtype=x.dtype, device=x.device)
            else:
                pairs = [cutmix_keep(sel[i], sel[len(sel) - 1 - i], box, self.k_percent) for i in range(len(sel))]
                keep_idx = torch.from_numpy(np.stack([k for k, _ in pairs])).to(x.device)
                weight = torch.tensor([w for _, w in pairs], dtype=x.dtype, device=x.device)
        weight = weight.view(-1, 1)
        return x, keep_idx, weight * onehot + (1 - weight) * onehot[partner]


__all__ = ["Mixer", "check_mixing", "cutmix_box", "cutmix_keep"]
