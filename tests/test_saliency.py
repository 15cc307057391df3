"""Numba saliency kernels against independent float64 NumPy/SciPy references (docs/FORMAT.md 'Patch scores').

Tolerance: rtol=1e-4 as the design asks; atol=1e-5 only matters where the exact score is 0
(constant patches: sobel 0, entropy 0), where rtol alone would demand bit-exact zeros from
two different float summation orders.
"""

import numpy as np
import pytest

from dynavit.pipeline.saliency import IMAGENET_MEAN, IMAGENET_STD, SCORERS, score_patches

TOL = dict(rtol=1e-4, atol=1e-5)


def _patches(a, p):
    """[B,H,W,...] -> [B,Gh,Gw,P,P,...]"""
    b, h, w = a.shape[:3]
    r = a.reshape(b, h // p, p, w // p, p, *a.shape[3:])
    return np.moveaxis(r, 3, 2)


def ref_l2(img, p, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    z = (img.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return np.sqrt((_patches(z, p) ** 2).sum(axis=(3, 4, 5)))


def ref_sobel(img, p):
    ndimage = pytest.importorskip("scipy.ndimage")
    y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    mag = np.stack([np.hypot(ndimage.sobel(im, axis=0, mode="reflect"),
                             ndimage.sobel(im, axis=1, mode="reflect")) for im in y])
    return _patches(mag, p).mean(axis=(3, 4))


def ref_entropy(img, p):
    yi = (299 * img[..., 0].astype(np.int64) + 587 * img[..., 1].astype(np.int64)
          + 114 * img[..., 2].astype(np.int64) + 500) // 1000
    pt = _patches(yi, p)
    out = np.zeros(pt.shape[:3])
    for idx in np.ndindex(*pt.shape[:3]):
        hist, _ = np.histogram(pt[idx], bins=256, range=(0, 256))
        q = hist[hist > 0] / hist.sum()
        out[idx] = -(q * np.log2(q)).sum()
    return out


def ref_contrast(img, p):
    # np.std per channel (population, ddof=0) of x/255, pooled over the three channels
    var = (_patches(img.astype(np.float64) / 255.0, p)).var(axis=(3, 4))  # [B,Gh,Gw,3]
    return np.sqrt(var.mean(axis=-1))


def ref_distinct(img, p):
    x = _patches(img.astype(np.float64) / 255.0, p)
    colour = x.mean(axis=(3, 4))                                   # [B,Gh,Gw,3]
    texture = ref_contrast(img, p)                                 # [B,Gh,Gw]
    image_colour = img.astype(np.float64).mean(axis=(1, 2)) / 255.0  # [B,3]: the image's mean colour
    image_texture = texture.mean(axis=(1, 2))                      # [B]
    d2 = ((colour - image_colour[:, None, None]) ** 2).sum(-1) + (texture - image_texture[:, None, None]) ** 2
    return np.sqrt(d2)


REFS = {"l2": ref_l2, "sobel": ref_sobel, "entropy": ref_entropy, "contrast": ref_contrast,
        "distinct": ref_distinct}


def _check(img, p, scorer):
    got = score_patches(img, p, scorer)
    assert got.dtype == np.float32
    assert got.shape == (img.shape[0], img.shape[1] // p, img.shape[2] // p)
    np.testing.assert_allclose(got, REFS[scorer](img, p), **TOL)
    return got


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("shape,p", [((2, 32, 48), 8), ((3, 28, 42), 14), ((2, 64, 48), 16),
                                     ((1, 64, 96), 32), ((2, 16, 16), 16)])
def test_random_images(scorer, shape, p):
    rng = np.random.default_rng(hash((scorer, shape, p)) % 2**32)
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    _check(img, p, scorer)


@pytest.mark.parametrize("scorer", SCORERS)
def test_low_contrast_random(scorer):
    # few distinct values: entropy far from 8 bits, sobel magnitudes small
    rng = np.random.default_rng(7)
    img = (100 + rng.integers(0, 3, size=(2, 32, 32, 3))).astype(np.uint8)
    _check(img, 8, scorer)


@pytest.mark.parametrize("scorer", SCORERS)
def test_smooth_gradient(scorer):
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)[None]
    _check(img, 16, scorer)


@pytest.mark.parametrize("value", [0, 37, 255])
def test_constant_image(value):
    img = np.full((2, 32, 48, 3), value, np.uint8)
    for p in (8, 16):
        assert np.all(score_patches(img, p, "sobel") == 0)
        for scorer in ("contrast", "distinct"):  # exact integer sums: exactly 0, not ~1e-17
            assert np.all(score_patches(img, p, scorer) == 0)
        np.testing.assert_allclose(score_patches(img, p, "entropy"), 0, atol=1e-12)
        _check(img, p, "l2")
    img14 = np.full((1, 28, 42, 3), value, np.uint8)
    np.testing.assert_allclose(score_patches(img14, 14, "entropy"), 0, atol=1e-12)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("pos", [(0, 0), (0, 23), (31, 0), (31, 23), (7, 8), (8, 7), (15, 16), (16, 9)])
def test_single_bright_pixel(scorer, pos):
    # corners and patch seams exercise the reflected image borders and the cross-patch halo
    img = np.zeros((1, 32, 24, 3), np.uint8)
    img[0, pos[0], pos[1]] = (255, 200, 100)
    _check(img, 8, scorer)


def test_batch_items_independent():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    for scorer in SCORERS:
        full = score_patches(img, 16, scorer)
        for i in range(4):
            np.testing.assert_array_equal(full[i:i + 1], score_patches(img[i:i + 1], 16, scorer))


def test_non_contiguous_input_and_empty_batch():
    rng = np.random.default_rng(4)
    big = rng.integers(0, 256, size=(2, 32, 64, 3), dtype=np.uint8)
    view = big[:, :, ::2]
    np.testing.assert_allclose(score_patches(view, 8, "l2"), ref_l2(np.ascontiguousarray(view), 8), **TOL)
    assert score_patches(big[:0], 8, "sobel").shape == (0, 4, 8)


def test_custom_mean_std():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(1, 16, 16, 3), dtype=np.uint8)
    got = score_patches(img, 8, "l2", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(got, ref_l2(img, 8, (0.5,) * 3, (0.5,) * 3), **TOL)


def test_errors():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="float32"):
        score_patches(img.astype(np.float32), 16, "l2")
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        score_patches(img[0], 16, "l2")
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 4\)"):
        score_patches(np.zeros((1, 32, 32, 4), np.uint8), 16, "l2")
    with pytest.raises(ValueError, match="32x30.*14|30.*14"):
        score_patches(np.zeros((1, 32, 30, 3), np.uint8), 14, "sobel")
    with pytest.raises(ValueError, match="'canny'.*l2, sobel, entropy, contrast, distinct"):
        score_patches(img, 16, "canny")
    with pytest.raises(ValueError, match="patch"):
        score_patches(img, 0, "l2")
    with pytest.raises(ValueError, match="std"):
        score_patches(img, 16, "l2", std=(0.2, 0.0, 0.2))


@pytest.mark.parametrize("scorer", ("contrast", "distinct"))
def test_content_scorers_ignore_brightness(scorer):
    """What the content scorers are for: a flat patch of any colour scores 0 (contrast), and
    shifting every pixel by a constant (no clipping) changes neither score, while l2 changes."""
    rng = np.random.default_rng(11)
    img = rng.integers(40, 200, size=(2, 32, 48, 3), dtype=np.uint8)
    img[:, :16, :16] = (0, 0, 0)          # a flat black patch and a flat white one
    img[:, 16:, 32:] = (255, 255, 255)
    got = _check(img, 16, scorer)
    shifted = img.copy()
    shifted[:, :16, 16:32] += 30  # an inner patch, still inside 0..255
    inner = score_patches(shifted, 16, scorer)
    if scorer == "contrast":
        assert got[:, 0, 0].max() == 0 and got[:, 1, 2].max() == 0
        assert got[:, 0, 1].min() > 0.1
        np.testing.assert_array_equal(inner, got)  # brightness of a patch does not matter
        np.testing.assert_array_equal(score_patches(img // 2 + 40, 16, scorer), score_patches(img // 2 + 90, 16, scorer))
    else:
        np.testing.assert_allclose(score_patches(img // 2 + 90, 16, scorer), score_patches(img // 2 + 40, 16, scorer),
                                   rtol=1e-6, atol=1e-7)  # a global shift moves the image mean too
    assert not np.array_equal(score_patches(img // 2 + 90, 16, "l2"), score_patches(img // 2 + 40, 16, "l2"))
