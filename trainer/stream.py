"""`--stream`: train from tar streams (http(s)://, s3://, gs://, local files, a `pipe:` given
on the command line) without a local copy of the image tars, on webdataset's tar reader, key
grouping and shuffle buffer. The random-access loader (data.py) copies a remote tar into a
cache first; this one reads every tar once per epoch, front to back.

    manifest.parquet + shards.parquet ─ SampleTable (no tar opened at start)
    epoch e: shard order = seeded permutation of (seed, e) (train) | file order (eval)
    rank r takes shards r, r+W, … of that order (webdataset's split_by_node rule), and
      DataLoader worker w of the rank takes the rank's shards w, w+Nw, … (split_by_worker)
    a worker reads its image tar and index tar in lockstep (same keys, same order: the
      manifest's), checks both keys and the image size against the manifest, passes the
      pairs through a shuffle buffer seeded by (seed, e, r, w), and stops after its quota
    batches ─ BatchReader (decode, crop, select, flip exactly as the random-access loader)

Equal steps: every rank runs `steps = n // (W · B)` steps, as the random-access loader, with
n the split's ok samples in the manifest. Ranks (and workers) hold whole shards, so their
sample counts differ; the rank's steps are shared among its workers in proportion to the
samples of their shards, and a worker whose shards hold fewer samples than its quota reads
them again (another order) until it has, and one whose shards hold more is cut short. When
every worker's shards hold exactly its quota (equal shards, each worker's share a multiple of
B), an epoch visits every sample exactly once: the random-access loader's epoch set.

An epoch is a pure function of (seed, epoch, rank, world size, workers, buffer): resuming at
an epoch boundary replays it. Unlike the random-access loader's order, it depends on
--workers (each worker's shard share is its own stream).

Locations are data (manifests/locations.py): the image tars lie under --images-root (the
user's own, may be a URL or a pipe: command) or else under the dataset folder (ours) or
dataset.json's images_root (a user's WebDataset; a URL only with --trust-dataset-urls). A
`pipe:` command read from the dataset folder is never run here, trusted or not; under a
pipe: root a shard name must be a plain relative path ([A-Za-z0-9._/-]: locations.under).
Index tars are always local, under the dataset folder.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds  # here, not in the workers: imported once before they fork, not once each

from dynavit.manifests import DatasetInfo, FormatError, locations
from dynavit.manifests.inputs import open_regular
from dynavit.manifests.io import LOADER_COLUMNS, read_manifest, read_shards
from dynavit.manifests.schema import DATASET_JSON, IMAGE_EXTS, SHARDS_PARQUET, STATUS_OK
from dynavit.manifests.samples import SampleTable, Shard
from dynavit.manifests.shards import UNLABELED
from dynavit.manifests.tar import split_name

from dynavit.trainer.batch import Batch, DataError
from dynavit.trainer.loader import Loader
from dynavit.trainer.reader import BatchReader, ReadPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamShard:
    images: str  # where its image tar is read from (a path or a URL)
    index: str   # its index tar (a local path)
    first: int   # table row of its first sample
    count: int


# --- where the tars are ----------------------------------------------------------------------

def shard_locations(dataset_dir, info: DatasetInfo, row: dict, index_rel: str, images_root: str | None,
                    trust_urls: bool) -> tuple[str, str]:
    """(image tar, index tar) of a shards.parquet row, checked as data (see the module doc)."""
    what = f"{SHARDS_PARQUET} (shard {row['split']}/{row['shard']})"
    folder = str(Path(dataset_dir).absolute())
    rel = str(row["images"])
    if rel.startswith("pipe:"):
        raise locations.UnsafeLocationError(f"{what} names a command ({rel[:80]!r}); --stream runs none read from "
                                            f"a dataset folder (give the location as --images-root)")
    if images_root:
        root = images_root
    elif info.external_images:
        locations.check_root(info.images_root, DATASET_JSON, trust_urls)
        root = info.images_root or ""
        if root.startswith("pipe:"):
            raise locations.UnsafeLocationError(f"{DATASET_JSON}'s images_root is a command; --stream runs none "
                                                f"read from a dataset folder (give it as --images-root)")
    else:
        root = folder
    images = locations.under(root, rel, what, trust_urls)
    return images, locations.under(folder, index_rel, what)


def stream_table(dataset_dir, info: DatasetInfo, split: str, scorer: str, images_root: str | None = None,
                 trust_urls: bool = False) -> tuple[SampleTable, list[StreamShard]]:
    """The split's ok samples in file order, and its shards, from the two Parquet tables
    alone (only the columns needed): no tar is opened here."""
    try:
        rows = sorted((r for r in read_shards(dataset_dir).to_pylist() if r["split"] == split),
                      key=lambda r: r["shard"])
        manifest = read_manifest(dataset_dir, LOADER_COLUMNS)  # the random-access loader's: one cached read
    except (FormatError, OSError) as e:
        raise DataError(str(e)) from None
    import pyarrow.compute as pc

    manifest = manifest.filter(pc.and_(pc.equal(manifest["split"], split), pc.equal(manifest["status"], STATUS_OK)))
    shard_of = manifest["shard"].to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    order = np.argsort(shard_of, kind="stable")  # file order within a shard
    keys_all = manifest["key"].to_pylist()
    labels = manifest["label"].fill_null(UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)[order]
    sizes = manifest["image_bytes"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[order]
    shard_of = shard_of[order]
    shards, streams, first = [], [], 0
    row_shard = np.zeros(len(order), np.int32)
    for row in rows:
        paths = {e["scorer"]: e["path"] for e in row["index"]}
        if scorer not in paths:
            raise DataError(f"{SHARDS_PARQUET}: shard {split}/{row['shard']} has no index shard for scorer {scorer!r}")
        count = int(np.searchsorted(shard_of, row["shard"], "right") - np.searchsorted(shard_of, row["shard"]))
        if count != row["count"]:
            raise DataError(f"{dataset_dir}: shard {split}/{row['shard']}: manifest.parquet has {count} ok samples, "
                            f"shards.parquet says {row['count']}")
        if count == 0:
            continue
        try:
            images, index = shard_locations(dataset_dir, info, row, paths[scorer], images_root, trust_urls)
        except locations.UnsafeLocationError as e:
            raise DataError(f"{dataset_dir}: {e}") from None
        row_shard[first:first + count] = len(shards)
        shards.append(Shard(images, index, None))
        streams.append(StreamShard(images, index, first, count))
        first += count
    if first != len(order):
        raise DataError(f"{dataset_dir}: manifest.parquet has {len(order) - first} ok {split} samples in shards "
                        f"that shards.parquet does not list")
    pos = np.concatenate([np.arange(s.count) for s in streams]).astype(np.int32) if streams else np.zeros(0, np.int32)
    table = SampleTable(shards, [keys_all[j] for j in order.tolist()], row_shard, pos,
                        np.full(len(order), -1, np.int64), sizes, labels, [])
    return table, streams


# --- reading one shard pair --------------------------------------------------------------------

def open_tar(location: str):
    """A binary stream over a tar; a local one is opened as a regular file only."""
    if locations.is_url(location):
        try:
            return locations.open_stream(location)
        except OSError as e:
            raise DataError(f"cannot read {location}: {e}") from None
    try:
        return os.fdopen(open_regular(locations.local_path(location)), "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise DataError(f"{location}: shard file missing") from None
    except OSError as e:
        raise DataError(f"{location}: {e.strerror or e}") from None


def tar_samples(stream, url: str) -> Iterator[dict]:
    """webdataset's reading of a tar stream: members grouped into samples by key (our
    split_name is webdataset's base_plus_ext rule, metadata members left out)."""
    files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
    return wds.tariterators.group_by_keys(files, keys=split_name)


