"""What the loader hands the training loop: a Batch of uint8 images, kept-patch indices and
labels (normalised on the device by `normalize`), and DataError, raised for a dataset that
cannot be read as asked."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class DataError(Exception):
    """The dataset cannot be read as asked; the message names the file (and key) at fault."""


# --- batches -------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B,3,H,W], not normalised (that happens on the device)
    keep_idx: torch.Tensor | None  # int64 [B,k], ascending raster indices; None = dense
    labels: torch.Tensor  # int64 [B]; -1 for unlabeled samples
    keys: list[str]
    skipped: int = 0  # bad samples of this batch left out (with skip_bad_samples)
    scores: torch.Tensor | None = None  # float32 [B,Gh,Gw] of the shown window (with_scores: Mixup/CutMix)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        # DataLoader's pin-memory thread calls this on objects that define it.
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, f) -> "Batch":
        keep = None if self.keep_idx is None else f(self.keep_idx)
        scores = None if self.scores is None else f(self.scores)
        return dataclasses.replace(self, images=f(self.images), keep_idx=keep, labels=f(self.labels), scores=scores)


def normalize(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(x/255 − mean)/std in float32 on the images' device; works on [B,3,H,W] and [3,H,W]."""
    device = images_uint8.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - m) / s
