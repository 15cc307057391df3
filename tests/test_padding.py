"""Padding-aware scoring (pipeline/padding.py) on img2dataset-style letterboxed images."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import img2dataset_fixture as F
from dynavit.manifests.schema import k_count
from dynavit.pipeline.decode import load_image
from dynavit.pipeline.padding import (content_box, content_box_from_meta, detect_constant_border,
                                      img2dataset_border_box, map_box, mask_scores,
                                      padding_masks, padding_patches)
from dynavit.pipeline.saliency import score_patches
from dynavit.pipeline.topk import select_topk_multi

S, P = 224, 16
G = S // P


def _samples(fx):
    """[(key, json meta, stored bytes)] of every sample with an image, in tar order."""
    out = []
    for tar in fx.tars:
        m = {}
        with tarfile.open(tar) as tf:
            for ti in tf:
                k, ext = ti.name.split(".", 1)
                m.setdefault(k, {})[ext] = tf.extractfile(ti).read()
        out += [(k, json.loads(v["json"]), v["jpg"]) for k, v in m.items() if "jpg" in v]
    return out


@pytest.fixture(scope="module")
def border(tmp_path_factory):
    fx = F.write_img2dataset_tars(tmp_path_factory.mktemp("border"), n=24, per_tar=12, seed=0)
    rows = []
    for key, meta, data in _samples(fx):
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        rows.append((key, meta, stored, load_image(data, S).rgb))
    return fx, rows


def _close(a, b, tol=2.0):
    return max(abs(float(x) - float(y)) for x, y in zip(a, b)) <= tol


# ------------------------------------------------------------------ (1) detector vs json

def test_json_box_is_exact(border):
    fx, rows = border
    letterboxed = 0
    for key, meta, stored, _ in rows:
        truth = fx.samples[key].content_box
        got = content_box_from_meta(meta, 256, 256, rgb=stored)
        if truth == (0, 0, 256, 256):
            assert got is None
        else:
            letterboxed += 1
            assert got == truth, key
            assert content_box_from_meta(meta, 256, 256) == truth  # without pixels too
            # outside the box (past 2 lines of JPEG ringing) the image is white
            x0, y0, x1, y1 = got
            for strip in (stored[:max(0, y0 - 2)], stored[y1 + 2:], stored[:, :max(0, x0 - 2)],
                          stored[:, x1 + 2:]):
                assert strip.size == 0 or strip.mean() > 250
    assert letterboxed >= len(rows) // 2


def test_json_box_is_the_non_white_part_lossless(tmp_path):
    # img2dataset --encode_format png: the border is exactly 255, so the box is exact
    fx = F.write_img2dataset_tars(tmp_path, n=8, per_tar=8, seed=4, encode_format="png")
    with tarfile.open(fx.tars[0]) as tf:
        m = {}
        for ti in tf:
            k, ext = ti.name.split(".", 1)
            m.setdefault(k, {})[ext] = tf.extractfile(ti).read()
    for k, v in m.items():
        a = np.asarray(Image.open(io.BytesIO(v["png"])).convert("RGB"))
        ys, xs = np.nonzero((a != 255).any(axis=2))
        nonwhite = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        got = content_box_from_meta(json.loads(v["json"]), 256, 256, rgb=a)
        assert (got or (0, 0, 256, 256)) == nonwhite, k
        assert detect_constant_border(a) == nonwhite or got is None or \
            min(got[0], got[1], 256 - got[2], 256 - got[3]) == 0 and \
            max(got[0], got[1], 256 - got[2], 256 - got[3]) <= 1  # a 1 px pad on one side


def test_detector_agrees_with_json_after_mapping(border):
    fx, rows = border
    big = 0
    for key, meta, stored, final in rows:
        truth = content_box_from_meta(meta, 256, 256, rgb=stored) or (0, 0, 256, 256)
        det_stored = detect_constant_border(stored)
        assert _close(det_stored, truth), (key, det_stored, truth)
        want = map_box(truth, 256, 256, S)
        assert _close(map_box(det_stored, 256, 256, S), want), key
        det_final = detect_constant_border(final)           # on load_image's 224² output
        assert _close(det_final, want), (key, det_final, want)
        assert content_box(stored, meta) == truth
        # the two masks differ only on patches within 2 px of the true content edge
        m_json = padding_patches(want, S, P)
        m_det = padding_patches(det_final, S, P)
        for i, j in zip(*np.nonzero(m_json != m_det)):
            edges_y, edges_x = (i * P, (i + 1) * P), (j * P, (j + 1) * P)
            assert any(abs(e - v) <= 2 for e in edges_y for v in want[1::2]) or \
                any(abs(e - v) <= 2 for e in edges_x for v in want[0::2])
        big += m_json.sum() >= G
    assert big >= 5  # several images have at least a row of padding patches


# ------------------------------------------------------------------ (2) top-K never keeps padding

def test_masked_l2_topk_keeps_no_padding(border):
    fx, rows = border
    batch = np.stack([r[3] for r in rows])
    boxes = [map_box(content_box_from_meta(m, 256, 256, rgb=s) or (0, 0, 256, 256), 256, 256, S)
             for _, m, s, _ in rows]
    pad = padding_masks(boxes, S, P)
    scores = score_patches(batch, P, "l2")
    k = k_count(25, G * G)
    plain = select_topk_multi(scores, [25])[25]
    masked = select_topk_multi(mask_scores(scores, pad), [25])[25]
    kept_plain = kept_masked = checked = 0
    for i in range(len(rows)):
        flat = pad[i].reshape(-1)
        kept_plain += int(flat[plain[i]].sum())
        if (~flat).sum() >= k:
            checked += 1
            assert not flat[masked[i]].any(), rows[i][0]
            kept_masked += int(flat[masked[i]].sum())
        else:  # fewer content patches than K: all of them kept, padding fills the rest
            assert set(np.flatnonzero(~flat)) <= set(masked[i].tolist())
    assert checked >= len(rows) // 2
    assert kept_masked == 0
    assert kept_plain > 0  # white padding does win plain l2 top-K: the test means something
    # the masked scores of content patches are the plain ones
    ms = mask_scores(scores, pad)
    assert ms.dtype == np.float32 and np.array_equal(ms[~pad], scores[~pad])


# ------------------------------------------------------------------ (3) edge cases

def _photo(w=300, h=200, seed=0):
    name, photo = F.source_photos()[0]
    rng = np.random.default_rng(seed)
    data, _ = F._make_original(rng, photo)
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im)


def test_no_border_masks_nothing():
    rgb = load_image(_photo(320, 240), S).rgb
    assert detect_constant_border(rgb) == (0, 0, S, S)
    assert not padding_patches(detect_constant_border(rgb), S, P).any()
    # an unpadded img2dataset image: square original, or sizes that fill the square
    meta = {"status": "success", "width": 256, "height": 256, "original_width": 600,
            "original_height": 600}
    assert content_box_from_meta(meta, 256, 256) is None
    assert content_box_from_meta({**meta, "original_height": 599}, 256, 256) is None  # rounds to 256


@pytest.mark.parametrize("value", [255, 0, 117])
def test_constant_image_masks_nothing(value):
    rgb = np.full((S, S, 3), value, np.uint8)
    assert detect_constant_border(rgb) == (0, 0, S, S)
    assert detect_constant_border(rgb, require_opposite=False) == (0, 0, S, S)
    # JPEG noise on a constant image, and a two-colour image: still no border
    noisy = load_image(F._encode(rgb, "jpg", 60, "pil"), S).rgb
    assert detect_constant_border(noisy) == (0, 0, S, S)
    two = rgb.copy()
    two[S // 2:] = 255 - value if value != 117 else 30
    assert detect_constant_border(two) == (0, 0, S, S)
    assert detect_constant_border(two, require_opposite=False) == (0, 0, S, S)
    assert not padding_patches(detect_constant_border(rgb), S, P).any()


def test_landscape_letterboxed_top_bottom():
    buf = io.BytesIO()
    Image.fromarray(_photo(600, 200, seed=1)).save(buf, "JPEG", quality=90)
    img, w, h, ow, oh, err = F.resize_like_img2dataset(buf.getvalue(), 256, "border")
    assert err is None and (w, h, ow, oh) == (256, 256, 600, 200)
    meta = {"status": "success", "width": w, "height": h, "original_width": ow,
            "original_height": oh}
    stored = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    box = content_box_from_meta(meta, 256, 256, rgb=stored)
    assert box == img2dataset_border_box(600, 200, 256) == (0, 85, 256, 170)  # 85.3 high
    final = map_box(box, 256, 256, S)
    assert final == (0.0, 69.0, 224.0, 154.0)  # resize 256 -> 256, crop 16 px
    mask = padding_patches(final, S, P)
    assert mask[[0, 1, 2, 3, 10, 11, 12, 13]].all() and not mask[4:10].any()
    rgb = load_image(img, S).rgb
    assert (padding_patches(detect_constant_border(rgb), S, P) == mask).all()
    # the json alone is not trusted when the pixels say "no border" (center_crop output)
    cropped = F.resize_like_img2dataset(buf.getvalue(), 256, "center_crop")[0]
    cropped_rgb = np.asarray(Image.open(io.BytesIO(cropped)).convert("RGB"))
    assert content_box_from_meta(meta, 256, 256, rgb=cropped_rgb) is None
    assert detect_constant_border(cropped_rgb) == (0, 0, 256, 256)


def test_content_smaller_than_k_fills_with_padding_lowest_index_first():
    box = img2dataset_border_box(900, 150, 256)              # 256 × 43 content
    final = map_box(box, 256, 256, S)
    mask = padding_patches(final, S, P)
    content = np.flatnonzero(~mask.reshape(-1))
    k = k_count(50, G * G)
    assert 0 < len(content) < k
    rng = np.random.default_rng(0)
    scores = rng.random((1, G, G), dtype=np.float32)
    scores[0][mask] += 10.0                                  # padding scores highest
    for fill in ("-inf", "finite"):
        ms = mask_scores(scores, mask[None], fill=fill)
        assert ms.dtype == np.float32
        if fill == "finite":
            assert np.isfinite(ms).all() and ms[0][mask].max() < ms[0][~mask].min()
        kept = select_topk_multi(ms, [50])[50][0]
        assert set(content) <= set(kept.tolist())           # every content patch
        pad_kept = sorted(set(kept.tolist()) - set(content))
        pad_all = np.flatnonzero(mask.reshape(-1))
        assert pad_kept == list(pad_all[:k - len(content)])  # then padding, lowest index first


def test_mask_scores_contract():
    s = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    m = np.zeros((2, 3, 4), bool)
    m[0, 0] = True
    m[1] = True                                              # all padding: left alone
    out = mask_scores(s, m)
    assert out is not s and np.array_equal(s, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert np.isneginf(out[0, 0]).all() and np.array_equal(out[0, 1:], s[0, 1:])
    assert np.array_equal(out[1], s[1])
    assert np.array_equal(mask_scores(s, m[0]), mask_scores(s, np.stack([m[0]] * 2)))
    with pytest.raises(ValueError):
        mask_scores(s, m[:, :2])
    with pytest.raises(ValueError):
        mask_scores(s, m, fill="zero")
    # -inf ties rank in raster order, after every real score
    sel = select_topk_multi(out, [50])[50]
    assert sel[0].tolist() == list(range(6, 12))


def test_meta_without_sizes_says_nothing():
    good = {"status": "success", "width": 256, "height": 256, "original_width": 500,
            "original_height": 300}
    assert content_box_from_meta(good, 256, 256) == (0, 51, 256, 205)
    for bad in ({}, None, "x", {**good, "original_width": None}, {**good, "height": "256"},
                {**good, "status": "failed_to_download"}, {**good, "width": 200}):
        assert content_box_from_meta(bad, 256, 256) is None
    assert content_box_from_meta(good, 256, 224) is None     # json disagrees with the image
    assert content_box_from_meta({**good, "width": 300, "height": 180,
                                  "original_width": 300, "original_height": 180}, 300, 180) is None


def test_map_box_and_one_sided_border():
    assert map_box((0, 0, 256, 256), 256, 256, S) == (0.0, 0.0, 224.0, 224.0)
    assert map_box((10, 20, 30, 40), 224, 224, S, keep_size=True) == (10.0, 20.0, 30.0, 40.0)
    assert map_box(None, 256, 256) is None
    # 512² stored image: resize by 1/2, crop 16 px
    assert map_box((0, 100, 512, 412), 512, 512, S) == (0.0, 34.0, 224.0, 190.0)
    # squash: plain scaling
    assert map_box((0, 64, 256, 192), 256, 256, S, policy="squash") == (0.0, 56.0, 224.0, 168.0)
    # a border on one side only is found only without require_opposite
    rgb = load_image(_photo(224, 224, seed=2), S).rgb.copy()
    rgb[:40] = 0
    assert detect_constant_border(rgb) == (0, 0, S, S)
    assert detect_constant_border(rgb, require_opposite=False) == (0, 40, S, S)
    gray = rgb[:, :, 0]
    assert detect_constant_border(gray, require_opposite=False) == (0, 40, S, S)
    # a sliver under 1 px of content in a patch counts as padding
    m = padding_patches((0, 15.5, S, S), S, P)
    assert m[0].all() and not m[1:].any()
    m = padding_patches((0, 15.0, S, S), S, P)
    assert not m.any()


def test_flat_looking_photo_edges_are_not_padding():
    # dark fabric on both sides (seen in grace_hopper crops): nearly constant, but textured
    rng = np.random.default_rng(5)
    rgb = load_image(_photo(224, 224, seed=3), S).rgb.copy()
    for sl in (np.s_[:, :25], np.s_[:, -22:]):
        shape = rgb[sl].shape
        rgb[sl] = np.clip(rng.normal(14, 4, shape[:2])[..., None] + [0, -2, 3], 0, 255).astype(np.uint8)
    rgb = load_image(F._encode(rgb, "jpg", 95, "pil"), S).rgb
    assert detect_constant_border(rgb) == (0, 0, S, S)
    assert detect_constant_border(rgb, flat=8)[0] >= 8  # what a looser flatness would eat


def test_detector_description_is_json():
    from dynavit.pipeline.padding import DETECTOR
    assert json.loads(json.dumps(DETECTOR)) == DETECTOR
    assert DETECTOR["fill"] == "-inf" and DETECTOR["require_opposite"] is True
