"""A small PASCAL-VOC-layout segmentation set from real photos (tests, the K-sweep demo).

VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
ImageSets/Segmentation/{train,val}.txt}, as `dynaprep index --data voc-seg` reads it.
Images are random crops of varied size and aspect of scikit-image's sample photos; the masks
are hand-made by a rule, not drawn: the photo's Otsu threshold (on a blurred grey crop)
splits it in two, the side holding the crop's centre is the photo's object class
(astronaut/camera: person, chelsea: cat, coffee: bottle, rocket: aeroplane), the other side
background, and a 1-pixel ring on the border between them is void (255), as VOC marks
object outlines. Masks are palette PNGs with VOC's colour map, like the real ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dynavit.pipeline.photo_data import MissingExtra

PHOTO_CLASS = {"astronaut": 15, "chelsea": 8, "coffee": 5, "rocket": 1, "camera": 15}


def voc_palette() -> list[int]:
    """The devkit's colour map (bitwise interleave of the index), 256 × RGB."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _photos() -> dict[str, np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise MissingExtra("the photo data sets need scikit-image: pip install scikit-image") from None
    out = {}
    for name in PHOTO_CLASS:
        a = np.asarray(getattr(skimage.data, name)())
        out[name] = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])
    return out


def rule_mask(rgb: np.ndarray, cls: int) -> np.ndarray:
    """The hand-made mask of one crop (see the module doc)."""
    from skimage.filters import threshold_otsu
    from scipy.ndimage import binary_dilation, binary_erosion

    grey = np.asarray(Image.fromarray(rgb).convert("L").filter(ImageFilter.GaussianBlur(2)), np.float64)
    above = grey > threshold_otsu(grey)
    h, w = above.shape
    fg = above if above[h // 2, w // 2] else ~above
    mask = np.where(fg, cls, 0).astype(np.uint8)
    ring = binary_dilation(fg) & ~binary_erosion(fg)
    mask[ring] = 255
    return mask


def voc_seg(root, n_train: int, n_val: int, seed: int = 0, side=(48, 160)) -> dict:
    """Write the set under ROOT/VOCdevkit/VOC2012; returns {"root", "voc", "ids"}."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos, names, pal = _photos(), list(PHOTO_CLASS), voc_palette()
    ids: dict[str, list[str]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids[split] = []
        for i in range(n):
            name = names[i % len(names)]
            src = photos[name]
            h, w = src.shape[:2]
            ch, cw = (int(min(v, rng.integers(*side) * v / 200)) for v in (h, w))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = Image.fromarray(src[y:y + ch, x:x + cw])
            crop = crop.resize((max(16, cw // 2), max(16, ch // 2)), Image.BILINEAR)
            rgb = np.asarray(crop)
            image_id = f"2007_{sum(map(len, ids.values())) + 1:06d}"
            crop.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=92)
            m = Image.fromarray(rule_mask(rgb, PHOTO_CLASS[name]), mode="P")
            m.putpalette(pal)
            m.save(voc / "SegmentationClass" / f"{image_id}.png")
            ids[split].append(image_id)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids[split]) + "\n")
    return {"root": Path(root), "voc": voc, "ids": ids}
