"""The resize of load_image (pipeline/resample.py): PIL's bicubic arithmetic bit for bit,
_resize_plan's geometry, deterministic, and as close to an ideal float64 resize as the
PIL resize-then-crop it replaced. No timings here: `python -m dynavit.pipeline.bench.profile
--resize` measures speed against OpenCV."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dynavit.pipeline import decode, resample
from dynavit.pipeline.decode import _resize_plan, load_image
from dynavit.pipeline.bench.profile import psnr, reference_resize

from fixtures_data import jpeg_bytes


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth colour fields, hard-edged shapes, fine texture and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 80 * np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90) - c)
                    for c in range(3)], -1)
    for _ in range(6):  # hard edges: rectangles and discs
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(min(w, h) // 12, min(w, h) // 4)
        disc = (xx - x0) ** 2 + (yy - y0) ** 2 < r * r
        img[disc] = rng.integers(0, 256, 3)
        img[y0:y0 + r, x0:x0 + 2 * r] = rng.integers(0, 256, 3)
    img += (25 * np.sin(xx / 2.3) * np.sin(yy / 3.1))[..., None]  # fine texture: aliases if filtered badly
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _before(data: bytes, size=224, policy="center-crop", crop_pct=0.875) -> np.ndarray:
    """The previous release's resize: draft to >= the resize size, PIL BICUBIC of the whole
    (drafted) image, then crop."""
    keep, decode.DRAFT_MARGIN = decode.DRAFT_MARGIN, 1.0
    try:
        img, ow, oh, orientation, _ = decode._decode_bytes(data, size, size, policy, crop_pct, False)
    finally:
        decode.DRAFT_MARGIN = keep
    if orientation in decode._ORIENT:
        img = img.transpose(decode._ORIENT[orientation])
    (rw, rh), box = _resize_plan(ow, oh, size, size, policy, crop_pct)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return np.asarray(img.crop(box))


def _pil_full(data: bytes, size=224, crop_pct=0.875) -> np.ndarray:
    """No draft: PIL's full decode, EXIF orientation, BICUBIC of the whole image, centre crop."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    (rw, rh), box = _resize_plan(*img.size, size, size, "center-crop", crop_pct)
    return np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC).crop(box))


def _rotated_jpeg(w: int, h: int, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(_photo(w, h, seed=3), quality=92, exif=exif.tobytes())


CASES = {  # name -> JPEG bytes
    "downscale 1600x1200": jpeg_bytes(_photo(1600, 1200, seed=1), quality=92),
    "upscale 150x120": jpeg_bytes(_photo(150, 120, seed=2), quality=92),
    "exif-rotated 900x600 (o=6)": _rotated_jpeg(900, 600),
    "500x375": jpeg_bytes(_photo(500, 375, seed=4), quality=90),
    "tall 300x900": jpeg_bytes(_photo(300, 900, seed=5), quality=90),
}


def _two_step_pil(img: Image.Image, box, size, order: str) -> np.ndarray:
    """PIL's resize with box as two single-axis PIL resizes in a given order: PIL's pixels for
    that order on every Pillow version (Pillow >= 13 may pick the order itself)."""
    (x0, y0, x1, y1), (ow, oh), (w, h) = box, size, img.size
    if order == "h":
        tmp = img.resize((ow, h), Image.Resampling.BICUBIC, box=(x0, 0, x1, h))
        return np.asarray(tmp.resize((ow, oh), Image.Resampling.BICUBIC, box=(0, y0, ow, y1)))
    tmp = img.resize((w, oh), Image.Resampling.BICUBIC, box=(0, y0, w, y1))
    return np.asarray(tmp.resize((ow, oh), Image.Resampling.BICUBIC, box=(x0, 0, x1, oh)))


def test_resample_is_pil_bicubic_bit_for_bit():
    rng = np.random.default_rng(0)
    for t in range(120):
        w, h = (int(v) for v in rng.integers(8, 400, 2))
        arr = rng.integers(0, 256, (h, w, 3), np.uint8) if t % 2 else _photo(w, h, seed=t)
        img = Image.fromarray(arr)
        px = decode._pixels(img)
        ow, oh = (int(v) for v in rng.integers(1, 300, 2))
        x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        x1, y1 = rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h)
        box = (0, 0, w, h) if t % 5 == 0 else (x0, y0, x1, y1)
        for order in ("h", "v"):
            want = _two_step_pil(img, box, (ow, oh), order)
            got = resample.resize_box(px, box, (ow, oh), order=order)
            assert np.array_equal(got, want), (w, h, ow, oh, box, order)
            flipped = resample.resize_box(px, box, (ow, oh), flip=True, order=order)
            assert np.array_equal(flipped, want[:, ::-1]), (w, h, ow, oh, box, order)
        auto = "v" if box[3] - box[1] > oh and (h, box[1], box[3]) != (oh, 0, h) else None
        if auto == "v":  # the rows read always exceed out_h when the box is taller than it
            assert np.array_equal(resample.resize_box(px, box, (ow, oh)), _two_step_pil(img, box, (ow, oh), "v"))


