"""`demo`: a small labelled dataset generated on the fly (no download), for `make demo`.

Five classes of simple shapes (disc, square, triangle, cross, ring) in random colours,
positions and scales, drawn on cluttered, low-contrast textured backgrounds.  The object
covers roughly 4-20 % of the image, so most patches are background and token pruning has
something to prune.  Sample i of a split is generated from SeedSequence((seed, split id, i))
alone, so any unit can be produced independently, in any process, with identical pixels.
Labels cycle through the classes (i mod 5), so every shard is balanced.  Each class has its
own jittered palette colour besides its shape: a ViT trained from scratch for a few CPU epochs
learns colour within the object's patches long before shape, and that is enough for the demo
to show what pruning does (keep the object's patches and accuracy stays; lose them and it drops).

Options: n_train (600), n_val (200), seed (0), image_size (224, or (H, W)).
`src` is ignored.  Data: uint8 [H, W, 3]; source: "demo:<split>:<i>".
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .base import RawSample, Source, make_key

CLASSES = ("disc", "square", "triangle", "cross", "ring")
PALETTE = np.array([(220, 40, 40), (40, 200, 60), (40, 80, 230), (235, 215, 30), (200, 50, 210)], np.float64)
_SPLIT_IDS = {"train": 0, "val": 1}


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w) float32 luminance offset; colour is added per channel by the caller (2-D
    work per channel is several times faster than broadcasting over a last axis of 3)."""
    # blocky low-frequency clutter: a coarse random grid upsampled by repetition
    cell = int(rng.choice([8, 16, 28]))
    coarse = rng.normal(0, 10, size=(-(-h // cell), -(-w // cell))).astype(np.float32)
    field = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:h, :w]
    # a faint oriented grating plus fine grain, so no background patch is perfectly flat
    yy, xx = _grid(h, w)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
    field = field + np.float32(6) * np.sin(np.float32(freq) * (np.float32(np.cos(theta)) * xx
                                                              + np.float32(np.sin(theta)) * yy))
    field += rng.standard_normal(size=(h, w), dtype=np.float32) * np.float32(4)
    return field


def _mask(label: int, yy, xx, cy, cx, r, angle) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)  # python floats keep the arrays float32
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if label == 0:  # disc
        return dx * dx + dy * dy <= r * r
    if label == 1:  # square
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if label == 2:  # triangle (upward in the rotated frame)
        return (v <= r * 0.6) & (v >= 1.7 * np.abs(u) - r)
    if label == 3:  # cross
        arm = r * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    d2 = dx * dx + dy * dy  # ring
    return (d2 <= r * r) & (d2 >= (0.6 * r) ** 2)


def render(seed: int, split_id: int, index: int, size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The image and label of sample `index` of a split; pure function of its arguments."""
    h, w = size
    rng = np.random.default_rng(np.random.SeedSequence((seed, split_id, index)))
    label = index % len(CLASSES)
    base = rng.uniform(70, 185, size=3)
    field = _background(rng, h, w)
    r = rng.uniform(0.12, 0.25) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    # every shape fits in a circle of radius 1.25 r: draw inside its bounding box only
    y0, y1 = max(0, int(cy - 1.25 * r)), min(h, int(cy + 1.25 * r) + 2)
    x0, x1 = max(0, int(cx - 1.25 * r)), min(w, int(cx + 1.25 * r) + 2)
    yy, xx = _grid(h, w)
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = _mask(label, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], float(cy), float(cx),
                            float(r), float(rng.uniform(0, 2 * np.pi)))
    # Saturated palette colours sit far from the greyish backgrounds (base 70..185 per channel).
    colour = np.clip(PALETTE[label] + rng.uniform(-25, 25, size=3), 0, 255)
    speckle = rng.standard_normal(size=int(m.sum()), dtype=np.float32) * np.float32(3)
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        ch = field + np.float32(base[c])
        ch[m] = np.float32(colour[c]) + speckle
        np.clip(ch, 0, 255, out=ch)
        out[..., c] = ch
    return out, label


MAX_SAMPLES = 10_000_000


def _int_option(name: str, value, low: int, high: int) -> int:
    """A -o option that must be an integer in [low, high]; the error names the option."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = None
        if as_float is None or not as_float.is_integer():
            raise ValueError(f"demo: -o {name}={value!r} is not an integer")
        value = int(as_float)
    if not low <= value <= high:
        raise ValueError(f"demo: -o {name}={value} is outside {low}..{high}")
    return value


class DemoSource(Source):
    name = "demo"

    def __init__(self, src: str | None = None, n_train: int = 600, n_val: int = 200,
                 seed: int = 0, image_size: int | tuple[int, int] = 224):
        self.counts = {"train": _int_option("n_train", n_train, 0, MAX_SAMPLES),
                       "val": _int_option("n_val", n_val, 0, MAX_SAMPLES)}
        if not any(self.counts.values()):
            raise ValueError("demo: -o n_train and -o n_val are both 0: nothing to index")
        self.seed = _int_option("seed", seed, 0, 2 ** 63 - 1)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        h, w = _int_option("image_size", h, 16, 8192), _int_option("image_size", w, 16, 8192)
        self.size = (int(h), int(w))

    def splits(self) -> list[str]:
        return [s for s in ("train", "val") if self.counts[s] > 0]

    def classes(self) -> list[str]:
        return list(CLASSES)

    def entries(self, split: str):
        self._check_split(split)
        return range(self.counts[split])

    def read_entry(self, split, ordinal, index) -> RawSample:
        img, label = render(self.seed, _SPLIT_IDS[split], index, self.size)
        return RawSample(make_key(ordinal), f"demo:{split}:{index}", label, CLASSES[label], img)
