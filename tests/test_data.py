"""trainer/data.py: shard pairs → batches (docs/ARCHITECTURE.md, 'Trainer data path').

Expected values are read back with webdataset's own `WebDataset(...).decode()` reader or
computed by hand, never with the loader under test.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from dynavit.manifests import TarWriter, iter_tar_samples, npy_bytes, npy_load, read_manifest, read_shards, resolve
from dynavit.pipeline.topk import select_topk
from dynavit.trainer.data import (
    Batch,
    DataError,
    build_loader,
    center_indices,
    hflip_indices,
    normalize,
    open_dataset,
)
from tiny_dataset import make_tiny_dataset, patch_std_scores

# train: 24 samples in shards of 10, 10, 4; val: 12 in 10, 2. 32x32, patch 4: 8x8 grid, N=64.
N = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_tiny_dataset(out)
    return out


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Stored 48x48 (12x12 grid) for the crop path."""
    out = tmp_path_factory.mktemp("large")
    make_tiny_dataset(out, splits=(("train", 16), ("val", 6)), image_size=48)
    return out


@pytest.fixture
def scratch(tmp_path):
    """A fresh dataset a test may corrupt."""
    make_tiny_dataset(tmp_path)
    return tmp_path


def stored(ds, split, scorer="l2"):
    """key -> image, label, scores and k*.npy arrays, read with webdataset's own decoder."""
    out = {}
    for row in read_shards(ds).to_pylist():
        if row["split"] != split:
            continue
        index = next(e["path"] for e in row["index"] if e["scorer"] == scorer)
        for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8"):
            out[s["__key__"]] = {"image": s["png"], "label": s["cls"], "shard": row["shard"]}
        for s in wds.WebDataset(str(resolve(ds, index)), shardshuffle=False).decode():
            out[s["__key__"]].update({name[:-4]: v for name, v in s.items() if name.endswith(".npy")})
    return out


def ok_rows(ds, split):
    return {r["key"]: r for r in read_manifest(ds).to_pylist() if r["split"] == split and r["status"] == "ok"}


def samples_of(batches):
    """(key, image HWC, keep_idx or None, label) for every sample of some batches."""
    for b in batches:
        for i, key in enumerate(b.keys):
            keep = None if b.keep_idx is None else b.keep_idx[i].numpy()
            yield key, b.images[i].permute(1, 2, 0).numpy(), keep, int(b.labels[i])


def rewrite_tar(path, transform):
    samples = transform(list(iter_tar_samples(path)))
    with TarWriter(path) as w:
        for key, members in samples:
            w.write(key, members)


def drain(loader):
    return list(loader)


# --- the dataset directory -----------------------------------------------------------------

def test_open_dataset_rejects_a_non_dataset_dir(tmp_path, tiny):
    with pytest.raises(DataError, match="not a dynavit dataset directory"):
        open_dataset(tmp_path)
    with pytest.raises(DataError, match="not a dynavit dataset directory"):
        open_dataset(tmp_path / "missing")
    assert open_dataset(tiny).grid == (8, 8)


def test_argument_errors_list_what_is_available(tiny):
    with pytest.raises(DataError, match=r"available K: 50, 25"):
        build_loader(tiny, "val", k=70, batch_size=4, train=False)
    with pytest.raises(DataError, match=r"no scorer 'sobel' \(available: l2\)"):
        build_loader(tiny, "val", k=50, scorer="sobel", batch_size=4, train=False)
    with pytest.raises(DataError, match=r"no split 'test' \(available: train, val\)"):
        build_loader(tiny, "test", k=50, batch_size=4, train=False)
    with pytest.raises(DataError, match="fewer than one step"):
        build_loader(tiny, "train", k=50, batch_size=8, world_size=4, rank=0)
    for bad in (30, 36, 0):
        with pytest.raises(DataError, match="multiple of the patch size"):
            build_loader(tiny, "val", k=50, batch_size=4, train=False, input_size=bad)
    # K not indexed is fine where the stored sets are not used
    assert build_loader(tiny, "val", k=70, select="random", batch_size=4, train=False).kept == k_of(70)


def k_of(k, n=N):
    return max(1, k * n // 100)


# --- reading -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)])
def test_eval_reads_every_sample_exactly_once(tiny, world_size, workers):
    # val has 2 shards: world_size 3 exercises the split by sample instead of by shard.
    want, rows = stored(tiny, "val"), ok_rows(tiny, "val")
    seen = []
    for rank in range(world_size):
        loader = build_loader(tiny, "val", k=50, batch_size=5, train=False, workers=workers,
                              rank=rank, world_size=world_size)
        batches = drain(loader)
        assert len(batches) == loader.steps == len(loader)
        for key, image, keep, label in samples_of(batches):
            seen.append(key)
            assert label == rows[key]["label"] == want[key]["label"]
            np.testing.assert_array_equal(image, want[key]["image"])
            np.testing.assert_array_equal(keep, want[key]["k50"].astype(np.int64))
        for b in batches:
            assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32)
            assert b.keep_idx.dtype == torch.int64 and b.labels.dtype == torch.int64
    assert sorted(seen) == sorted(rows)  # each key once across all ranks


