"""`voc-seg`: PASCAL VOC semantic segmentation (VOC2012's SegmentationClass layout).

SRC is `VOCdevkit/VOC2012`, `VOCdevkit`, or the folder holding `VOCdevkit`; it needs
JPEGImages/<id>.jpg, SegmentationClass/<id>.png and ImageSets/Segmentation/{train,val}.txt.

Decisions:
- Classes: VOC's 21 (index 0 background, 1..20 as in the devkit), the mask's palette index.
  255 is void (object borders, difficult regions): kept in the mask, ignored by training
  and by the mIoU.
- The image-level label (the manifest's `label`, for tools that need one) is the
  foreground class with the most pixels in the mask (ties: the lower index), background if
  the mask has no foreground.
- The mask's bytes travel with the sample (RawSample.mask); dynaprep checks and fits them to
  the image's geometry (pipeline/seg_mask.py) and writes KEY.mask.png into the image shard.
  A missing or unreadable mask makes the sample a failed input, as a broken image does.
"""
from __future__ import annotations

import os

import numpy as np


from .base import RawSample, Source, SourceError, make_key, read_bytes, require_dir
from .voc import find_voc_root, read_image_ids

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
           "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor")
_SPLITS = ("train", "val")


def image_label(mask: np.ndarray) -> int:
    """The foreground class covering the most pixels (0 when none)."""
    counts = np.bincount(mask.ravel(), minlength=256)[1:len(CLASSES)]
    return 0 if counts.max() == 0 else int(counts.argmax()) + 1


class VocSegSource(Source):
    name = "voc-seg"

    def __init__(self, src: str):
        self.src = require_dir(src, self.name)
        self.root = find_voc_root(self.src, self.name, ("JPEGImages", "SegmentationClass"))
        self._sets = os.path.join(self.root, "ImageSets", "Segmentation")
        self._splits = [s for s in _SPLITS if os.path.isfile(os.path.join(self._sets, f"{s}.txt"))]
        if not self._splits:
            raise SourceError(f"voc-seg: no train.txt or val.txt in {self._sets}")

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(CLASSES)

    def _list(self, split: str):
        return read_image_ids(self._sets, split, self.name)

    def read_entry(self, split, ordinal, image_id) -> RawSample:
        from dynavit.pipeline.decode import DecodeError
        from dynavit.pipeline.seg_mask import read_mask

        path = os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")
        source = os.path.relpath(path, self.src).replace(os.sep, "/")
        key = make_key(ordinal)
        mask_bytes, err = read_bytes(os.path.join(self.root, "SegmentationClass", f"{image_id}.png"))
        if err is not None:
            return RawSample(key, source, None, None, None, f"mask: {err}")
        try:
            label = image_label(read_mask(mask_bytes, len(CLASSES)))
        except DecodeError as e:
            return RawSample(key, source, None, None, None, str(e))
        data, err = read_bytes(path)
        return RawSample(key, source, label, CLASSES[label], data, err, mask=mask_bytes)