class StreamBroken(Exception):
    """A shard stream that cannot go on (unreadable, truncated, keys out of step); `done`
    samples of it were delivered."""

    def __init__(self, message: str, done: int):
        super().__init__(message)
        self.done = done


def shard_samples(shard: StreamShard, table: SampleTable, external: bool) -> Iterator[tuple[int, bytes | str, dict]]:
    """(table row, image bytes, index members) per sample of one shard pair, in file order.
    A sample-level problem comes as (row, message, {}); a stream-level one raises StreamBroken."""
    streams, done = [], 0
    try:
        streams = [open_tar(shard.images), open_tar(shard.index)]
        images, index = tar_samples(streams[0], shard.images), tar_samples(streams[1], shard.index)
        for pos in range(shard.count):
            i = shard.first + pos
            key = table.keys[i]
            members = next(index, None)
            if members is None or members["__key__"] != key:
                got = "the end of the tar" if members is None else repr(members["__key__"])
                raise StreamBroken(f"{shard.index}: sample {pos} is {got}, manifest.parquet has {key!r}", done)
            sample = _next_image(images, key, shard, pos, external, done)
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            size = int(table.size[i])
            if ext is None:
                yield i, f"{shard.images}: sample {key!r}: no image member", {}
            elif size >= 0 and len(sample[ext]) != size:
                yield i, (f"{shard.images}: sample {key!r}: {len(sample[ext])} bytes, manifest.parquet says {size} "
                          f"(shard changed since indexing? `dynaprep verify` checks it)"), {}
            else:
                yield i, sample[ext], members
            done += 1
    except (StreamBroken, GeneratorExit):
        raise
    except DataError as e:
        raise StreamBroken(str(e), done) from None
    except Exception as e:  # a broken connection, a truncated or corrupt tar: this shard's problem
        where = f"{shard.images} / {shard.index}"
        raise StreamBroken(f"{where}: stream failed after {done} samples: {str(e).splitlines()[0][:200]}", done) \
            from None
    finally:
        for s in streams:
            try:
                s.close()
            except Exception:  # an early close of a pipe: its status says nothing about the data read
                pass