def test_eval_keeps_the_last_partial_batch(tiny):
    sizes = [len(b) for b in build_loader(tiny, "val", k=25, batch_size=5, train=False)]
    assert sizes == [5, 5, 2]  # shards of 10 and 2, one process


# --- flips ---------------------------------------------------------------------------------

def test_hflip_indices_by_hand():
    # grid width 4: (0,0)->(0,3)=3, (1,1)->(1,2)=6, (1,3)->(1,0)=4; re-sorted
    np.testing.assert_array_equal(hflip_indices(np.array([0, 5, 7], np.uint8), 4), [3, 4, 6])
    np.testing.assert_array_equal(hflip_indices(np.array([[0, 1], [2, 3]]), 2), [[0, 1], [2, 3]])


def _scores(images):
    try:
        from dynavit.pipeline.saliency import score_patches
        return score_patches(images, 4, "l2")
    except ImportError:  # the scorer module is optional for this test
        return np.stack([patch_std_scores(im, 4) for im in images])


def test_flip_remap_equals_scoring_the_flipped_image():
    img = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 8x12 grid
    scores = _scores(img[None])
    assert len(np.unique(scores)) == scores.size  # no ties: the top-K set is unique
    flipped = _scores(np.ascontiguousarray(img[:, ::-1])[None])
    for k in (10, 25, 50, 70):
        direct = select_topk(flipped, k)[0]
        remapped = hflip_indices(select_topk(scores, k)[0], 12)
        np.testing.assert_array_equal(direct, remapped)


def test_loader_flips_pixels_and_remaps_indices(tiny):
    want = stored(tiny, "train")
    flips = Counter()
    loader = build_loader(tiny, "train", k=50, batch_size=4, seed=1)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for key, image, keep, _ in samples_of(loader):
            ref, idx = want[key]["image"], want[key]["k50"]
            if np.array_equal(image, ref):
                np.testing.assert_array_equal(keep, idx)
                flips[False] += 1
            else:
                np.testing.assert_array_equal(image, np.fliplr(ref))
                np.testing.assert_array_equal(keep, hflip_indices(idx, 8))
                flips[True] += 1
    assert flips[True] > 0 and flips[False] > 0

    no_flip = build_loader(tiny, "train", k=50, batch_size=4, seed=1, flip=False)
    for key, image, keep, _ in samples_of(no_flip):
        np.testing.assert_array_equal(image, want[key]["image"])


# --- crops ---------------------------------------------------------------------------------

def _find_window(image, ref, patch=4):
    """The patch-aligned (r0, c0, flipped) at which `image` was cut from `ref`."""
    h, w, _ = image.shape
    found = [(r, c, f) for r in range(0, ref.shape[0] - h + 1, patch) for c in range(0, ref.shape[1] - w + 1, patch)
             for f in (False, True)
             if np.array_equal(image, np.fliplr(ref[r:r + h, c:c + w]) if f else ref[r:r + h, c:c + w])]
    assert len(found) == 1, found
    r, c, f = found[0]
    return r // patch, c // patch, f


@pytest.mark.parametrize("train", [True, False])
def test_crop_takes_a_window_and_reselects_topk(large, train):
    want = stored(large, "train")
    loader = build_loader(large, "train", k=30, batch_size=4, input_size=32, train=train, seed=5)
    assert loader.input_size == (32, 32) and loader.kept == k_of(30)
    windows, flips = set(), set()
    for key, image, keep, _ in samples_of(loader):
        r0, c0, flipped = _find_window(image, want[key]["image"])
        windows.add((r0, c0))
        flips.add(flipped)
        window_scores = want[key]["scores"][r0:r0 + 8, c0:c0 + 8]
        expect = select_topk(window_scores[None], 30)[0].astype(np.int64)
        np.testing.assert_array_equal(keep, hflip_indices(expect, 8) if flipped else expect)
    if train:
        assert len(windows) > 1 and flips == {False, True}
    else:
        assert windows == {(2, 2)} and flips == {False}  # centred, no flip in eval


def test_crop_with_stored_size_input_is_not_a_crop(large):
    with pytest.raises(DataError, match="available K"):
        build_loader(large, "val", k=30, batch_size=4, input_size=48, train=False)


# --- selection modes -----------------------------------------------------------------------

