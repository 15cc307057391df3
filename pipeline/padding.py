"""Padding-aware scoring: letterbox borders are not content.

What is detected: the rectangle of an image that holds the photo, when the rest is a
constant-colour letterbox border. Why: img2dataset's default `resize_mode="border"` (the
usual way WebDatasets such as LAION/CC subsets are built) shrinks each download so that
its long side is S (default 256) and pads it to S×S with white, centred; other tools
letterbox the same way. The scorers rank a flat white patch far from the dataset mean as
highly salient (l2: 66 % of the K=25 patches of such a dataset were padding), so top-K
spends the budget on nothing. With padding awareness (`--pad-aware`, the default for
`--data wds`),
padding patches rank below every content patch: top-K never keeps padding while a content
patch is left out, and only when the photo has fewer patches than K needs do padding patches
fill the rest (lowest raster index first). `--no-pad-aware` keeps the paper's plain
definitions: every patch is scored and ranked alike.

Two sources of the content box, in the stored image's pixels:
- `content_box_from_meta`: img2dataset's KEY.json (original_width/original_height, and
  width/height of the stored image) and its border geometry, transcribed from img2dataset
  1.47.0 (resizer.py, albumentations 1.x): scale = S / max(w, h); content = (max(1,
  round(w·scale)), max(1, round(h·scale))) with Python's round; padding before =
  int((S − n) / 2), the odd pixel after (bottom/right). The json does not record the
  resize mode, and "center_crop" output has the same sizes with no border, so when the
  pixels are given the predicted border strips must really be constant.
- `detect_constant_border`: generic; rows/columns at the edges that are (nearly) one
  colour, tolerant of JPEG ringing and chroma bleed, and by default only in pairs of the
  same colour on opposite sides (letterboxing is centred), so that a photo's own flat sky
  is not taken for padding. A constant image has no border (its box is the full image).

`map_box` carries a box through the resize + centre crop that `decode.load_image` applies,
`padding_patches` turns the final box into a patch mask, `mask_scores` applies the mask.
"""
from __future__ import annotations

import numpy as np

from dynavit.pipeline.decode import _resize_plan, target_size

__all__ = ["DETECTOR", "img2dataset_border_box", "content_box_from_meta", "detect_constant_border",
           "content_box", "map_box", "padding_patches", "padding_masks", "mask_scores"]

Box = tuple  # (x0, y0, x1, y1), x1/y1 exclusive

TOL, FRAC, FLAT, MIN_OVERLAP = 12, 0.98, 2.0, 1.0
# What the defaults do, for a dataset's provenance (dataset.json "padding"): JSON values only.
DETECTOR = {
    "name": "constant-border", "version": 1,
    "meta": "img2dataset 1.47.0 border geometry from KEY.json, checked against the pixels",
    "tol": TOL, "frac": FRAC, "flat": FLAT, "require_opposite": True,
    "min_overlap_px": MIN_OVERLAP, "fill": "-inf",
}