def _next_image(images: Iterator[dict], key: str, shard: StreamShard, pos: int, external: bool, done: int) -> dict:
    """The image tar's next sample of `key`. A user's WebDataset may hold samples that failed
    indexing (not in the manifest): those are passed over; ours holds exactly the manifest's."""
    for sample in images:
        if sample["__key__"] == key:
            return sample
        if not external:
            raise StreamBroken(f"{shard.images}: keys differ from manifest.parquet at sample {pos}: "
                               f"{sample['__key__']!r} vs {key!r}", done)
    raise StreamBroken(f"{shard.images}: ends before sample {key!r} (sample {pos} of {shard.count})", done)


class StreamReader(BatchReader):
    """BatchReader over samples already read from the streams: the same decode, crop,
    selection and flips, from bytes in hand instead of preads."""

    def build(self, items: list, epoch: int, skipped: int = 0) -> Batch:
        self._current = {i: (data, members) for i, data, members in items}
        try:
            batch = self([i for i, _, _ in items], epoch)
        finally:
            self._current = {}
        batch.skipped += skipped
        return batch

    def _image_bytes(self, i: int, shard: Shard) -> bytes:
        data = self._current[i][0]
        if isinstance(data, str):
            raise DataError(data)
        return data

    def _index_member(self, i: int, shard: Shard, key: str, ext: str) -> bytes:
        members = self._current[i][1]
        if ext not in members:
            raise KeyError(f"no {ext}")
        return members[ext]


# --- who reads what (pure functions) -------------------------------------------------------------

def epoch_order(n_shards: int, seed: int, epoch: int, train: bool) -> list[int]:
    """The shard order of an epoch, alike on every rank: a seeded permutation in training."""
    if not train:
        return list(range(n_shards))
    return np.random.default_rng([seed & (2**64 - 1), epoch, 1]).permutation(n_shards).tolist()


def split_shards(order: list[int], rank: int, world_size: int, worker: int, workers: int) -> list[int]:
    """Rank r's shards are order[r::W] (webdataset's split_by_node), its worker w's are the
    rank's [w::Nw] (split_by_worker)."""
    return order[rank::world_size][worker::max(1, workers)]


