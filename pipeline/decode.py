"""Bytes or arrays -> the stored uint8 RGB image (H×W×3, H and W multiples of the patch).

Decisions:
- Transparency (RGBA, LA, PA, P/L/RGB with a transparency key) is composited on **white**:
  the colour stored under transparent pixels is arbitrary (often black or junk), and web
  images with alpha are mostly logos/cut-outs meant to be shown on a white page.
- 16-bit and 32-bit integer modes (I;16*, I) are scaled from 0..65535 to 0..255 with
  rounding (PIL's own convert clips them); float mode F is read as 0..1 if its maximum is
  at most 1, else 0..255.  CMYK, YCbCr, LAB, 1-bit, palette and L go through PIL's convert.
- EXIF orientation is applied (the stored image is the image as displayed); orig_width and
  orig_height are the displayed size of the full-resolution image.  Multi-frame files use
  their first frame.
- Decompression bombs: PIL's MAX_IMAGE_PIXELS limit; between 1× and 2× the limit PIL only
  warns, and that warning is treated as an error too.
- JPEGs much larger than needed are decoded with `draft` (DCT-domain 1/2, 1/4, 1/8 scaling)
  to at least twice the size the resize needs (DRAFT_MARGIN), then resized: the bicubic does
  the last ≥2× of the reduction, so the quality stays that of a full decode within 1-2 dB at
  a fraction of the work. The draft's exact scale maps the crop box (its last row and
  column may be partial pixels).
- center-crop (timm's eval transform): resize the short side to floor(S / crop_pct)
  (timm uses floor; the long side truncates like torchvision's Resize), bicubic with
  antialiasing, then crop S×S at the centre (torchvision's rounding).  Only the crop box is
  resampled (pipeline/resample.py: PIL's bicubic arithmetic in vectorised Numba kernels,
  4-5× faster than PIL's resize of the whole image); the pixels are those of PIL's
  resize-then-crop up to ±1 rounding (see RESAMPLER).  For a non-square
  target (H, W) the image is scaled to cover (floor(H/crop_pct), floor(W/crop_pct)) keeping
  its aspect ratio (timm would squash).  squash: resize straight to H×W.
- encode_image: JPEG with 4:4:4 chroma (subsampling=0) because images are stored at their
  final size, where 4:2:0 visibly smears colour edges across patch borders; PNG is lossless
  with fixed settings, so the same pixels give the same bytes.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["Decoded", "DecodeError", "load_image", "encode_image", "image_from_array",
           "target_size", "POLICIES", "RESAMPLER"]

POLICIES = ("center-crop", "squash")
# What the resize is, for dataset.json: JPEGs decoded with libjpeg DCT scaling (draft: 1/2,
# 1/4 or 1/8, never below the resize size), then PIL's antialiased bicubic (a = -0.5, its
# fixed-point rounding) of the crop box only, vertical pass first when it shrinks
# (pipeline/resample.py).
RESAMPLER = "jpeg-draft+pil-bicubic-aa-box"
# A JPEG is drafted only to at least DRAFT_MARGIN × the resize size (in each direction), so
# that the bicubic filter, not libjpeg's blockwise 1/2-1/8 DCT scaling, does most of the
# reduction. PSNR against a float64 Lanczos-3 of the full decode (profile_index --resize):
# margin 1 lost 2-7 dB on large synthetic and on real photos, falling below OpenCV
# INTER_AREA; margin 2 stays within ~1-2 dB of no draft at about half its time on large
# JPEGs, and above INTER_AREA.
DRAFT_MARGIN = 2.0
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeError(Exception):
    """One-line reason why an input cannot become an image."""


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray   # uint8, C-contiguous [H, W, 3]
    orig_width: int
    orig_height: int


def target_size(image_size, patch_size: int = 16) -> tuple[int, int]:
    """(H, W) from an int or (H, W); both must be positive multiples of patch_size."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"image_size {h}x{w} must be positive multiples of patch_size {patch_size}")
    return h, w


def _bomb_reason(exc: BaseException) -> str:
    # PIL's message gives only the pixel count; its check's frame still holds (W, H).
    tb = exc.__traceback__
    size = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_decompression_bomb_check":
            size = tb.tb_frame.f_locals.get("size")
        tb = tb.tb_next
    if size is not None:
        return f"decompression bomb: {size[0]}×{size[1]} exceeds PIL's limit"
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"decompression bomb: {m.group(1) if m else '?'} pixels exceed PIL's limit"


def _orientation(img: Image.Image) -> int:
    try:
        o = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1
    return o if o in _ORIENT else 1


