"""Colour jitter and random erasing (trainer/augment.py): torchvision's own adjust_* ops per
sample as the reference, no pixel moves, kept indices untouched, erased pixels only inside
the kept patches (the patch of every pixel computed here with NumPy from the indices)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from dynavit.trainer.augment import Augment, color_jitter, erase_boxes, jitter_factors, train_inputs
from dynavit.trainer.data import Batch, normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def batch(n=6, size=32, patch=4, kept=20, seed=0, dense=False) -> Batch:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    g = (size // patch) ** 2
    keep = None if dense else torch.from_numpy(np.stack([np.sort(rng.choice(g, kept, replace=False))
                                                         for _ in range(n)]).astype(np.int64))
    return Batch(images, keep, torch.arange(n), [f"{seed:02d}{i:08d}" for i in range(n)])


def test_color_jitter_equals_torchvision_per_sample():
    b = batch()
    x = b.images.float() / 255
    aug = Augment(seed=1, jitter=(0.4, 0.4, 0.4, 0.1))
    f = jitter_factors(aug, b.keys, 0, "cpu")
    assert len({tuple(r) for r in f.tolist()}) == len(b.keys)  # each sample its own draw
    got = color_jitter(x, f)
    for i in range(len(b.keys)):
        want = TF.adjust_brightness(x[i], float(f[i, 0]))
        want = TF.adjust_contrast(want, float(f[i, 1]))
        want = TF.adjust_saturation(want, float(f[i, 2]))
        want = TF.adjust_hue(want, float(f[i, 3]))
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])
    assert ((f >= lo) & (f <= torch.tensor([1.4, 1.4, 1.4, 0.1]))).all()


def test_jitter_moves_no_pixel_and_keeps_the_indices():
    """Shuffling the pixels before jitter shuffles the output the same way: each output pixel
    is a function of its own input pixel (and the image's mean grey), nothing moves."""
    b = batch()
    aug = Augment(seed=3, jitter=(0.4, 0.4, 0.4, 0.1), patch=4)
    x, keep, labels = train_inputs(b, "cpu", MEAN, STD, aug, epoch=2)
    perm = torch.from_numpy(np.random.default_rng(5).permutation(32 * 32))
    shuffled = b.images.flatten(2)[:, :, perm].view_as(b.images)
    xs, _, _ = train_inputs(Batch(shuffled, b.keep_idx, b.labels, b.keys), "cpu", MEAN, STD, aug, epoch=2)
    torch.testing.assert_close(xs.flatten(2), x.flatten(2)[:, :, perm], atol=1e-5, rtol=0)
    assert torch.equal(keep, b.keep_idx) and torch.equal(labels, b.labels)
    assert not torch.allclose(x, normalize(b.images, MEAN, STD), atol=1e-3)


def test_draws_follow_the_sample_not_its_position():
    b = batch()
    aug = Augment(seed=3, jitter=(0.4, 0.4, 0.4, 0.1), reprob=1.0, patch=4)
    x, _, _ = train_inputs(b, "cpu", MEAN, STD, aug, epoch=1)
    order = [3, 0, 5, 1, 4, 2]
    rb = Batch(b.images[order], b.keep_idx[order], b.labels[order], [b.keys[i] for i in order])
    xr, _, _ = train_inputs(rb, "cpu", MEAN, STD, aug, epoch=1)
    torch.testing.assert_close(xr, x[order], atol=1e-6, rtol=0)
    x2, _, _ = train_inputs(b, "cpu", MEAN, STD, aug, epoch=2)
    assert not torch.allclose(x2, x)  # a new epoch, new draws


def kept_pixels(keep: np.ndarray, size=32, patch=4) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for idx in keep:
        r, c = divmod(int(idx), size // patch)
        mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
    return mask


@pytest.mark.parametrize("mode", ["pixel", "const"])
def test_erasing_changes_only_pixels_inside_kept_patches(mode):
    b = batch(n=16, kept=24, seed=2)
    aug = Augment(seed=4, reprob=1.0, remode=mode, patch=4)
    x, keep, _ = train_inputs(b, "cpu", MEAN, STD, aug, epoch=0)
    assert torch.equal(keep, b.keep_idx)
    plain = normalize(b.images, MEAN, STD)
    boxes = erase_boxes(aug, b.keys, 0, (32, 32))
    erased_any = 0
    for i in range(16):
        changed = (x[i] != plain[i]).any(0).numpy()
        inside = kept_pixels(b.keep_idx[i].numpy())
        assert not (changed & ~inside).any()  # nothing outside the kept patches
        top, left, h, w, _ = boxes[i]
        in_box = np.zeros((32, 32), bool)
        in_box[top:top + h, left:left + w] = True
        assert not (changed & ~in_box).any()
        if mode == "const":  # every kept pixel of the box is the dataset mean (0 after normalising)
            assert (x[i][:, in_box & inside] == 0).all()
            assert changed.sum() == (in_box & inside).sum()
        erased_any += changed.sum()
    assert erased_any > 0


def test_erasing_dense_is_a_timm_box():
    b = batch(n=32, dense=True, seed=4)
    aug = Augment(seed=0, reprob=0.5, remode="const", patch=4)
    x, keep, _ = train_inputs(b, "cpu", MEAN, STD, aug, epoch=0)
    assert keep is None
    plain = normalize(b.images, MEAN, STD)
    n_erased = 0
    for i in range(32):
        changed = (x[i] != plain[i]).any(0).numpy()
        if not changed.any():
            continue
        n_erased += 1
        rows, cols = np.nonzero(changed)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert changed.sum() == h * w  # one rectangle
        assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5 and 0.3 / 2 <= h / w <= 3.4 * 2
    assert 8 <= n_erased <= 24  # about half, at --reprob 0.5


def test_no_augmentation_is_bit_identical_to_normalize():
    b = batch()
    x, _, _ = train_inputs(b, "cpu", MEAN, STD, None, epoch=0)
    assert torch.equal(x, normalize(b.images, MEAN, STD))


# --- TrivialAugment, colour ops only ---------------------------------------------------------

def test_trivial_draws_use_torchvisions_magnitude_table_and_every_colour_op():
    from torchvision.transforms.v2 import TrivialAugmentWide
    from dynavit.trainer.augment import TRIVIAL_OPS, trivial_draw
    space = TrivialAugmentWide._AUGMENTATION_SPACE
    names = {"autocontrast": "AutoContrast", "equalize": "Equalize", "posterize": "Posterize",
             "solarize": "Solarize", "color": "Color", "contrast": "Contrast", "brightness": "Brightness",
             "identity": "Identity"}
    seen = set()
    for i in range(400):
        op, v = trivial_draw(5, 0, f"{i:010d}")
        seen.add(op)
        table, signed = space[names[op]]
        mags = table(31, 32, 32)
        if op in ("color", "contrast", "brightness"):
            assert any(v == pytest.approx(1 + s * float(m), abs=0) for m in mags for s in (1, -1))
        elif op == "posterize":
            assert int(v) in mags.tolist()
        elif op == "solarize":
            assert any(v == 255.0 * float(m) for m in mags)
    assert seen == set(TRIVIAL_OPS)
    assert "sharpness" not in seen and "rotate" not in seen


@pytest.mark.parametrize("op,v", [("autocontrast", 0), ("equalize", 0), ("posterize", 3), ("solarize", 200.6),
                                  ("brightness", 1.3), ("color", 0.4), ("contrast", 1.5)])
def test_trivial_ops_equal_pil(op, v):
    from PIL import Image, ImageEnhance, ImageOps
    from dynavit.trainer.augment import trivial_color
    b = batch(n=1, seed=9)
    img = b.images[0].clone()
    img[0] //= 2  # a channel that does not span 0..255, so autocontrast has work to do
    got = trivial_color(img[None], [(op, v)])[0].permute(1, 2, 0).numpy().astype(int)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    want = {"autocontrast": lambda: ImageOps.autocontrast(pil), "equalize": lambda: ImageOps.equalize(pil),
            "posterize": lambda: ImageOps.posterize(pil, int(v)), "solarize": lambda: ImageOps.solarize(pil, 201),
            "brightness": lambda: ImageEnhance.Brightness(pil).enhance(v),
            "color": lambda: ImageEnhance.Color(pil).enhance(v),
            "contrast": lambda: ImageEnhance.Contrast(pil).enhance(v)}[op]()
    diff = np.abs(got - np.asarray(want).astype(int))
    assert diff.max() <= (0 if op in ("posterize", "solarize", "equalize") else 2), (op, diff.max())


def test_trivial_color_moves_no_pixel():
    b = batch(n=24, seed=6)
    aug = Augment(seed=3, trivial=True, patch=4)
    x, keep, _ = train_inputs(b, "cpu", MEAN, STD, aug, epoch=0)
    perm = torch.from_numpy(np.random.default_rng(2).permutation(32 * 32))
    shuffled = b.images.flatten(2)[:, :, perm].view_as(b.images)
    xs, _, _ = train_inputs(Batch(shuffled, b.keep_idx, b.labels, b.keys), "cpu", MEAN, STD, aug, epoch=0)
    torch.testing.assert_close(xs.flatten(2), x.flatten(2)[:, :, perm], atol=1e-5, rtol=0)
    assert torch.equal(keep, b.keep_idx)
