"""--hflip P / --vflip P: the kept indices after a flip are exactly the top-K of the flipped
image, re-scored from its pixels with NumPy (tiny_dataset's patch-std scores, the scores the
test shards were written with, and a stable argsort), never with the loader's index maps."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import webdataset as wds

from dynavit.manifests import read_shards, resolve
from dynavit.trainer.data import DataError, build_loader, vflip_indices
from tiny_dataset import make_tiny_dataset, patch_std_scores, topk_sets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_tiny_dataset(out)  # 32x32, patch 4: 8x8 grid; train 24 samples
    return out


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    out = tmp_path_factory.mktemp("large")  # 48x48: a 12x12 grid for the crop path
    make_tiny_dataset(out, splits=(("train", 16), ("val", 6)), image_size=48)
    return out


def images_of(ds, split="train"):
    out = {}
    for row in read_shards(ds).to_pylist():
        if row["split"] == split:
            for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8"):
                out[s["__key__"]] = s["png"]
    return out


def samples(loader, epochs=(0,)):
    for epoch in epochs:
        loader.set_epoch(epoch)
        for b in loader:
            for i, key in enumerate(b.keys):
                keep = None if b.keep_idx is None else b.keep_idx[i].numpy()
                yield key, b.images[i].permute(1, 2, 0).numpy(), keep


def reference_keep(shown: np.ndarray, k: int) -> np.ndarray:
    """Top-K of the image the model is shown, scored from its own pixels."""
    return topk_sets(patch_std_scores(shown, 4), [k])[k]


def which_flip(image, ref):
    found = [(h, v) for h in (0, 1) for v in (0, 1)
             if np.array_equal(image, ref[::-1 if v else 1, ::-1 if h else 1])]
    assert len(found) == 1, found  # the tiny images are not symmetric
    return found[0]


def test_vflip_indices_by_hand():
    # grid 3x4: (0,1)->(2,1)=9, (1,2)->(1,2)=6, (2,3)->(0,3)=3; re-sorted
    np.testing.assert_array_equal(vflip_indices(np.array([1, 6, 11]), 3, 4), [3, 6, 9])


def test_vflip_indices_equal_rescoring_the_flipped_image():
    img = np.random.default_rng(7).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 8x12 grid, no ties
    for k in (10, 25, 50, 70):
        np.testing.assert_array_equal(vflip_indices(reference_keep(img, k), 8, 12),
                                      reference_keep(np.ascontiguousarray(img[::-1]), k))


@pytest.mark.parametrize("hflip,vflip", [(0.0, 1.0), (0.5, 0.5)])
def test_loader_flips_and_keeps_the_top_k_of_the_flipped_image(tiny, hflip, vflip):
    want = images_of(tiny)
    loader = build_loader(tiny, "train", k=50, batch_size=4, seed=3, hflip=hflip, vflip=vflip)
    seen = set()
    for key, image, keep in samples(loader, epochs=(0, 1, 2)):
        flips = which_flip(image, want[key])
        seen.add(flips)
        np.testing.assert_array_equal(keep, reference_keep(image, 50))
    assert seen == ({(0, 1)} if hflip == 0 else {(0, 0), (0, 1), (1, 0), (1, 1)})


def test_hflip_zero_turns_flips_off_and_eval_never_flips(tiny):
    want = images_of(tiny)
    for key, image, keep in samples(build_loader(tiny, "train", k=50, batch_size=4, seed=3, hflip=0.0)):
        np.testing.assert_array_equal(image, want[key])
    val = images_of(tiny, "val")
    for key, image, keep in samples(build_loader(tiny, "val", k=50, batch_size=4, train=False, hflip=1, vflip=1)):
        np.testing.assert_array_equal(image, val[key])


def test_default_hflip_draws_are_the_earlier_ones(tiny):
    """--hflip 0.5 (the default) flips exactly the samples the fixed coin flipped before the
    option existed: the top bit of blake2b("seed/epoch/3/key"), recomputed here."""
    want = images_of(tiny)
    loader = build_loader(tiny, "train", k=50, batch_size=4, seed=11)
    for epoch in (0, 1):
        for key, image, _ in samples(loader, epochs=(epoch,)):
            bits = int.from_bytes(hashlib.blake2b(f"11/{epoch}/3/{key}".encode(), digest_size=8).digest(), "little")
            assert which_flip(image, want[key]) == (bits >> 63, 0)


def test_flips_with_a_crop_reselect_from_the_flipped_window(large):
    want = images_of(large)
    loader = build_loader(large, "train", k=30, batch_size=4, input_size=32, seed=5, hflip=0.5, vflip=0.5)
    seen, exact = set(), 0
    for key, image, keep in samples(loader, epochs=(0, 1)):
        ref = want[key]
        found = [(r, c, h, v) for r in range(0, 17, 4) for c in range(0, 17, 4) for h in (0, 1) for v in (0, 1)
                 if np.array_equal(image, ref[::-1 if v else 1, ::-1 if h else 1][r:r + 32, c:c + 32])]
        assert len(found) == 1, found
        seen.add(found[0][2:])
        # A crop re-selects from scores.npy, stored as float16: ties at the K boundary may
        # break either way, so the reference is "a top-K of the shown image's float16 scores".
        s16 = patch_std_scores(image, 4).astype(np.float16).ravel()
        dropped = np.setdiff1d(np.arange(64), keep)
        assert len(keep) == len(reference_keep(image, 30)) and s16[keep].min() >= s16[dropped].max()
        exact += s16[keep].min() > s16[dropped].max()
    assert exact > 10  # most samples have no tie at the boundary: there the set is the unique top-K
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_flips_do_not_depend_on_the_worker_count(tiny):
    def run(workers):
        loader = build_loader(tiny, "train", k=50, batch_size=4, seed=9, hflip=0.3, vflip=0.6, workers=workers)
        return [(b.keys, b.images.clone(), b.keep_idx.clone()) for b in loader]
    for (k0, i0, x0), (k2, i2, x2) in zip(run(0), run(2), strict=True):
        assert k0 == k2 and torch.equal(i0, i2) and torch.equal(x0, x2)


def test_flip_probability_out_of_range_is_refused(tiny):
    with pytest.raises(DataError, match="flip probabilities"):
        build_loader(tiny, "train", k=50, batch_size=4, vflip=1.5)