def quotas(sizes: list[int], steps: int) -> list[int]:
    """`steps` batches shared among workers in proportion to the samples of their shards
    (largest remainder, ties to the lower worker): the fewest repeated samples."""
    total = sum(sizes)
    if total <= 0:
        return [steps // len(sizes) + (w < steps % len(sizes)) for w in range(len(sizes))]
    exact = [steps * s / total for s in sizes]
    out = [math.floor(x) for x in exact]
    for w in sorted(range(len(sizes)), key=lambda w: (-(exact[w] - out[w]), w))[:steps - sum(out)]:
        out[w] += 1
    return out


def expected_distinct(class_counts, batch: int) -> float:
    """Expected number of distinct classes in a batch of `batch` samples drawn uniformly at
    random without replacement from a split with these per-class counts (hypergeometric:
    class c is absent with probability C(N − n_c, b) / C(N, b))."""
    counts = [int(c) for c in class_counts if c > 0]
    n = sum(counts)
    b = min(batch, n)

    def log_comb(a: int, k: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)

    return sum(1.0 - (math.exp(log_comb(n - c, b) - log_comb(n, b)) if n - c >= b else 0.0) for c in counts)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


# --- the loader ---------------------------------------------------------------------------------

class _StreamEpoch(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker iterates its own share."""

    def __init__(self, loader: "StreamLoader", epoch: int):
        self.loader, self.epoch = loader, epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.loader.worker_batches(self.epoch, worker, workers)


class StreamLoader(Loader):
    """Loader's interface (steps, set_epoch, iteration, skipped) over tar streams."""

    def __init__(self, table: SampleTable, shards: list[StreamShard], plan: ReadPlan, info: DatasetInfo, *,
                 batch_size: int, workers: int, rank: int, world_size: int, pin_memory: bool, buffer: int):
        super().__init__(table, plan, info, batch_size=batch_size, workers=workers, rank=rank,
                         world_size=world_size, pin_memory=pin_memory)
        self.reader = StreamReader(table, plan)
        self.stream_shards, self.buffer = shards, buffer
        mine = len(range(rank, len(shards), world_size))
        # Whole shards per worker: no more workers than the rank's fewest shards.
        self.workers = min(workers, len(shards) // world_size if plan.train else mine)
        if plan.train and self.workers < workers and rank == 0:
            log.warning("notice: --stream runs %d of the %d workers asked for: each reads whole shards, and each "
                        "of the %d rank(s) has %d or more of the %d", self.workers, workers, world_size,
                        len(shards) // world_size, len(shards))
        if not plan.train:  # every sample of the rank's shards once, a partial batch per worker
            self.steps = sum(math.ceil(sum(shards[s].count for s in split_shards(list(range(len(shards))), rank,
                                                                                 world_size, w, self.workers))
                                       / batch_size) for w in range(max(1, self.workers)))
        self.class_mix: dict | None = None

    def _batch_iter(self, pin: bool) -> Iterator[Batch]:
        epoch = _StreamEpoch(self, self.epoch)
        if self.workers > 0:  # a generator of its own, as the random-access loader (its note)
            return iter(torch.utils.data.DataLoader(epoch, batch_size=None, num_workers=self.workers,
                                                    pin_memory=pin, generator=torch.Generator()))
        return iter(epoch)

    def __iter__(self) -> Iterator[Batch]:
        distinct, batches = [], super().__iter__()
        try:
            for batch in batches:
                distinct.append(len(set(batch.labels.tolist()) - {UNLABELED}))
                yield batch
        finally:
            batches.close()  # stopped early (--accum-steps): its workers stop now
        if self.plan.train and distinct:
            labels = self.table.label[self.table.label >= 0]
            self.class_mix = {"epoch": self.epoch, "batches": len(distinct), "batch_size": self.batch_size,
                              "distinct": float(np.mean(distinct)), "classes": int(len(np.unique(labels))),
                              "random": expected_distinct(np.bincount(labels), self.batch_size)}

    def class_mix_line(self) -> str | None:
        m = self.class_mix
        if not m:
            return None
        return (f"stream: epoch {m['epoch'] + 1} rank {self.rank}: {m['distinct']:.2f} distinct classes per batch "
                f"of {m['batch_size']} on average over {m['batches']} batches (a uniformly random batch: "
                f"{m['random']:.2f} of {m['classes']} classes)")

    def worker_batches(self, epoch: int, worker: int, workers: int) -> Iterator[Batch]:
        """The batches of one worker of this rank in `epoch`."""
        order = epoch_order(len(self.stream_shards), self.plan.seed, epoch, self.plan.train)
        mine = split_shards(order, self.rank, self.world_size, worker, workers)
        skipped = [0]  # samples of broken streams left out, carried by the next batch
        if self.plan.train:
            sizes = [sum(self.stream_shards[s].count for s in split_shards(order, self.rank, self.world_size, w,
                                                                             workers)) for w in range(workers)]
            quota = quotas(sizes, self.steps)[worker] * self.batch_size
            samples = self._train_samples(epoch, worker, mine, skipped)
        else:
            quota, samples = None, itertools.chain.from_iterable(self._shard(s, skipped) for s in mine)
        try:
            items = itertools.islice(samples, quota)
            while chunk := list(itertools.islice(items, self.batch_size)):
                batch, skipped[0] = self.reader.build(chunk, epoch, skipped[0]), 0
                yield batch
        finally:
            samples.close() if hasattr(samples, "close") else None

    def _train_samples(self, epoch: int, worker: int, mine: list[int], skipped: list) -> Iterator:
        """The worker's shards through webdataset's shuffle buffer (filled before the first
        sample leaves it), pass after pass in another order while its quota lasts. Each
        pass is drained before the next starts, so a pass delivers each sample once."""
        rng = random.Random(_seed(self.plan.seed, epoch, self.rank, worker))
        order = list(mine)
        while True:
            delivered = 0
            for item in wds.shuffle(self.buffer, self.buffer, rng=rng)(
                    itertools.chain.from_iterable(self._shard(s, skipped) for s in order)):
                delivered += 1
                yield item
            if not delivered:
                raise DataError(f"rank {self.rank}: no sample of its shards could be read "
                                f"({', '.join(self.stream_shards[s].images for s in order[:3])} …)")
            rng.shuffle(order)

    def _shard(self, s: int, skipped: list) -> Iterator:
        shard = self.stream_shards[s]
        try:
            yield from shard_samples(shard, self.table, self.plan.external_images)
        except StreamBroken as e:
            if not self.plan.skip_bad:
                raise DataError(str(e)) from None
            log.warning("skipping the rest of a shard: %s", e)
            skipped[0] += shard.count - e.done


def build_stream_loader(dataset_dir, info: DatasetInfo, split: str, scorer: str, plan: ReadPlan, *, batch_size: int,
                        workers: int, rank: int, world_size: int, pin_memory: bool, buffer: int,
                        images_root: str | None, trust_urls: bool) -> StreamLoader:
    """data.build_loader's streaming branch (its arguments checked there)."""
    if buffer < 1:
        raise DataError(f"the stream's shuffle buffer must hold at least 1 sample, got {buffer}")
    table, shards = stream_table(dataset_dir, info, split, scorer, images_root, trust_urls)
    if plan.train and len(table) < world_size * batch_size:
        raise DataError(f"{dataset_dir}: split {split!r} has {len(table)} samples, fewer than one step "
                        f"(world size {world_size} × batch size {batch_size})")
    if plan.train and len(shards) < world_size:
        raise DataError(f"{dataset_dir}: split {split!r} has {len(shards)} shard(s), fewer than the {world_size} "
                        f"ranks: --stream gives each rank whole shards (re-index with a smaller --shard-size, or "
                        f"train without --stream)")
    return StreamLoader(table, shards, plan, info, batch_size=batch_size, workers=workers, rank=rank,
                        world_size=world_size, pin_memory=pin_memory, buffer=buffer)


__all__ = ["StreamLoader", "StreamShard", "build_stream_loader", "epoch_order", "expected_distinct", "quotas",
           "shard_locations", "shard_samples", "split_shards", "stream_table"]