def _resize_plan(w: int, h: int, out_h: int, out_w: int, policy: str, crop_pct: float):
    """Size to resize to, and the crop box inside it."""
    if policy == "squash":
        return (out_w, out_h), (0, 0, out_w, out_h)
    sh, sw = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if sh == sw:  # torchvision Resize(int): short side exact, long side truncated
        if w <= h:
            rw, rh = sw, int(sw * h / w)
        else:
            rw, rh = int(sh * w / h), sh
    else:
        scale = max(sh / h, sw / w)
        rw, rh = max(sw, round(w * scale)), max(sh, round(h * scale))
    top, left = int(round((rh - out_h) / 2.0)), int(round((rw - out_w) / 2.0))
    return (rw, rh), (left, top, left + out_w, top + out_h)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        if mode == "F":
            a = a.astype(np.float64)
            a = np.nan_to_num(a) * (255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0)
            g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a = np.clip(a.astype(np.int64), 0, 65535)
            g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(g), "L").convert("RGB")
    if mode == "P" or ("transparency" in img.info and mode in ("L", "RGB")):
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(data, image_size=224, policy: str = "center-crop", crop_pct: float = 0.875,
               patch_size: int = 16, keep_size: bool = False, hflip: bool = False) -> Decoded:
    """Decode (bytes) or take (uint8 array) an image and bring it to image_size.

    hflip mirrors the result left-right (the trainer's flip augmentation): done by PIL
    before the array exists, because stacking negatively-strided numpy views into a batch
    cost as much as decoding the JPEG.

    keep_size=True is for images that stay where they are (`wds`): one already image_size
    is kept as it is (a user who made 224×224 shards meant those pixels); any other size is
    resized like every image. dynaprep and the trainer make the same call, so the pixels
    scored are the pixels trained on."""
    out_h, out_w = target_size(image_size, patch_size)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")

    if isinstance(data, np.ndarray):
        img = image_from_array(data)
        (ow, oh), orientation, scale = img.size, 1, 1.0
    else:
        img, ow, oh, orientation, scale = _decode_bytes(data, out_h, out_w, policy, crop_pct, keep_size)
    if ow < patch_size or oh < patch_size:
        raise DecodeError(f"image too small: {ow}×{oh} < patch {patch_size}")

    if keep_size and (ow, oh) == (out_w, out_h):
        if orientation in _ORIENT:
            img = img.transpose(_ORIENT[orientation])
        if hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return Decoded(_to_array(img), ow, oh)
    rgb = _fit(_pixels(img), ow, oh, out_h, out_w, policy, crop_pct, hflip, orientation, scale)
    return Decoded(rgb, ow, oh)


def _pixels(img: Image.Image) -> np.ndarray:
    """The pixels of an RGB image as read-only uint32 [H, W] (R, G, B, pad bytes): PIL's own
    4-byte layout. Pillow >= 11.2 exports its buffer through Arrow without a copy (the
    buffer stays alive while the array does); images PIL holds in several blocks (> 16 MB)
    and older Pillow are copied row by row instead."""
    w, h = img.size
    if hasattr(img, "__arrow_c_array__"):
        try:
            import pyarrow as pa

            values = pa.array(img).buffers()[-1]
            if values is not None and values.size >= 4 * w * h:
                return np.frombuffer(values, np.uint32, count=w * h).reshape(h, w)
        except (ValueError, TypeError, pa.ArrowException):  # rows not contiguous: copy
            pass
    return np.frombuffer(img.tobytes("raw", "RGBX"), np.uint32).reshape(h, w)


def _fit(px: np.ndarray, ow: int, oh: int, out_h: int, out_w: int, policy: str, crop_pct: float,
         hflip: bool = False, orientation: int = 1, scale: float = 1.0) -> np.ndarray:
    """Resize and crop as _resize_plan says, for an image displayed ow×oh.

    px is the image as stored (before its EXIF orientation), `scale` pixels of px per
    stored full-resolution pixel (a JPEG draft: 1/2, 1/4, 1/8; its last row and column
    may be partial, so the scale is exact, never px's size over the stored size). The crop
    box is mapped to stored pixels and only it is resampled (pipeline/resample.py: PIL's
    bicubic arithmetic); the orientation and hflip are applied to the small result."""
    from dynavit.pipeline import resample  # numba: imported only where something is resized

    (rw, rh), (left, top, right, bottom) = _resize_plan(ow, oh, out_h, out_w, policy, crop_pct)
    # the crop box in displayed full-resolution pixels, then in px's pixels
    fx, fy = ow / rw, oh / rh
    box = _stored_box((left * fx, top * fy, right * fx, bottom * fy), ow, oh, orientation)
    box = tuple(v * scale for v in box)
    size = (right - left, bottom - top) if orientation < 5 else (bottom - top, right - left)
    flip = hflip and orientation not in _ORIENT
    if (box[2] - box[0], box[3] - box[1]) == size and all(float(v).is_integer() for v in box):
        rgb = resample.crop(px, box, flip)  # already at the resize size: nothing to resample
    else:
        rgb = resample.resize_box(px, box, size, flip)
    if orientation in _ORIENT:
        rgb = _orient_array(rgb, orientation)
        if hflip:
            rgb = rgb[:, ::-1]
        rgb = np.ascontiguousarray(rgb)
    return rgb