def test_box_resize_equals_resize_then_crop():
    """Resampling only the crop box gives the whole-image resize's pixels (up to the float32
    box coordinates PIL uses: a rare ±1)."""
    arr = _photo(500, 375, seed=7)
    img = Image.fromarray(arr)
    (rw, rh), box = _resize_plan(500, 375, 224, 224, "center-crop", 0.875)
    whole = _two_step_pil(img, (0, 0, 500, 375), (rw, rh), "h")
    want = whole[box[1]:box[3], box[0]:box[2]]
    l, t, r, b = box
    got = resample.resize_box(decode._pixels(img), (l * 500 / rw, t * 375 / rh, r * 500 / rw, b * 375 / rh),
                              (224, 224), order="h")
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_matches_resize_plan(name):
    data = CASES[name]
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    ow, oh = (h, w) if rotated else (w, h)
    for size, policy, crop_pct in [(224, "center-crop", 0.875), ((160, 224), "center-crop", 0.875),
                                   (224, "center-crop", 1.0), (224, "squash", 0.875), (96, "center-crop", 0.9)]:
        d = load_image(data, size, policy, crop_pct)
        out_h, out_w = (size, size) if isinstance(size, int) else size
        (rw, rh), (l, t, r, b) = _resize_plan(ow, oh, out_h, out_w, policy, crop_pct)
        assert (r - l, b - t) == (out_w, out_h)
        assert d.rgb.shape == (out_h, out_w, 3) and d.rgb.dtype == np.uint8 and d.rgb.flags["C_CONTIGUOUS"]
        assert (d.orig_width, d.orig_height) == (ow, oh)
        # the content is where the plan puts it: PIL's resize-then-crop of the full decode
        if policy == "center-crop" and isinstance(size, int) and size == 224 and crop_pct == 0.875:
            assert np.abs(d.rgb.astype(int) - _pil_full(data)).mean() < 0.6


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_and_flip(name):
    data = CASES[name]
    a, b = load_image(data, 224), load_image(bytes(bytearray(data)), 224)
    assert np.array_equal(a.rgb, b.rgb)
    f = load_image(data, 224, hflip=True)
    assert np.array_equal(f.rgb, a.rgb[:, ::-1]) and f.rgb.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("name", ["downscale 1600x1200", "upscale 150x120", "exif-rotated 900x600 (o=6)",
                                  "500x375", "tall 300x900"])
def test_quality_vs_float_reference(name):
    """PSNR against a float64 Lanczos-3 resize of the full-resolution decode: not below what
    the previous PIL resize-then-crop reached (0.3 dB slack), and above a floor that path met."""
    data = CASES[name]
    ref = reference_resize(data)
    ours, before = psnr(load_image(data, 224).rgb, ref), psnr(_before(data), ref)
    assert ours >= before - 0.3, (ours, before)
    assert ours >= 30.0 and before >= 30.0, (ours, before)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_same_pixels_as_pre_rotated(orientation):
    """The resize runs on the stored image and the orientation is applied to the result:
    the same picture as resizing the image PIL rotated first (±1 rounding)."""
    stored = _photo(700, 460, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(stored, quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:  # PIL does not apply the EXIF orientation itself
        decoded = im.convert("RGB")
    shown = np.asarray(decoded.transpose(decode._ORIENT[orientation]) if orientation in decode._ORIENT
                       else decoded)
    assert np.array_equal(decode._orient_array(np.asarray(decoded), orientation), shown)
    for hflip in (False, True):
        got = load_image(data, (160, 224), hflip=hflip).rgb
        want = load_image(shown, (160, 224), hflip=hflip).rgb
        assert got.shape == want.shape == (160, 224, 3) and got.flags["C_CONTIGUOUS"]
        assert np.abs(got.astype(int) - want).max() <= 8 and np.abs(got.astype(int) - want).mean() < 0.3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_box_maps_display_boxes(orientation):
    """Cropping the stored image at _stored_box, then orienting, is cropping the displayed one."""
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (37, 53, 3), np.uint8)
    shown = decode._orient_array(stored, orientation)
    oh, ow = shown.shape[:2]
    for _ in range(20):
        left, right = sorted(rng.choice(ow + 1, 2, replace=False))
        top, bottom = sorted(rng.choice(oh + 1, 2, replace=False))
        x0, y0, x1, y1 = (int(v) for v in decode._stored_box((left, top, right, bottom), ow, oh, orientation))
        assert np.array_equal(decode._orient_array(stored[y0:y1, x0:x1], orientation),
                              shown[top:bottom, left:right])


def test_draft_maps_partial_pixels_exactly(monkeypatch):
    """2203×1653 drafted by 1/2 is 1102×827 pixels, but the image covers 1101.5×826.5 of them:
    mapping the crop box with the draft's exact scale keeps the drafted result on the full
    decode's (the old whole-image resize stretched the partial last row and column: ~41 dB)."""
    data = jpeg_bytes(_photo(2203, 1653, seed=11), quality=92)
    drafted = load_image(data, 224).rgb
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full = load_image(data, 224).rgb
    assert psnr(drafted, full.astype(np.float64)) >= 48.0


def test_crop_only_when_already_at_resize_size():
    # 292x256: the short side is already floor(224/0.875) = 256 -> a pure centre crop
    arr = _photo(292, 256, seed=9)
    d = load_image(arr, 224)
    assert np.array_equal(d.rgb, arr[16:240, 34:258])
    assert np.array_equal(load_image(arr, 224, hflip=True).rgb, arr[16:240, 34:258][:, ::-1])


def test_resampler_is_named():
    assert isinstance(decode.RESAMPLER, str) and "bicubic" in decode.RESAMPLER
