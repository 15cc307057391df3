"""Real-photo data sets for scorer tests and benchmarks (needs scikit-image / scikit-learn).

- `grey_objects`: crops of scikit-image's sample photos, their luma squeezed into mid-grey
  (80..176), pasted at a random place on a flat dark (0..12) or white (243..255) ground with
  margins: the case where l2 (the energy of the normalised patch) prefers the flat ground to
  the object. Class = which photo the crop is from.
- `photo_crops`: colour crops of scikit-image's sample photos, class = photo (`make compare-demo`).
- `digits`: scikit-learn's 8×8 digit scans (white strokes on black), upsampled.

All are written as an ImageFolder (ROOT/{train,val}/<class>/*.png), deterministic per seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("camera", "coins", "moon", "astronaut", "chelsea", "coffee", "rocket", "brick", "gravel", "clock")


class MissingExtra(RuntimeError):
    """scikit-image / scikit-learn is not installed."""


def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise MissingExtra("the photo data sets need scikit-image: pip install scikit-image") from None
    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 3:
        a = (a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    return a.astype(np.float64)


def grey_objects(root, n_train: int, n_val: int, size: int = 64, classes=PHOTOS[:4], seed: int = 0,
                 object_frac=(0.45, 0.7)) -> dict:
    """Write the mid-grey-objects set; returns {"root", "classes", "ground": {path: 'dark'|'white'}}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = {c: _photo(c) for c in classes}
    grounds = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = classes[i % len(classes)]
            src = photos[c]
            h, w = src.shape
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            obj_side = int(round(size * rng.uniform(*object_frac)))
            crop = Image.fromarray(np.clip(src[y:y + side, x:x + side], 0, 255).astype(np.uint8))
            crop = np.asarray(crop.resize((obj_side, obj_side), Image.BILINEAR), np.float64)
            grey = np.rint(80 + crop * (96 / 255)).astype(np.uint8)  # mid-grey: 80..176
            dark = bool(rng.integers(0, 2))
            ground = int(rng.integers(0, 13)) if dark else int(rng.integers(243, 256))
            img = np.full((size, size), ground, np.uint8)
            oy, ox = (int(rng.integers(0, size - obj_side + 1)) for _ in range(2))
            img[oy:oy + obj_side, ox:ox + obj_side] = grey
            path = root / split / c / f"{c}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(img[..., None], 3, axis=2)).save(path)
            grounds[str(path)] = "dark" if dark else "white"
    return {"root": root, "classes": sorted(classes), "ground": grounds}


def digits(root, size: int = 32, n_val: int = 360, seed: int = 0, resample: str = "nearest") -> dict:
    """scikit-learn's 1797 digits (8×8, 0..16) as white-on-black PNGs upsampled to `size`
    (resample "nearest": every size/8-px block is one scanned pixel; "bilinear": smooth)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingExtra("the digits data set needs scikit-learn: pip install scikit-learn") from None
    root = Path(root)
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    val = set(order[:n_val].tolist())
    for i, (im, t) in enumerate(zip(d.images, d.target)):
        a = np.rint(im * (255 / 16)).astype(np.uint8)
        path = root / ("val" if i in val else "train") / str(t) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).resize((size, size), {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}[resample]).convert("RGB").save(path)
    return {"root": root, "classes": [str(c) for c in range(10)]}


def letterboxed(root, n_train: int, n_val: int, size: int = 64, bar: int = 16, classes=PHOTOS[3:7],
                seed: int = 0) -> dict:
    """scikit-image colour photos shrunk to size×(size − 2·bar) and letterboxed to size×size
    with centred constant bars (white or black, top+bottom or left+right), as img2dataset's
    border mode or a scanner leaves them. Returns {"root", "bars": {path: (axis, colour)}}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    try:
        import skimage.data
    except ImportError:
        raise MissingExtra("the photo data sets need scikit-image: pip install scikit-image") from None
    photos = {c: np.asarray(getattr(skimage.data, c)()) for c in classes}
    bars = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = classes[i % len(classes)]
            src = photos[c]
            if src.ndim == 2:
                src = np.repeat(src[..., None], 3, axis=2)
            src = src[..., :3]
            h, w = src.shape[:2]
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(np.ascontiguousarray(src[y:y + side, x:x + side]))
            colour = 255 if rng.integers(0, 2) else 0
            img = np.full((size, size, 3), colour, np.uint8)
            axis = int(rng.integers(0, 2))  # 0: bars top and bottom, 1: left and right
            if axis == 0:
                img[bar:size - bar] = np.asarray(crop.resize((size, size - 2 * bar), Image.BILINEAR))
            else:
                img[:, bar:size - bar] = np.asarray(crop.resize((size - 2 * bar, size), Image.BILINEAR))
            path = root / split / c / f"{c}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            bars[str(path)] = (axis, colour)
    return {"root": root, "bars": bars}


def photo_crops(root, n_train: int, n_val: int, size: int = 128, classes=PHOTOS, seed: int = 0,
                crop_frac=(0.2, 0.5)) -> dict:
    """`make compare-demo`'s real-photo set: random square crops (side crop_frac of the photo's
    short side, so no two images are the same view) of scikit-image's sample photos, resized to
    size×size, grey photos as RGB, mirrored at random; class = which photo. Class-sorted
    ImageFolder ROOT/{train,val}/<photo>/*.png, round-robin over the classes, deterministic per seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    try:
        import skimage.data
    except ImportError:
        raise MissingExtra("the photo data sets need scikit-image: pip install scikit-image") from None
    photos = {}
    for c in classes:
        a = np.asarray(getattr(skimage.data, c)())
        photos[c] = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = classes[i % len(classes)]
            src = photos[c]
            h, w = src.shape[:2]
            side = int(round(min(h, w) * rng.uniform(*crop_frac)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            img = Image.fromarray(src[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            if rng.integers(0, 2):
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            path = root / split / c / f"{c}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            counts[(split, c)] = counts.get((split, c), 0) + 1
    return {"root": root, "classes": sorted(classes), "counts": counts}