def test_center_indices_by_hand():
    # 3x3, K=50 -> 4 patches: the centre (4), then the four at distance 1 (1, 3, 5, 7) by index
    np.testing.assert_array_equal(center_indices((3, 3), 4), [1, 3, 4, 5])
    np.testing.assert_array_equal(center_indices((4, 4), 4), [5, 6, 9, 10])
    # 2x4: centre between (0,1),(0,2),(1,1),(1,2)
    np.testing.assert_array_equal(center_indices((2, 4), 4), [1, 2, 5, 6])


def test_select_center(tiny):
    block = [r * 8 + c for r in range(2, 6) for c in range(2, 6)]  # 8x8, K=25 -> the 4x4 centre
    for b in build_loader(tiny, "val", k=25, select="center", batch_size=5, train=False):
        assert b.keep_idx.shape == (len(b), 16)
        assert (b.keep_idx == torch.tensor(block)).all()


def test_select_dense(tiny):
    for kw in (dict(k=50, select="dense"), dict(k=100)):
        loader = build_loader(tiny, "val", batch_size=5, train=False, **kw)
        assert loader.kept is None
        assert all(b.keep_idx is None for b in loader)


def test_select_random_shape_and_determinism(tiny):
    def run(epoch, seed=0):
        loader = build_loader(tiny, "val", k=10, select="random", batch_size=12, train=False, seed=seed)
        loader.set_epoch(epoch)
        (b,) = list(loader)
        return b.keep_idx

    a = run(0)
    assert a.shape == (12, k_of(10))
    assert (a.diff(dim=1) > 0).all() and a.min() >= 0 and a.max() < N
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1)) and not torch.equal(a, run(0, seed=1))
    assert len({tuple(row.tolist()) for row in a}) > 1  # per sample, not one set for all


# --- equal steps across ranks ----------------------------------------------------------------

def _shard_of(key):
    return int(key) // 10  # make_tiny_dataset: shard_size 10


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_runs_the_same_number_of_steps(tiny, world_size):
    # train shards hold 10, 10, 4 samples; ranks share samples, never shards whole
    batch = 4
    steps = 24 // (world_size * batch)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            loader = build_loader(tiny, "train", k=50, batch_size=batch, rank=rank, world_size=world_size, seed=7)
            loader.set_epoch(epoch)
            batches = drain(loader)
            assert loader.steps == len(loader) == steps == len(batches)
            assert all(len(b) == batch for b in batches)
            per_rank.append({key for b in batches for key in b.keys})
        for i in range(world_size):
            for j in range(i + 1, world_size):
                assert not per_rank[i] & per_rank[j]
        assert len(set().union(*per_rank)) == steps * batch * world_size  # only the tail is dropped


def test_rank_partition_changes_across_epochs(tiny):
    loaders = [build_loader(tiny, "train", k=50, batch_size=4, rank=r, world_size=3, seed=7) for r in range(3)]
    partitions = set()
    for epoch in range(4):
        owned = []
        for loader in loaders:
            loader.set_epoch(epoch)
            owned.append(frozenset(k for b in loader for k in b.keys))
        assert sum(len(o) for o in owned) == len(frozenset().union(*owned)) == 24  # 24 = 3 ranks x 2 x 4
        partitions.add(tuple(owned))
    assert len(partitions) == 4


