"""The masks of a `voc-seg` dataset, by sample: the KEY.mask.png member dynaprep writes into
the image shard beside the image (pipeline/seg_mask.py reads it; docs/FORMAT.md)."""
from __future__ import annotations

import os

import numpy as np

from dynavit.pipeline.seg_mask import MaskMemberError, decode_mask, read_mask_member

__all__ = ["MaskError", "MaskReader"]


class MaskError(Exception):
    pass


class MaskReader:
    """``read(i, size_hw)``: the uint8 [H, W] mask of sample i of a ``SampleTable``."""

    def __init__(self, table):
        self.table = table
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, i: int, size_hw) -> np.ndarray:
        t = self.table
        path, key = t.shards[int(t.shard[i])].images, t.keys[i]
        try:
            data = read_mask_member(self._fd(path), int(t.offset[i]), int(t.size[i]), key, path)
            return decode_mask(data, size_hw)
        except MaskMemberError as e:
            raise MaskError(str(e)) from None
        except Exception as e:
            raise MaskError(f"{path}: sample {key}: {e}") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
