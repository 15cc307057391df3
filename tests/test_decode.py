"""dynavit.pipeline.decode: odd modes, bad inputs, orientation, draft, geometry, encoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dynavit.pipeline import decode
from dynavit.pipeline.decode import DecodeError, encode_image, load_image

from fixtures_data import jpeg_bytes, png_bytes


def _read(path):
    with open(path, "rb") as f:
        return f.read()


BAD = ["empty.jpg", "truncated.jpg", "truncated.png", "text.jpg", "tiny.png", "bomb.png", "bomb_warn.png"]
GOOD = ["good.jpg", "mode_RGBA.png", "mode_P_transparent.png", "mode_P.png", "mode_LA.png",
        "mode_L.jpg", "mode_1.png", "mode_CMYK.jpg", "mode_I16.png", "exif_rot6.jpg"]


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_give_one_line_reason(bad_images, name):
    path, expected = bad_images[name]
    with pytest.raises(DecodeError) as ei:
        load_image(_read(path))
    msg = str(ei.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_bad_reason_details(bad_images):
    def reason(name):
        with pytest.raises(DecodeError) as ei:
            load_image(_read(bad_images[name][0]))
        return str(ei.value)
    assert reason("bomb.png") == "decompression bomb: 20000×20000 exceeds PIL's limit"
    assert reason("bomb_warn.png") == "decompression bomb: 10000×10000 exceeds PIL's limit"
    assert reason("tiny.png") == "image too small: 8×8 < patch 16"
    assert reason("text.jpg") == "not an image: cannot identify image file"
    assert reason("empty.jpg") == "empty file"
    # a smaller patch lets the 8x8 image through
    assert load_image(_read(bad_images["tiny.png"][0]), 16, patch_size=8).rgb.shape == (16, 16, 3)


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("policy", ["center-crop", "squash"])
def test_odd_modes_decode_to_rgb(bad_images, name, policy):
    d = load_image(_read(bad_images[name][0]), 224, policy)
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (224, 224, 3)
    assert d.rgb.flags["C_CONTIGUOUS"]


def _halves(name, bad_images):
    rgb = load_image(_read(bad_images[name][0]), 64, "squash").rgb.astype(int)
    return rgb[:, 4:28].reshape(-1, 3).mean(0), rgb[:, 36:60].reshape(-1, 3).mean(0)


def test_alpha_composited_on_white(bad_images):
    left, right = _halves("mode_RGBA.png", bad_images)
    np.testing.assert_allclose(left, [255, 0, 0], atol=1)
    np.testing.assert_allclose(right, [255, 255, 255], atol=1)  # stored black, transparent
    left, right = _halves("mode_P_transparent.png", bad_images)
    np.testing.assert_allclose(left, [0, 0, 255], atol=1)
    np.testing.assert_allclose(right, [255, 255, 255], atol=1)
    left, right = _halves("mode_LA.png", bad_images)
    np.testing.assert_allclose(left, [0, 0, 0], atol=1)
    np.testing.assert_allclose(right, [255, 255, 255], atol=1)


def test_palette_cmyk_gray_bilevel_colours(bad_images):
    left, right = _halves("mode_P.png", bad_images)
    np.testing.assert_allclose(left, [0, 200, 0], atol=1)
    left, _ = _halves("mode_CMYK.jpg", bad_images)
    np.testing.assert_allclose(left, [255, 0, 0], atol=6)
    left, _ = _halves("mode_L.jpg", bad_images)
    np.testing.assert_allclose(left, [128, 128, 128], atol=2)
    left, right = _halves("mode_1.png", bad_images)
    np.testing.assert_allclose(left, [0, 0, 0], atol=1)
    np.testing.assert_allclose(right, [255, 255, 255], atol=1)


def test_16bit_gradient_scaled_not_clipped(bad_images):
    d = load_image(_read(bad_images["mode_I16.png"][0]), 64, "squash")
    row = d.rgb[32, :, 0].astype(int)
    assert (d.rgb[..., 0] == d.rgb[..., 1]).all() and (d.rgb[..., 1] == d.rgb[..., 2]).all()
    assert (np.diff(row) >= 0).all()          # monotone
    assert row[0] == 0 and row[-1] >= 250     # full range
    assert len(np.unique(row)) == 64          # no clipping plateau at 255
    np.testing.assert_allclose(row, np.arange(64) * 1040 * 255 / 65535, atol=1)


def test_16bit_direct_values():
    a = np.array([[0, 256, 32768, 65535] * 4] * 16, dtype=np.uint16)
    d = load_image(png_bytes(Image.fromarray(a)), 16, "squash")
    assert d.rgb[0, :4, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_6_rotates(bad_images):
    d = load_image(_read(bad_images["exif_rot6.jpg"][0]), 64, "squash")
    assert (d.orig_width, d.orig_height) == (32, 64)  # displayed size
    # squash 32x64 -> 64x64 doubles x: the 16x16 red block at stored top-left
    # is displayed at the top-right: rows 0..16, columns 32..64
    top_right = d.rgb[2:14, 36:62].reshape(-1, 3).mean(0)
    top_left = d.rgb[2:14, 2:28].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[1] < 60, top_right
    np.testing.assert_allclose(top_left, [128, 128, 128], atol=8)


def test_exif_orientation_draft_size_uses_display_orientation(monkeypatch):
    """A rotated big JPEG must be drafted to cover the *displayed* resize size."""
    stored = np.zeros((1920, 4800, 3), np.uint8)  # stored 4800 wide, 1920 high
    exif = Image.Exif()
    exif[0x0112] = 6                              # displayed 1920 wide, 4800 high
    data = jpeg_bytes(stored, exif=exif.tobytes())
    calls = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return orig(self, mode, size)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    d = load_image(data, 224)
    # displayed short side 1920 -> 256: resize to 256 x 640 (w x h); in stored orientation
    # that is 640 wide, 256 high; drafted to at least DRAFT_MARGIN (2) times that
    assert decode.DRAFT_MARGIN == 2.0
    assert calls == [(1280, 512)]
    assert d.rgb.shape == (224, 224, 3) and (d.orig_width, d.orig_height) == (1920, 4800)


@pytest.fixture(scope="module")
def big_jpeg():
    # smooth content so the comparison measures resampling, not JPEG noise
    yy, xx = np.mgrid[0:3000, 0:4000]
    img = np.stack([(xx * 255 // 3999), (yy * 255 // 2999), ((xx + yy) * 255 // 6998)], -1)
    img = img.astype(np.uint8)
    img[1200:1800, 1700:2300] = (250, 30, 30)
    return jpeg_bytes(img, quality=92)


def test_draft_used_for_big_jpeg(big_jpeg, monkeypatch):
    calls = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((mode, size))
        return orig(self, mode, size)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    d = load_image(big_jpeg, 224)
    # 4000x3000: short side to 256 -> 341x256; draft asks for at least twice that
    assert calls == [("RGB", (682, 512))]
    assert (d.orig_width, d.orig_height) == (4000, 3000)
    calls.clear()
    load_image(jpeg_bytes(np.zeros((300, 400, 3), np.uint8)), 224)
    assert calls == []  # nothing to gain for an image this small
    load_image(jpeg_bytes(np.zeros((900, 1200, 3), np.uint8)), 224)
    assert calls == []  # a 1/2 draft (600x450) would be below twice 341x256


def test_draft_result_close_to_full_decode(big_jpeg, monkeypatch):
    fast = load_image(big_jpeg, 224).rgb.astype(int)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full = load_image(big_jpeg, 224).rgb.astype(int)
    assert np.abs(fast - full).mean() < 2.0
    assert np.abs(fast - full).max() < 40


def test_center_crop_geometry():
    # 480 wide x 320 high: columns 0..79 and 400..479 blue bands, centre green, a red row band
    img = np.zeros((320, 480, 3), np.uint8)
    img[:, :] = (0, 255, 0)
    img[:, :80] = (0, 0, 255)
    img[:, 400:] = (0, 0, 255)
    d = load_image(png_bytes(Image.fromarray(img)), 224, "center-crop", crop_pct=0.875)
    # short side 320 -> 256, long 480 -> 384; crop 224 at left (384-224)/2 = 80, top 16.
    # The blue bands end at 80 * 0.8 = 64 and start at 320: outside [80, 304) -> all green
    assert (d.orig_width, d.orig_height) == (480, 320)
    assert np.abs(d.rgb.astype(int) - [0, 255, 0]).max() <= 2
    d = load_image(png_bytes(Image.fromarray(img)), 224, "center-crop", crop_pct=0.6)
    # scale_size = floor(224 / 0.6) = 373 -> 559 x 373, left = round((559-224)/2) = 168
    # blue bands in resized coords: [0, 93) and [466, 559) -> outside the crop
    assert np.abs(d.rgb.astype(int) - [0, 255, 0]).max() <= 2


def test_center_crop_offsets_match_pattern():
    # a horizontal ramp: after the crop the first column's value tells the left offset
    ramp = np.tile(np.arange(512, dtype=np.uint16)[None, :] // 2, (256, 1)).astype(np.uint8)
    img = np.stack([ramp] * 3, -1)                      # 512 wide x 256 high, value = x // 2
    d = load_image(png_bytes(Image.fromarray(img)), 224, "center-crop")
    # resize: short 256 -> 256 (no change), long 512; left = (512 - 224) / 2 = 144
    assert d.rgb[100, 0, 0] == 72 and d.rgb[100, 223, 0] == (144 + 223) // 2


def test_squash_keeps_field_of_view():
    img = np.zeros((300, 600, 3), np.uint8)
    img[:, :] = (0, 255, 0)
    img[:, :30] = (255, 0, 0)      # 5% of the width at each edge
    img[:, 570:] = (0, 0, 255)
    d = load_image(png_bytes(Image.fromarray(img)), 224, "squash")
    assert d.rgb.shape == (224, 224, 3)
    assert tuple(d.rgb[112, 2]) == (255, 0, 0) and tuple(d.rgb[112, 221]) == (0, 0, 255)
    cc = load_image(png_bytes(Image.fromarray(img)), 224, "center-crop")
    assert cc.rgb[112, 2, 0] < 10  # center-crop cuts the edge bands away


def test_non_square_target_and_validation():
    img = np.full((300, 500, 3), 90, np.uint8)
    d = load_image(img, (160, 224), "center-crop")
    assert d.rgb.shape == (160, 224, 3)
    assert load_image(img, (160, 224), "squash").rgb.shape == (160, 224, 3)
    with pytest.raises(ValueError):
        load_image(img, 200)               # not a multiple of 16
    with pytest.raises(ValueError):
        load_image(img, 224, policy="stretch")


def test_array_input_resized_and_checked():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    d = load_image(arr, 224, "squash")
    assert d.rgb.shape == (224, 224, 3) and (d.orig_width, d.orig_height) == (32, 32)
    d2 = load_image(arr, 32, "squash")
    assert (d2.rgb == arr).all()            # same size: untouched
    with pytest.raises(DecodeError):
        load_image(arr.astype(np.float32), 224)


def test_keep_size():
    arr = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    data = encode_image(arr, "png")
    assert (load_image(data, 224, keep_size=True).rgb == arr).all()
    assert not (load_image(data, 224).rgb == arr).all()  # without it: the 0.875 centre crop
    # Any other size is resized exactly like an image without keep_size.
    other = encode_image(arr[:, :208], "png")
    assert (load_image(other, 224, keep_size=True).rgb == load_image(other, 224).rgb).all()


def test_deterministic(bad_images):
    data = _read(bad_images["good.jpg"][0])
    a, b = load_image(data, 224), load_image(data, 224)
    assert (a.rgb == b.rgb).all()


def test_png_round_trip_lossless_and_deterministic():
    arr = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    data = encode_image(arr, "png")
    assert data == encode_image(arr.copy(), "png")
    back = np.asarray(Image.open(io.BytesIO(data)))
    assert back.shape == arr.shape and (back == arr).all()
    assert (load_image(data, (64, 48), "squash").rgb == arr).all()


def test_jpeg_encode():
    arr = np.full((64, 64, 3), (200, 40, 40), np.uint8)
    data = encode_image(arr, "jpg", quality=95)
    assert data == encode_image(arr, "jpg", quality=95)
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.size == (64, 64)
    assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
    assert np.abs(np.asarray(im).astype(int) - arr).max() <= 3
    with pytest.raises(ValueError):
        encode_image(arr, "gif")


def test_decode_error_is_exception_subclass():
    assert issubclass(DecodeError, Exception)
    assert decode.POLICIES == ("center-crop", "squash")


def test_png_exif_orientation_read_after_load():
    rot = np.full((32, 64, 3), 128, np.uint8)
    rot[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    d = load_image(png_bytes(Image.fromarray(rot), exif=exif.tobytes()), 64, "squash")
    assert (d.orig_width, d.orig_height) == (32, 64)
    assert tuple(d.rgb[4, 60]) == (255, 0, 0) and tuple(d.rgb[4, 4]) == (128, 128, 128)