def _stored_box(box, ow: int, oh: int, orientation: int):
    """A box (l, t, r, b) of the displayed image (ow×oh) in the stored image's coordinates."""
    left, top, right, bottom = box
    sw, sh = (oh, ow) if orientation in (5, 6, 7, 8) else (ow, oh)
    if orientation == 2:
        return sw - right, top, sw - left, bottom
    if orientation == 3:
        return sw - right, sh - bottom, sw - left, sh - top
    if orientation == 4:
        return left, sh - bottom, right, sh - top
    if orientation == 5:
        return top, left, bottom, right
    if orientation == 6:
        return top, sh - right, bottom, sh - left
    if orientation == 7:
        return sw - bottom, sh - right, sw - top, sh - left
    if orientation == 8:
        return sw - bottom, left, sw - top, right
    return box


def _orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """What PIL's transpose for the EXIF orientation does, on an [H, W, 3] array (a view)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return a[::-1].transpose(1, 0, 2)
    if orientation == 7:
        return a[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return a[:, ::-1].transpose(1, 0, 2)
    return a


def _to_array(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _decode_bytes(data, out_h, out_w, policy, crop_pct, keep_size):
    """(image as stored, in RGB, displayed width, displayed height, EXIF orientation, draft
    scale): the orientation is not applied here (load_image applies it to the small result;
    keep_size to the image), and scale is 1/2, 1/4 or 1/8 when a JPEG was drafted, else 1."""
    if data is None or len(data) == 0:
        raise DecodeError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecodeError(_bomb_reason(e)) from None
        except UnidentifiedImageError:
            raise DecodeError("not an image: cannot identify image file") from None
        except Exception as e:  # malformed headers surface as many exception types
            raise DecodeError(f"not an image: {type(e).__name__}: {e}") from None

        # Only a JPEG is drafted, and only its EXIF can be read before the pixels (PNG's
        # getexif may load the image, and a load that fails there must not be swallowed).
        is_jpeg = img.format == "JPEG"
        orientation = _orientation(img) if is_jpeg else 1
        scale = 1.0
        sw, sh = img.size
        ow, oh = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)

        if is_jpeg and ow >= out_w and oh >= out_h:  # (an image kept at its size is never drafted)
            # Ask the decoder for at least the resized size (in stored orientation); draft
            # only scales by 1/2, 1/4, 1/8 while the result stays >= that size.
            (rw, rh), _ = _resize_plan(ow, oh, out_h, out_w, policy, crop_pct)
            need = (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh)
            need = (math.ceil(need[0] * DRAFT_MARGIN), math.ceil(need[1] * DRAFT_MARGIN))
            if sw >= 2 * need[0] and sh >= 2 * need[1]:
                drafted = img.draft("RGB", need)
                if drafted is not None:  # (mode, (0, 0, sw / s, sh / s)): s is the DCT scale
                    scale = drafted[1][2] / sw

        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecodeError(_bomb_reason(e)) from None
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DecodeError(f"truncated or corrupt image: {msg}") from None
        if not is_jpeg:
            orientation = _orientation(img)
            ow, oh = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)
    try:
        return _to_rgb(img), ow, oh, orientation, scale
    except Exception as e:
        raise DecodeError(f"cannot convert mode {img.mode} to RGB: {e}") from None


def image_from_array(arr: np.ndarray) -> Image.Image:
    """PIL RGB image from uint8 [h, w, 3] (or [h, w] grayscale) without copying twice."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise DecodeError(f"array must be uint8 [h, w, 3], got {a.dtype} {list(a.shape)}")
    img = Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB")
    return img.convert("RGB") if a.ndim == 2 else img


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode uint8 [H, W, 3]; no metadata is written, so bytes depend on pixels only."""
    img = image_from_array(rgb)
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, "JPEG", quality=int(quality), subsampling=0, optimize=False)
    elif fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"format must be jpg or png, got {fmt!r}")
    return buf.getvalue()


def decode_stored(data: bytes, size_hw: tuple[int, int], hflip: bool = False) -> np.ndarray:
    """Decode an image `encode_image` wrote: RGB, exactly `size_hw`, no metadata.

    The decoder side of encode_image, for the trainer's hot path: no EXIF, mode or resize
    handling (load_image does those for images dynaprep did not write), so that reading a
    stored image costs what PIL's decode costs. hflip mirrors it left-right inside PIL."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (size_hw[1], size_hw[0]):
                raise DecodeError(f"image is {img.size[0]}×{img.size[1]}, not the stored "
                                  f"{size_hw[1]}×{size_hw[0]}")
            if hflip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image: cannot identify image file") from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(f"truncated or corrupt image: {msg}") from None
