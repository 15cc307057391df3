"""Our LIME (trainer/analysis/lime.py): the weighted fit against numpy's lstsq, the kernel
against its formula, and a planted model that only looks at one region."""
from __future__ import annotations

import numpy as np
import pytest

from dynavit.trainer.analysis.lime import (explain_image, lime_weights, overlap, patch_mask, perturb, top_mask,
                                           weighted_ridge)


def test_weighted_fit_equals_lstsq_on_scaled_rows():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 2, size=(80, 6)).astype(float)
    y = X @ rng.normal(size=6) + 0.3 + rng.normal(scale=0.1, size=80)
    w = rng.random(80)
    beta, b = weighted_ridge(X, y, w, alpha=0.0)
    A = np.hstack([X, np.ones((80, 1))]) * np.sqrt(w)[:, None]
    ref = np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)[0]
    np.testing.assert_allclose(np.append(beta, b), ref, rtol=1e-9, atol=1e-10)
    # ridge: lstsq on rows augmented with sqrt(alpha)·I (the intercept unpenalised)
    alpha = 2.5
    beta, b = weighted_ridge(X, y, w, alpha=alpha)
    aug = np.vstack([A, np.hstack([np.sqrt(alpha) * np.eye(6), np.zeros((6, 1))])])
    ref = np.linalg.lstsq(aug, np.concatenate([y * np.sqrt(w), np.zeros(6)]), rcond=None)[0]
    np.testing.assert_allclose(np.append(beta, b), ref, rtol=1e-9, atol=1e-10)


def test_kernel_formula():
    z = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    cos = np.array([1.0, 2 / (np.sqrt(2) * 2), 0.0])
    np.testing.assert_allclose(lime_weights(z), np.sqrt(np.exp(-(1 - cos) ** 2 / 0.25 ** 2)))


def test_perturb_fills_hidden_superpixels_with_their_mean():
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    seg = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    out = perturb(img, seg, np.array([[0, 1]]))[0]
    np.testing.assert_array_equal(out[:, 2:], img[:, 2:])
    np.testing.assert_array_equal(out[:, :2], np.broadcast_to(img[:, :2].reshape(-1, 3).mean(0).round(), (2, 2, 3)))


def test_planted_model_region_is_top_superpixel():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # texture everywhere
    seg = (np.arange(32)[:, None] // 8) * 4 + np.arange(32)[None] // 8  # 4x4 grid of 8 px squares
    region = seg == 6

    def predict(batch):  # class 1's probability grows with the texture inside `region` only
        t = batch[:, region].astype(float).std(axis=(1, 2)) / 40
        p1 = 1 / (1 + np.exp(-(t - 1) * 4))
        return np.stack([1 - p1, p1], 1)

    exp = explain_image(predict, img, seg, label=1, num_samples=200, seed=0)
    assert int(np.argmax(exp.coef)) == 6
    assert exp.coef[6] > 10 * np.abs(np.delete(exp.coef, 6)).max()
    mask = top_mask(exp, 1)
    assert (mask == region).all()
    kept = patch_mask([6, 7], (4, 4), 8)  # patch 6 is the region, patch 7 its neighbour
    assert overlap(mask, kept) == 1.0 and overlap(mask, patch_mask([0], (4, 4), 8)) == 0.0


def test_slic_superpixels_on_a_photo():
    pytest.importorskip("skimage")
    from skimage import data

    from dynavit.trainer.analysis.lime import superpixels
    seg = superpixels(data.astronaut()[::8, ::8], n_segments=30)
    assert seg.shape == (64, 64) and 10 <= seg.max() + 1 <= 60
