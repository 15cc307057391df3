"""The segmentation head: a 1×1 convolution (a linear map per position) of the dense patch
features to class logits, upsampled bilinearly to the image's pixels (the linear probe of
dense ViT features, e.g. DINOv2's linear segmentation head, without its BatchNorm)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SegHead"]


class SegHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.conv = nn.Conv2d(self.dim, self.num_classes, kernel_size=1)

    def forward(self, grid: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """grid [B, Gh, Gw, D] → logits [B, C, H, W]."""
        x = self.conv(grid.permute(0, 3, 1, 2))
        return F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)
