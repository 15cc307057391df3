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
  to at least the size the resize needs, then resized: same quality, far less work.
- center-crop (timm's eval transform): resize the short side to floor(S / crop_pct)
  (timm uses floor; the long side truncates like torchvision's Resize), bicubic with
  antialiasing, then crop S×S at the centre (torchvision's rounding).  For a non-square
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
           "target_size", "POLICIES"]

POLICIES = ("center-crop", "squash")
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

    keep_size=True is for images that stay where they are (`wds`): nothing is resized or
    cropped, and an image that is not already image_size is a DecodeError, because its
    patch grid would not match the one the scores are stored for."""
    out_h, out_w = target_size(image_size, patch_size)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")

    if isinstance(data, np.ndarray):
        img = image_from_array(data)
        ow, oh = img.size
    else:
        img, ow, oh = _decode_bytes(data, out_h, out_w, policy, crop_pct, keep_size)
    if ow < patch_size or oh < patch_size:
        raise DecodeError(f"image too small: {ow}×{oh} < patch {patch_size}")

    if keep_size:
        if img.size != (out_w, out_h):
            raise DecodeError(f"image is {ow}×{oh}, not {out_w}×{out_h} (images indexed in place"
                              " are not resized)")
        if hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return Decoded(np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), ow, oh)
    (rw, rh), box = _resize_plan(ow, oh, out_h, out_w, policy, crop_pct)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    if box != (0, 0, rw, rh):
        img = img.crop(box)
    if hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rgb = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    return Decoded(rgb, ow, oh)


def _decode_bytes(data, out_h, out_w, policy, crop_pct, keep_size) -> tuple[Image.Image, int, int]:
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
        sw, sh = img.size
        ow, oh = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)

        if is_jpeg and not keep_size and ow >= out_w and oh >= out_h:
            # Ask the decoder for at least the resized size (in stored orientation); draft
            # only scales by 1/2, 1/4, 1/8 while the result stays >= that size.
            (rw, rh), _ = _resize_plan(ow, oh, out_h, out_w, policy, crop_pct)
            need = (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh)
            if sw >= 2 * need[0] and sh >= 2 * need[1]:
                img.draft("RGB", need)

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
    method = _ORIENT.get(orientation)
    if method is not None:
        img = img.transpose(method)
    try:
        return _to_rgb(img), ow, oh
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
