"""Exact, well-mixed epochs on class-sorted shards (the data-order issue).

The dataset is shaped like the real thing: labels in class blocks (as ImageFolder lists
them) written in that order into shards of unequal size (64, 64, 8), so a shard holds a
few classes only. Expectations are computed by hand (exact hypergeometric mean of distinct
classes per random batch), never with the loader under test.
"""
from __future__ import annotations

from collections import Counter
from math import comb

import numpy as np
import pytest

from dynavit.trainer.data import build_loader
from tiny_dataset import make_tiny_dataset

N_TRAIN, N_CLASSES, BATCH = 136, 10, 8


@pytest.fixture(scope="module")
def sorted_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sorted")
    make_tiny_dataset(out, splits=(("train", N_TRAIN), ("val", 20)), shard_size=64, n_classes=N_CLASSES,
                      class_sorted=True, image_size=16)
    return out


def labels_by_key(ds):
    import pyarrow.parquet as pq

    rows = pq.read_table(ds / "manifest.parquet").to_pylist()
    return {r["key"]: r["label"] for r in rows if r["split"] == "train"}


def random_batch_distinct(counts: list[int], n: int, b: int) -> float:
    """E[distinct classes] of a uniformly random b-subset of n samples with class sizes `counts`."""
    return sum(1 - comb(n - c, b) / comb(n, b) for c in counts)


def test_fixture_is_class_sorted_in_unequal_shards(sorted_ds):
    import pyarrow.parquet as pq

    shards = pq.read_table(sorted_ds / "shards.parquet").to_pylist()
    assert [r["count"] for r in shards if r["split"] == "train"] == [64, 64, 8]
    labels = labels_by_key(sorted_ds)
    per_shard = [{labels[f"{i:010d}"] for i in range(s, min(s + 64, N_TRAIN))} for s in (0, 64, 128)]
    assert max(len(c) for c in per_shard) <= 6  # each shard holds about half the classes or fewer


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 1), (1, 2), (2, 0), (2, 2)])
def test_epoch_is_a_permutation_minus_a_tail_and_mixes_classes(sorted_ds, world_size, workers):
    labels = labels_by_key(sorted_ds)
    steps = N_TRAIN // (world_size * BATCH)
    orders = []
    for epoch in (0, 1):
        seen, per_rank_steps, distinct = [], [], []
        for rank in range(world_size):
            loader = build_loader(sorted_ds, "train", k=50, batch_size=BATCH, rank=rank, world_size=world_size,
                                  workers=workers, seed=5)
            loader.set_epoch(epoch)
            batches = list(loader)
            per_rank_steps.append(len(batches))
            for b in batches:
                assert len(b) == BATCH
                seen += b.keys
                distinct.append(len({labels[k] for k in b.keys}))
                assert [labels[k] for k in b.keys] == b.labels.tolist()
        assert per_rank_steps == [steps] * world_size
        counts = Counter(seen)
        assert max(counts.values()) == 1  # no sample twice in an epoch
        assert len(seen) == steps * world_size * BATCH and N_TRAIN - len(seen) < world_size * BATCH
        expected = random_batch_distinct(list(Counter(labels.values()).values()), N_TRAIN, BATCH)
        assert np.mean(distinct) >= 0.9 * expected, (np.mean(distinct), expected)
        # no shard over-sampled: the 8-sample shard's share matches its share of the data
        short = sum(1 for k in seen if int(k) >= 128)
        assert short <= 8
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh permutation each epoch
    assert set(orders[0]) != set(orders[1]) or N_TRAIN % (world_size * BATCH) == 0  # a different tail


def test_order_depends_on_seed_and_epoch_not_on_workers(sorted_ds):
    def keys(seed, workers, epoch=0):
        loader = build_loader(sorted_ds, "train", k=50, batch_size=BATCH, workers=workers, seed=seed)
        loader.set_epoch(epoch)
        return [b.keys for b in loader]

    assert keys(1, 0) == keys(1, 2) == keys(1, 1)
    assert keys(1, 0) != keys(2, 0)
    assert keys(1, 0, epoch=3) == keys(1, 2, epoch=3) != keys(1, 0)


def test_eval_visits_every_sample_once_in_file_order(sorted_ds):
    for world_size in (1, 2):
        seen = []
        for rank in range(world_size):
            loader = build_loader(sorted_ds, "train", k=50, batch_size=BATCH, train=False, rank=rank,
                                  world_size=world_size, workers=2)
            seen.append([k for b in loader for k in b.keys])
        assert sorted(k for s in seen for k in s) == [f"{i:010d}" for i in range(N_TRAIN)]
        for s in seen:
            assert s == sorted(s)


def test_recycled_worker_buffers_give_the_same_batches_when_consumed_in_turn(sorted_ds):
    import torch

    def batches(recycle):
        loader = build_loader(sorted_ds, "train", k=50, batch_size=4, workers=2, seed=3, recycle_buffers=recycle)
        # consumed as the training loop does: each batch used (here: copied) before the next is drawn
        return [(b.keys, b.images.clone(), b.keep_idx.clone()) for b in loader]

    plain, ring = batches(False), batches(True)
    assert len(plain) == 34 > 2 * 8  # more batches per worker than the ring has buffers
    for (ka, ia, xa), (kb, ib, xb) in zip(plain, ring):
        assert ka == kb and torch.equal(ia, ib) and torch.equal(xa, xb)


def test_a_killed_loader_worker_is_a_one_line_data_error_not_a_hang(sorted_ds):
    import os
    import signal
    import time
    from pathlib import Path

    from dynavit.trainer.data import DataError

    def children() -> set[int]:
        me = str(os.getpid())
        out = set()
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    out.add(int(p.name))
            except OSError:  # gone meanwhile
                pass
        return out

    # Only this loader's workers: earlier tests of the session may leave children of their own.
    before = children()
    loader = build_loader(sorted_ds, "train", k=50, batch_size=4, workers=2, seed=3)
    it = iter(loader)
    next(it)
    workers = sorted(children() - before)
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(DataError) as e:
        for _ in it:
            pass
    assert time.time() - t0 < 30
    # torch names the pid; if the worker died mid-send, the receive breaks first and says so
    assert "DataLoader worker" in str(e.value) and "\n" not in str(e.value)
