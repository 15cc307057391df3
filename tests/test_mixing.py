"""Pruning-aware Mixup / CutMix (trainer/mixing.py) against a NumPy reference built from the
stored shards read with webdataset's own reader: the re-selected kept set (a stable argsort
of the mixed scores.npy, ties to the lower raster index as docs/FORMAT.md 'Top-K'), the label weights
(the share of kept tokens), the pixels; the soft-target loss against timm's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from timm.loss import SoftTargetCrossEntropy

from dynavit.manifests import read_shards, resolve
from dynavit.trainer.cli import main
from dynavit.trainer.data import build_loader, normalize
from dynavit.trainer.mixing import Mixer, cutmix_box
from tiny_dataset import make_tiny_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
K, KEPT = 50, 32  # 50 % of the 8x8 grid


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "ds"
    make_tiny_dataset(out, splits=(("train", 24), ("val", 8)))
    return out


def stored(ds):
    out = {}
    for row in read_shards(ds).to_pylist():
        if row["split"] != "train":
            continue
        for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8"):
            out[s["__key__"]] = {"image": s["png"], "label": int(s["cls"])}
        for s in wds.WebDataset(str(resolve(ds, row["index"][0]["path"])), shardshuffle=False).decode():
            out[s["__key__"]]["scores"] = s["scores.npy"].astype(np.float32)
    return out


def shown_scores(image, ref):
    """The stored scores in the frame of the image as shown (the loader may have flipped it)."""
    for h in (0, 1):
        if np.array_equal(image, ref["image"][:, ::-1] if h else ref["image"]):
            return ref["scores"][:, ::-1] if h else ref["scores"]
    raise AssertionError("image is neither the stored one nor its mirror")


def topk(scores):
    return np.sort(np.argsort(-scores.ravel(), kind="stable")[:KEPT])


def one_batch(ds, epoch, **kw):
    loader = build_loader(ds, "train", k=K, batch_size=8, seed=2, with_scores=True, **kw)
    loader.set_epoch(epoch)
    return next(iter(loader))


def find_batch(ds, mixer, op, **kw):
    for epoch in range(40):
        b = one_batch(ds, epoch, **kw)
        if mixer.draw(b.keys, epoch)[0] == op:
            return b, epoch
    raise AssertionError(f"no {op} batch in 40 epochs")


def test_cutmix_reselects_exactly_k_from_both_scores_and_weights_by_kept_share(ds):
    want = stored(ds)
    mixer = Mixer(seed=2, num_classes=4, patch=4, k_percent=K, cutmix=1.0, switch_prob=1.0)
    b, epoch = find_batch(ds, mixer, "cutmix")
    x0 = normalize(b.images, MEAN, STD)
    x, keep, target = mixer(x0, b.keep_idx, b.labels, b.scores, b.keys, epoch)
    _, lam, rng = mixer.draw(b.keys, epoch)
    top, bottom, left, right = cutmix_box((8, 8), lam, rng)
    assert (bottom - top) * (right - left) > 0
    n = len(b.keys)
    shares = []
    for i in range(n):
        a_key, b_key = b.keys[i], b.keys[n - 1 - i]
        sa = shown_scores(b.images[i].permute(1, 2, 0).numpy(), want[a_key])
        sb = shown_scores(b.images[n - 1 - i].permute(1, 2, 0).numpy(), want[b_key])
        mixed = sa.copy()
        mixed[top:bottom, left:right] = sb[top:bottom, left:right]
        expect = topk(mixed)
        np.testing.assert_array_equal(keep[i].numpy(), expect)
        r, c = np.divmod(expect, 8)
        share_a = np.mean(~((r >= top) & (r < bottom) & (c >= left) & (c < right)))
        shares.append(share_a)
        onehot = np.eye(4)
        ref_t = share_a * onehot[want[a_key]["label"]] + (1 - share_a) * onehot[want[b_key]["label"]]
        np.testing.assert_allclose(target[i].numpy(), ref_t, atol=1e-6)
        px = x0[i].clone()
        px[:, top * 4:bottom * 4, left * 4:right * 4] = x0[n - 1 - i][:, top * 4:bottom * 4, left * 4:right * 4]
        assert torch.equal(x[i], px)
    # the kept share differs from the pixel share for some sample: that is the point
    pixel_share = 1 - (bottom - top) * (right - left) / 64
    assert any(abs(s - pixel_share) > 1e-9 for s in shares)


def test_mixup_keeps_the_top_k_of_the_blended_scores(ds):
    want = stored(ds)
    mixer = Mixer(seed=2, num_classes=4, patch=4, k_percent=K, mixup=0.8)
    b, epoch = find_batch(ds, mixer, "mixup")
    x0 = normalize(b.images, MEAN, STD)
    x, keep, target = mixer(x0, b.keep_idx, b.labels, b.scores, b.keys, epoch)
    lam = mixer.draw(b.keys, epoch)[1]
    n = len(b.keys)
    for i in range(n):
        j = n - 1 - i
        sa = shown_scores(b.images[i].permute(1, 2, 0).numpy(), want[b.keys[i]])
        sb = shown_scores(b.images[j].permute(1, 2, 0).numpy(), want[b.keys[j]])
        np.testing.assert_array_equal(keep[i].numpy(), topk(np.float32(lam) * sa + np.float32(1 - lam) * sb))
        torch.testing.assert_close(x[i], lam * x0[i] + (1 - lam) * x0[j])
        t = np.zeros(4)
        t[int(b.labels[i])] += lam
        t[int(b.labels[j])] += 1 - lam
        np.testing.assert_allclose(target[i].numpy(), t, atol=1e-6)


def test_dense_cutmix_weight_is_the_box_share_and_draws_follow_the_batch(ds):
    mixer = Mixer(seed=2, num_classes=4, patch=4, k_percent=None, cutmix=1.0, switch_prob=1.0)
    loader = build_loader(ds, "train", k=100, select="dense", batch_size=8, seed=2)
    b = next(iter(loader))
    x0 = normalize(b.images, MEAN, STD)
    x, keep, target = mixer(x0, None, b.labels, None, b.keys, 0)
    assert keep is None
    changed = (x != x0).any(1)  # [B, H, W]
    area = changed.any(0).sum().item() / 1024  # the box (some pixels may coincide by chance)
    _, lam, rng = mixer.draw(b.keys, 0)
    top, bottom, left, right = cutmix_box((8, 8), lam, rng)
    assert area == pytest.approx((bottom - top) * (right - left) / 64)
    onehot = torch.eye(4)[b.labels]
    torch.testing.assert_close(target, (1 - area) * onehot + area * onehot.flip(0))
    x2, _, _ = mixer(x0, None, b.labels, None, b.keys, 0)
    assert torch.equal(x, x2)  # a function of (seed, epoch, keys)


def test_soft_target_loss_is_timms():
    logits = torch.randn(6, 4)
    target = torch.softmax(torch.randn(6, 4), 1)
    torch.testing.assert_close(torch.nn.CrossEntropyLoss()(logits, target), SoftTargetCrossEntropy()(logits, target))


def test_cutmix_with_random_selection_is_refused(ds, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["--shards", ds, "--k", 50, "--select", "random", "--cutmix", 1.0, "--out",
                               tmp_path / "x", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                               json.dumps({"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                           "num_heads": 2})]])
    assert exc.value.code == 2 and "--select" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_scores_follow_the_crop_window_and_both_flips(tmp_path):
    """What mixing re-selects from: each sample's scores.npy cut to its window and flipped as
    its pixels (found by searching the stored image), read back with webdataset."""
    out = tmp_path / "large"
    make_tiny_dataset(out, splits=(("train", 16), ("val", 4)), image_size=48)  # 12x12 grid
    want = stored(out)
    loader = build_loader(out, "train", k=30, batch_size=4, input_size=32, seed=5, hflip=0.5, vflip=0.5,
                          with_scores=True)
    seen = set()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for b in loader:
            for i, key in enumerate(b.keys):
                image, ref = b.images[i].permute(1, 2, 0).numpy(), want[key]
                found = [(r, c, h, v) for r in range(5) for c in range(5) for h in (0, 1) for v in (0, 1)
                         if np.array_equal(image, ref["image"][::-1 if v else 1, ::-1 if h else 1]
                                           [r * 4:r * 4 + 32, c * 4:c * 4 + 32])]
                assert len(found) == 1
                r, c, h, v = found[0]
                seen.add((h, v))
                expect = ref["scores"][::-1 if v else 1, ::-1 if h else 1][r:r + 8, c:c + 8]
                np.testing.assert_array_equal(b.scores[i].numpy(), expect)
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}