def _as_int(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def img2dataset_border_box(orig_w: int, orig_h: int, size: int) -> Box:
    """Where img2dataset's border mode puts a orig_w×orig_h image inside the size×size one."""
    scale = size / max(orig_h, orig_w)
    cw, ch = max(1, round(orig_w * scale)), max(1, round(orig_h * scale))
    left = int((size - cw) / 2.0) if cw < size else 0
    top = int((size - ch) / 2.0) if ch < size else 0
    return left, top, left + min(cw, size), top + min(ch, size)


def _gray3(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3] or [H, W], got {a.dtype} {list(a.shape)}")
    return a


def _strip_constant(strip: np.ndarray, tol: int, frac: float):
    """(is constant, colour) of a [h, w, C] strip."""
    px = strip.reshape(-1, strip.shape[-1]).astype(np.int16)
    c = np.median(px, axis=0)
    ok = (np.abs(px - c).max(axis=1) <= tol).mean() >= frac
    return bool(ok), c


def content_box_from_meta(meta, stored_w: int, stored_h: int, rgb=None, tol: int = TOL,
                          frac: float = 0.9, guard: int = 3):
    """The content box img2dataset's json implies for its stored image, or None.

    None when the json does not say: not a dict, sizes missing or not integers, status
    other than success, json sizes not the stored image's, a non-square stored image (border
    mode always makes S×S), or no border (the content fills the image). With `rgb` (the
    stored image, uint8 [H, W, 3]) the predicted border strips must also be constant (`frac`
    of their pixels within `tol` of one colour, the same colour on every side, ignoring the
    `guard` lines next to the content where JPEG rings; borders no wider than that are not
    checked): otherwise None, e.g. for resize_mode "center_crop", whose json sizes look the
    same."""
    if not isinstance(meta, dict):
        return None
    if meta.get("status", "success") not in ("success", None):
        return None
    ow, oh = _as_int(meta.get("original_width")), _as_int(meta.get("original_height"))
    w, h = _as_int(meta.get("width")), _as_int(meta.get("height"))
    if None in (ow, oh, w, h) or min(ow, oh, w, h) <= 0:
        return None
    if (w, h) != (int(stored_w), int(stored_h)) or w != h:
        return None
    box = img2dataset_border_box(ow, oh, w)
    if box == (0, 0, w, h):
        return None
    if rgb is not None:
        a = _gray3(rgb)
        if a.shape[:2] != (h, w):
            return None
        x0, y0, x1, y1 = box
        strips = []  # a border no wider than `guard` is all ringing: not checked
        if y0 > guard:
            strips.append(a[:y0 - guard])
        if h - y1 > guard:
            strips.append(a[y1 + guard:])
        if x0 > guard:
            strips.append(a[:, :x0 - guard])
        if w - x1 > guard:
            strips.append(a[:, x1 + guard:])
        colours = []
        for s in strips:
            ok, c = _strip_constant(s, tol, frac)
            if not ok:
                return None
            colours.append(c)
        if any(np.abs(c - colours[0]).max() > tol for c in colours):
            return None
    return box


def _edge_run(lines: np.ndarray, tol: int, frac: float, flat: float, block: int = 16):
    """lines [L, M, C] from the edge inwards: (count of leading constant lines, colour).

    Cheap on the common case: an image without a border is rejected on its outermost line,
    and a border is followed in blocks of lines, stopping at the first block that ends it
    (scoring every line of every image cost ~20 ms per image, ~5× a JPEG decode)."""
    first = lines[0].astype(np.int16)
    c = np.median(first, axis=0)
    if np.median(np.abs(first - c).max(axis=1)) > flat:  # the outermost line must be truly flat
        return 0, c
    ci = c.astype(np.int16)
    for start in range(0, len(lines), block):
        dev = np.abs(lines[start:start + block].astype(np.int16) - ci).max(axis=2)
        bad = np.flatnonzero((dev <= tol).mean(axis=1) < frac)
        if bad.size:
            return start + int(bad[0]), c
    return len(lines), c


def detect_constant_border(rgb, tol: int = TOL, frac: float = FRAC, flat: float = FLAT,
                           require_opposite: bool = True) -> Box:
    """Content box (x0, y0, x1, y1) of an image inside constant-colour edge rows/columns.

    The outermost line must be flat: median deviation from its median colour at most
    `flat` (white padding after JPEG q95 measures <= 2 beyond the two lines next to the
    content; flat-looking photo content such as dark fabric: 3 or more). Lines are then
    eaten inwards while `frac` of their pixels are within `tol` (max over channels) of
    that colour, which lets the JPEG ringing next to the content through (the box comes
    out at most ~2 px larger than the true one, never smaller, on img2dataset output). With `require_opposite` (centred letterboxing, as img2dataset and most
    tools pad) a border counts only when the opposite edge has one of the same colour and
    a width within max(4 px, 25 %) of it, else both are dropped. The full image is returned
    when there is no border, and when the borders would leave no content (a constant or
    two-colour image)."""
    a = _gray3(rgb)
    h, w = a.shape[:2]
    full = (0, 0, w, h)
    if h == 0 or w == 0:
        return full
    t, ct = _edge_run(a, tol, frac, flat)
    b, cb = _edge_run(a[::-1], tol, frac, flat)
    at = a.transpose(1, 0, 2)
    le, cl = _edge_run(at, tol, frac, flat)
    r, cr = _edge_run(at[::-1], tol, frac, flat)
    if t + b >= h or le + r >= w:
        return full
    if require_opposite:
        if not _paired(t, b, ct, cb, tol):
            t = b = 0
        if not _paired(le, r, cl, cr, tol):
            le = r = 0
    return le, t, w - r, h - b


def _paired(n1: int, n2: int, c1, c2, tol: int) -> bool:
    return (n1 > 0 and n2 > 0 and float(np.abs(c1 - c2).max()) <= tol
            and abs(n1 - n2) <= max(4, 0.25 * max(n1, n2)))


def content_box(rgb, meta=None, **detect_kw) -> Box:
    """The stored image's content box: from img2dataset's json when it says (checked
    against the pixels), else `detect_constant_border`."""
    a = _gray3(rgb)
    h, w = a.shape[:2]
    box = content_box_from_meta(meta, w, h, rgb=a) if meta is not None else None
    return box if box is not None else detect_constant_border(a, **detect_kw)


def map_box(box, src_w: int, src_h: int, image_size=224, policy: str = "center-crop",
            crop_pct: float = 0.875, keep_size: bool = False):
    """A box in a src_w×src_h image -> float box in the image `load_image` makes of it.

    Follows `decode._resize_plan` (resize to (rw, rh), crop) and clips to the output; None
    stays None. load_image's JPEG draft decodes by 1/2..1/8 before that resize when the
    file is at least twice the size needed: the same geometry to within a pixel."""
    if box is None:
        return None
    out_h, out_w = target_size(image_size, 1)
    x0, y0, x1, y1 = (float(v) for v in box)
    if keep_size:
        left = top = 0
        sx = sy = 1.0
    else:
        (rw, rh), (left, top, _, _) = _resize_plan(int(src_w), int(src_h), out_h, out_w,
                                                   policy, crop_pct)
        sx, sy = rw / src_w, rh / src_h

    def clip(v, hi):
        return min(max(v, 0.0), float(hi))
    return (clip(x0 * sx - left, out_w), clip(y0 * sy - top, out_h),
            clip(x1 * sx - left, out_w), clip(y1 * sy - top, out_h))


def padding_patches(box_final, image_size, patch: int,
                    min_overlap: float = MIN_OVERLAP) -> np.ndarray:
    """bool [Gh, Gw]: True for patches whose overlap with the content box is less than
    `min_overlap` pixels wide or high (no content, or a sliver of resampling blur). None
    (no box) masks nothing."""
    h, w = target_size(image_size, patch)
    gh, gw = h // patch, w // patch
    if box_final is None:
        return np.zeros((gh, gw), bool)
    x0, y0, x1, y1 = (float(v) for v in box_final)
    edges_x = np.arange(gw + 1, dtype=np.float64) * patch
    edges_y = np.arange(gh + 1, dtype=np.float64) * patch
    ov_x = np.minimum(x1, edges_x[1:]) - np.maximum(x0, edges_x[:-1])
    ov_y = np.minimum(y1, edges_y[1:]) - np.maximum(y0, edges_y[:-1])
    return (ov_y[:, None] < min_overlap) | (ov_x[None, :] < min_overlap)


def padding_masks(boxes_final, image_size, patch: int,
                  min_overlap: float = MIN_OVERLAP) -> np.ndarray:
    """bool [B, Gh, Gw] for a batch of final boxes (None entries mask nothing)."""
    h, w = target_size(image_size, patch)
    if len(boxes_final) == 0:
        return np.zeros((0, h // patch, w // patch), bool)
    return np.stack([padding_patches(b, (h, w), patch, min_overlap) for b in boxes_final])


def mask_scores(scores, pad_mask, fill: str = "-inf") -> np.ndarray:
    """float32 copy of scores [B, Gh, Gw] with padding patches ranked below every real one.

    fill "-inf": padding scores become -inf; "finite": m − max(1, |m|) with m the image's
    lowest real score (for consumers that need finite numbers). Either way `topk`'s stable
    ranking keeps every real patch first and, among padding, the lowest raster index first
    (a NaN real score still ranks below padding, as topk ranks NaN last). An image whose
    patches are all padding is left as it is. pad_mask: bool [B, Gh, Gw] or [Gh, Gw]."""
    s = np.array(scores, dtype=np.float32, copy=True)
    if s.ndim != 3:
        raise ValueError(f"scores must have shape [B,Gh,Gw], got {s.shape}")
    m = np.asarray(pad_mask, dtype=bool)
    if m.shape == s.shape[1:]:
        m = np.broadcast_to(m, s.shape)
    if m.shape != s.shape:
        raise ValueError(f"pad_mask shape {m.shape} does not match scores {s.shape}")
    if fill not in ("-inf", "finite"):
        raise ValueError(f"fill must be '-inf' or 'finite', got {fill!r}")
    for i in range(s.shape[0]):
        mi = m[i]
        if not mi.any() or mi.all():
            continue
        if fill == "-inf":
            s[i][mi] = -np.inf
        else:
            real = s[i][~mi]
            real = real[np.isfinite(real)]
            lo = float(real.min()) if real.size else 0.0
            v = np.float32(lo - max(1.0, abs(lo)))
            if not v < np.float32(lo):  # pragma: no cover - float32 guard
                v = np.float32(-np.inf)
            s[i][mi] = v
    return s
