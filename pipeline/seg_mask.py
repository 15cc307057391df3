"""Segmentation masks (`--data voc-seg`): read a class-index PNG, bring it to the image's
final geometry with nearest neighbour, store it as a PNG member beside the image.

A mask follows its image through exactly the same resize plan (decode._resize_plan: the
resize size and the crop box of --resize/--crop-pct), with nearest neighbour so that every
stored value is one the annotator wrote (class indices must not be blended). VOC's masks are
palette PNGs whose palette index is the class (0 background, 1..20 the classes) and 255 the
"void" border that evaluation ignores.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from dynavit.pipeline.decode import DecodeError, _resize_plan, target_size

__all__ = ["IGNORE", "read_mask", "fit_mask", "encode_mask", "decode_mask", "MASK_EXT", "MaskMemberError",
           "read_mask_member", "has_masks"]

IGNORE = 255           # VOC's void label: not scored, not trained on
MASK_EXT = "mask.png"  # the member KEY.mask.png of the image shard (docs/FORMAT.md)
BLOCK = 512
MAX_MEMBERS = 8        # image, .cls, the mask, room for a few more


class MaskMemberError(Exception):
    """No mask member where the sample's members are (one line)."""


def has_masks(info) -> bool:
    """Whether a dataset's image shards carry KEY.mask.png members."""
    return info.dataset == "voc-seg"


def read_mask(data: bytes, num_classes: int) -> np.ndarray:
    """uint8 [H, W] class indices of a palette ('P') or greyscale ('L') PNG; values must be
    < num_classes or IGNORE. Raises DecodeError (one line) otherwise."""
    if not data:
        raise DecodeError("mask: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(data)))
            if img.format != "PNG":
                raise DecodeError(f"mask: {img.format} file, expected a PNG")
            if img.mode not in ("P", "L"):
                raise DecodeError(f"mask: mode {img.mode}, expected a palette (P) or greyscale (L) PNG "
                                  "of class indices")
            img.load()
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DecodeError("mask: decompression bomb") from None
        except Exception as e:
            raise DecodeError(f"mask: not a readable PNG ({type(e).__name__})") from None
    arr = np.asarray(img, dtype=np.uint8).copy()
    bad = (arr >= num_classes) & (arr != IGNORE)
    if bad.any():
        raise DecodeError(f"mask: value {int(arr[bad][0])} is neither a class (0..{num_classes - 1}) "
                          f"nor {IGNORE}")
    return arr


def fit_mask(mask: np.ndarray, image_size, policy: str, crop_pct: float, patch_size: int,
             orig_wh: tuple[int, int]) -> np.ndarray:
    """The mask under the image's resize plan (nearest neighbour). ``orig_wh``: the image's
    displayed size, which the mask must have."""
    h, w = mask.shape
    if (w, h) != tuple(orig_wh):
        raise DecodeError(f"mask: {w}×{h} but the image is {orig_wh[0]}×{orig_wh[1]}")
    out_h, out_w = target_size(image_size, patch_size)
    (rw, rh), box = _resize_plan(w, h, out_h, out_w, policy, crop_pct)
    img = Image.fromarray(mask, mode="L")
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.NEAREST)
    return np.ascontiguousarray(np.asarray(img.crop(box), dtype=np.uint8))


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes, size_hw: tuple[int, int]) -> np.ndarray:
    """A stored mask member back to uint8 [H, W]; it must have the dataset's image size."""
    try:
        arr = np.asarray(Image.open(io.BytesIO(bytes(data))), dtype=np.uint8)
    except Exception as e:
        raise DecodeError(f"stored mask: not a readable PNG ({type(e).__name__})") from None
    if arr.shape != tuple(size_hw):
        raise DecodeError(f"stored mask: {arr.shape} but images are {tuple(size_hw)}")
    return arr


def read_mask_member(fd: int, offset: int, size: int, key: str, where: str = "") -> bytes:
    """The bytes of KEY.mask.png, found by walking the USTAR headers that follow the sample's
    image member (data at ``offset``, ``size`` bytes): our image tar writes a sample's
    members together. Every header on the way must name the same key: a foreign or shifted
    member is a one-line MaskMemberError, never a wrong mask."""
    from dynavit.manifests.tar import header_name

    pos = offset + -(-size // BLOCK) * BLOCK
    for _ in range(MAX_MEMBERS):
        header = os.pread(fd, BLOCK, pos)
        if len(header) < BLOCK or not header.strip(b"\0"):
            break
        name = header_name(header)
        n = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        if not name.startswith(f"{key}."):
            break
        if name == f"{key}.{MASK_EXT}":
            return os.pread(fd, n, pos + BLOCK)
        pos += BLOCK + -(-n // BLOCK) * BLOCK
    raise MaskMemberError(f"{where or 'image shard'}: sample {key} has no {MASK_EXT} member "
                          f"(index the dataset with --data voc-seg)")
