"""Online adaptive K: the rules of trainer/adaptive_k.py on scores computed on the device.

``adaptive_keep(scores [B,Gh,Gw], rule)`` → (keep_idx [B, kmax] ascending, padded with
0, counts [B]); ``packed_forward`` runs them. The ranking
is the one of pipeline/topk.py (score descending, ties to the lower raster index: a stable
sort), the count the fewest top patches whose mass reaches τ of the image's total, clipped
to the rule's floor and ceiling; a flat image (total 0) keeps the floor.

A budget rule needs its τ*, calibrated on a data set (``calibrate_budget``) and recorded by
the run; an uncalibrated one is refused here.
"""
from __future__ import annotations

import torch

from dynavit.trainer.adaptive_k import KRule, bounds, kept_summary  # noqa: F401 (evaluate's record of a rule)

__all__ = ["adaptive_keep", "adaptive_counts", "kept_summary"]


def _ranked(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.reshape(scores.shape[0], -1)
    if s.is_floating_point() and s.dtype != torch.float64 and s.device.type != "mps":
        s = s.double()  # the mass sums are made in float64, as the NumPy twin does
    vals, order = torch.sort(s, dim=1, descending=True, stable=True)
    return vals, order


def adaptive_counts(scores: torch.Tensor, rule: KRule) -> torch.Tensor:
    """int64 [B]: patches each image keeps under `rule` (its τ known)."""
    if rule.tau is None:
        raise ValueError(f"k-rule {rule.text}: a budget rule needs the τ* its run calibrated")
    vals, _ = _ranked(scores)
    return _counts(vals, rule)


def _counts(vals: torch.Tensor, rule: KRule) -> torch.Tensor:
    n = vals.shape[1]
    lo, hi = bounds(rule, n)
    cum = vals.cumsum(dim=1)
    total = cum[:, -1:]
    frac = torch.where(total > 0, cum / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(cum))
    k = (frac < rule.tau).sum(dim=1) + 1
    k = torch.where(total[:, 0] > 0, k.clamp(max=n), torch.full_like(k, lo))
    return k.clamp(lo, hi).long()


def adaptive_keep(scores: torch.Tensor, rule: KRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_idx int64 [B, kmax], counts [B]): row b's first counts[b] entries are its kept
    raster indices, ascending; the rest are padding (ignored by packed_forward)."""
    if rule.tau is None:
        raise ValueError(f"k-rule {rule.text}: a budget rule needs the τ* its run calibrated")
    vals, order = _ranked(scores)
    counts = _counts(vals, rule)
    kmax = int(counts.max())
    n = order.shape[1]
    top = order[:, :kmax]
    cols = torch.arange(kmax, device=top.device)[None]
    # Sort only the kept part ascending: padding columns become n (after every real index).
    top = torch.where(cols < counts[:, None], top, torch.full_like(top, n))
    keep = torch.sort(top, dim=1).values
    return torch.where(keep == n, torch.zeros_like(keep), keep), counts