def _keys(loader, epoch):
    loader.set_epoch(epoch)
    return [b.keys for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_and_epoch_same_batches(tiny, workers):
    def loader(seed=3):
        return build_loader(tiny, "train", k=50, batch_size=4, seed=seed, workers=workers)

    a, b = loader(), loader()
    assert a.workers == workers
    first = list(a)
    again = list(b)
    assert [x.keys for x in first] == [x.keys for x in again]
    for x, y in zip(first, again):
        assert torch.equal(x.images, y.images) and torch.equal(x.keep_idx, y.keep_idx)
        assert torch.equal(x.labels, y.labels)
    assert _keys(a, 1) != _keys(a, 0)
    assert _keys(a, 1) == _keys(b, 1)
    assert _keys(loader(seed=4), 0) != _keys(a, 0)


def test_rank_with_one_small_shard_cycles(tiny):
    # 3 ranks: one of them owns only the 4-sample shard yet must give 2 batches of 4.
    sizes = []
    for rank in range(3):
        loader = build_loader(tiny, "train", k=50, batch_size=4, rank=rank, world_size=3, workers=2)
        sizes.append([len(b) for b in loader])
    assert sizes == [[4, 4]] * 3


# --- bad data ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_key_mismatch_names_both_shards(scratch, workers):
    rewrite_tar(scratch / "train/topk-l2-000000.tar", lambda s: s[::-1])
    with pytest.raises(DataError) as e:
        drain(build_loader(scratch, "train", k=50, batch_size=4, train=False, workers=workers))
    assert "images-000000.tar" in str(e.value) and "topk-l2-000000.tar" in str(e.value)
    assert "0000000009" in str(e.value)
    assert "\n" not in str(e.value)  # one line, also when raised in a DataLoader worker


@pytest.mark.parametrize("workers", [0, 2])
def test_key_mismatch_skipped_and_counted(scratch, workers):
    rewrite_tar(scratch / "train/topk-l2-000000.tar", lambda s: s[::-1])
    loader = build_loader(scratch, "train", k=50, batch_size=4, train=False, workers=workers, skip_bad_samples=True)
    batches = drain(loader)
    keys = {k for b in batches for k in b.keys}
    assert keys == {f"{i:010d}" for i in range(10, 24)}
    assert loader.skipped == sum(b.skipped for b in batches) == 10


def _corrupt_index(sample_key, how):
    def transform(samples):
        out = []
        for key, members in samples:
            if key == sample_key:
                idx = npy_load(members["k50.npy"]).copy()
                if how == "out of range":
                    idx[-1] = N
                elif how == "not increasing":
                    idx[1] = idx[0]
                else:
                    idx = idx[:-1]
                members = {**members, "k50.npy": npy_bytes(idx)}
            out.append((key, members))
        return out
    return transform


@pytest.mark.parametrize("how", ["out of range", "not increasing", "wrong length"])
def test_bad_indices(scratch, how):
    rewrite_tar(scratch / "val/topk-l2-000000.tar", _corrupt_index("0000000003", how))
    with pytest.raises(DataError) as e:
        drain(build_loader(scratch, "val", k=50, batch_size=4, train=False))
    assert "topk-l2-000000.tar" in str(e.value) and "0000000003" in str(e.value)
    # K=25 does not read the bad array
    assert len({k for b in build_loader(scratch, "val", k=25, batch_size=4, train=False) for k in b.keys}) == 12
    loader = build_loader(scratch, "val", k=50, batch_size=4, train=False, skip_bad_samples=True)
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == 11 and "0000000003" not in keys and loader.skipped == 1


def test_undecodable_image(scratch):
    def transform(samples):
        return [(k, {**m, "png": b"not a png"} if k == "0000000004" else m) for k, m in samples]

    rewrite_tar(scratch / "val/images-000000.tar", transform)
    with pytest.raises(DataError, match=r"images-000000.tar: sample '0000000004'"):
        drain(build_loader(scratch, "val", k=50, batch_size=4, train=False))
    loader = build_loader(scratch, "val", k=50, batch_size=4, train=False, skip_bad_samples=True)
    assert sum(len(b) for b in loader) == 11 and loader.skipped == 1


def test_truncated_tar(scratch):
    path = scratch / "train/images-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(DataError, match="images-000001.tar"):
        drain(build_loader(scratch, "train", k=50, batch_size=4, train=False))
    loader = build_loader(scratch, "train", k=50, batch_size=4, train=False, skip_bad_samples=True)
    keys = {k for b in loader for k in b.keys}
    assert set(range(10)) | set(range(20, 24)) <= {int(k) for k in keys} and len(keys) < 24
    assert loader.skipped == 24 - len(keys)
    # train keeps running its full epoch, counting the skips
    train = build_loader(scratch, "train", k=50, batch_size=4, skip_bad_samples=True)
    assert len(drain(train)) == train.steps and train.skipped > 0


def test_shard_shorter_than_its_manifest(scratch):
    # cut exactly at a sample boundary: the tar reads cleanly, the count gives it away
    for name in ("images-000000.tar", "topk-l2-000000.tar"):
        rewrite_tar(scratch / "train" / name, lambda s: s[:-2])
    with pytest.raises(DataError, match=r"8 samples, shards.parquet says 10"):
        drain(build_loader(scratch, "train", k=50, batch_size=4, train=False))


def test_missing_shard_file(scratch):
    (scratch / "val/topk-l2-000001.tar").unlink()
    with pytest.raises(DataError, match="topk-l2-000001.tar: shard file missing"):
        drain(build_loader(scratch, "val", k=50, batch_size=4, train=False))


def test_all_bad_rank_does_not_hang(scratch):
    for shard in range(3):
        rewrite_tar(scratch / f"train/topk-l2-{shard:06d}.tar", lambda s: s[::-1])
    loader = build_loader(scratch, "train", k=50, batch_size=4, skip_bad_samples=True)
    with pytest.raises(DataError, match="only 0 of 6 batches"):
        drain(loader)


# --- device side ---------------------------------------------------------------------------

def test_normalize_and_batch_to():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.device == x.device
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    b = Batch(x, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), ["a", "b"])
    assert b.to("cpu").images is x or torch.equal(b.to("cpu").images, x)
    assert Batch(x, None, b.labels, b.keys).to("cpu").keep_idx is None
