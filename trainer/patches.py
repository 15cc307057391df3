"""Per-sample pure functions of the loader: kept-patch index arithmetic under flips, the
centre selection, and the seeded per-sample draws (keyed by the sample, never by its
position, so the draws do not depend on workers, ranks or resume)."""
from __future__ import annotations

import functools
import hashlib

import numpy as np


# Independent per-sample random streams (the `purpose` of _sample_bits), so that e.g. enabling crops does not change flips.
_CROP, _SELECT, _FLIP, _VFLIP = 1, 2, 3, 4


# --- index arithmetic (pure functions) -----------------------------------------------------

def hflip_indices(indices: np.ndarray, grid_w: int) -> np.ndarray:
    """Raster indices of the same patches after a horizontal flip: r·Gw + c → r·Gw + (Gw−1−c),
    re-sorted so the kept set stays in raster order."""
    idx = np.asarray(indices, dtype=np.int64)
    r, c = np.divmod(idx, grid_w)
    return np.sort(r * grid_w + (grid_w - 1 - c), axis=-1)


def vflip_indices(indices: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Raster indices of the same patches after a vertical flip: r·Gw + c → (Gh−1−r)·Gw + c,
    re-sorted so the kept set stays in raster order."""
    idx = np.asarray(indices, dtype=np.int64)
    r, c = np.divmod(idx, grid_w)
    return np.sort((grid_h - 1 - r) * grid_w + c, axis=-1)


def draw(bits: int, p: float) -> bool:
    """True with probability `p` for uniform 64-bit `bits`: bits ≥ 2⁶⁴·(1−p), in integers.
    At p = 0.5 this is the top bit, the draw every flip was before --hflip existed, so the
    default keeps every earlier run's flips."""
    return p > 0 and bits >= (1 << 64) - int(p * 2.0 ** 64)


@functools.lru_cache(maxsize=64)
def center_indices(grid: tuple[int, int], kept: int) -> np.ndarray:
    """The `kept` patches nearest the grid centre (squared Euclidean distance between patch
    centres, ties to the lower raster index), ascending."""
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    d2 = (2 * r - (gh - 1)) ** 2 + (2 * c - (gw - 1)) ** 2  # doubled coordinates: exact integers
    out = np.sort(np.argsort(d2, kind="stable")[:kept]).astype(np.int64)
    out.flags.writeable = False  # shared by every sample
    return out


def _sample_bits(seed: int, epoch: int, key: str, purpose: int) -> int:
    """64 random bits of one sample's draw. Keyed by the sample, not by its position: a
    sample gets the same draws whatever the number of workers or ranks. A hash, not a
    Generator: constructing numpy's Generator per sample cost ~0.1 ms."""
    text = f"{seed}/{epoch}/{purpose}/{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _sample_rng(seed: int, epoch: int, key: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng(_sample_bits(seed, epoch, key, purpose))
