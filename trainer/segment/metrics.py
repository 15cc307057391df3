"""Segmentation metrics: a confusion matrix over labelled pixels, per-class IoU and mIoU.

IoU_c = TP_c / (TP_c + FP_c + FN_c) from the confusion matrix (rows: true class, columns:
predicted); pixels labelled IGNORE (VOC's 255 void) are not counted. mIoU is the mean over
the classes whose union is not empty (a class neither present nor predicted has no IoU and
is left out, as VOC's devkit and mmseg do).
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE = 255

__all__ = ["IGNORE", "confusion", "iou_per_class", "mean_iou"]


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [C, C] counts of (true, predicted) over pixels whose target is a class."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = (target != IGNORE) & (target >= 0) & (target < num_classes)
    idx = target[valid] * num_classes + pred[valid].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(conf) -> np.ndarray:
    """float64 [C]: IoU per class, NaN where the class is neither present nor predicted."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf) -> float:
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
