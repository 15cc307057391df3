"""Shard pairs → batches of uint8 images, kept-patch indices and labels (DESIGN.md §6).

The pipeline is a chain of small webdataset stages, one generator each:

    shard pairs ─ shuffle_shards ─ split_by_node ─ split_by_worker ─ reorder_passes ─ read_pairs
                  (train)          (rank)          (DataLoader)      (train: cycle)   (both tars
                                                                                        in lockstep)
    ─ shuffle_samples ─ decode ─ crop_window ─ select_patches ─ random_flip ─ collate
      (train)                    (input smaller than the stored image: top-K of the window)

Randomness never comes from global state: shard and sample order are seeded by
(seed, epoch, rank, worker), and every per-sample draw (crop window, random selection,
flip) by (seed, epoch, pass, key), so the same seed and epoch give the same batches.

Equal steps on every rank (DDP must not hang on uneven shards): a train epoch is
`steps = samples_in_split // (world_size · batch_size)` batches on every rank. Each rank
cycles over its own shards (a new order per pass) and the loader stops after exactly
`steps` full batches. Shards go to ranks whole (disjoint within an epoch; the partition
is reshuffled every epoch with a permutation every rank computes alike). When there are
fewer non-empty shards than ranks, every rank reads every shard and keeps the samples
whose position in the split is ≡ rank (mod world_size) instead, so no rank is left empty.
Eval reads every sample exactly once across ranks, in order, keeping partial batches;
its `steps` is this rank's own batch count.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import itertools
import logging
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from dynavit.manifests import DatasetInfo, FormatError, k_count, read_dataset_info, read_shards, resolve
from dynavit.manifests.schema import IMAGE_EXTS
from dynavit.pipeline.decode import load_image
from dynavit.pipeline.topk import select_topk

log = logging.getLogger(__name__)

SELECT_MODES = ("saliency", "random", "center", "dense")
UNLABELED = -1  # label of a sample without `.cls` (unlabeled splits)

# Independent per-sample random streams, so that e.g. enabling crops does not change flips.
_CROP, _SELECT, _FLIP = 1, 2, 3


class DataError(Exception):
    """The dataset cannot be read as asked; the message names the file (and key) at fault."""


# --- the dataset directory -----------------------------------------------------------------

def open_dataset(dataset_dir) -> DatasetInfo:
    path = Path(dataset_dir)
    if not path.is_dir():
        raise DataError(f"{dataset_dir}: not a dynavit dataset directory (no such directory)")
    try:
        return read_dataset_info(path)
    except FormatError as e:
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class ShardPair:
    shard: int
    images: str  # absolute paths, so worker processes need no dataset dir
    index: str
    count: int  # samples, from shards.parquet
    offset: int  # position of the shard's first sample in the split
    pass_: int = 0  # which cycle over this rank's shards (train repeats)

    @property
    def names(self) -> str:
        return f"{self.images} / {self.index}"


def _shard_pairs(dataset_dir, info: DatasetInfo, split: str, scorer: str) -> list[ShardPair]:
    try:
        rows = read_shards(dataset_dir).to_pylist()
    except (FormatError, OSError) as e:
        raise DataError(str(e)) from None
    rows = sorted((r for r in rows if r["split"] == split), key=lambda r: r["shard"])
    pairs, offset = [], 0
    for row in rows:
        index = {e["scorer"]: e["path"] for e in row["index"]}
        if scorer not in index:
            raise DataError(f"shards.parquet: shard {split}/{row['shard']} has no index shard for scorer "
                            f"{scorer!r} (has {', '.join(sorted(index)) or 'none'})")
        if row["count"] > 0:  # an all-failed shard would make a rank's stream empty
            pairs.append(ShardPair(row["shard"], str(resolve(dataset_dir, row["images"]).absolute()),
                                   str(resolve(dataset_dir, index[scorer]).absolute()), row["count"], offset))
        offset += row["count"]
    return pairs


# --- batches -------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B,3,H,W], not normalised (that happens on the device)
    keep_idx: torch.Tensor | None  # int64 [B,k], ascending raster indices; None = dense
    labels: torch.Tensor  # int64 [B]; -1 for unlabeled samples
    keys: list[str]
    skipped: int = 0  # bad samples skipped (with skip_bad_samples) while this batch was built

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        # DataLoader's pin-memory thread calls this on objects that define it.
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, f) -> "Batch":
        keep = None if self.keep_idx is None else f(self.keep_idx)
        return dataclasses.replace(self, images=f(self.images), keep_idx=keep, labels=f(self.labels))


def normalize(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(x/255 − mean)/std in float32 on the images' device; works on [B,3,H,W] and [3,H,W]."""
    device = images_uint8.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - m) / s


# --- index arithmetic (pure functions) -----------------------------------------------------

def hflip_indices(indices: np.ndarray, grid_w: int) -> np.ndarray:
    """Raster indices of the same patches after a horizontal flip: r·Gw + c → r·Gw + (Gw−1−c),
    re-sorted so the kept set stays in raster order."""
    idx = np.asarray(indices, dtype=np.int64)
    r, c = np.divmod(idx, grid_w)
    return np.sort(r * grid_w + (grid_w - 1 - c), axis=-1)


@functools.lru_cache(maxsize=64)
def center_indices(grid: tuple[int, int], kept: int) -> np.ndarray:
    """The `kept` patches nearest the grid centre (squared Euclidean distance between patch
    centres, ties to the lower raster index), ascending."""
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    d2 = (2 * r - (gh - 1)) ** 2 + (2 * c - (gw - 1)) ** 2  # doubled coordinates: exact integers
    out = np.sort(np.argsort(d2, kind="stable")[:kept]).astype(np.int64)
    out.flags.writeable = False  # shared by every sample
    return out


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple, bool]:
    """Parsed once per distinct header: every k70.npy of a dataset has the same one, and
    numpy's own parser (ast.literal_eval) costs more per sample than the rest of the stage."""
    d = ast.literal_eval(header[10 if header[6] == 1 else 12:].decode("latin1"))
    return np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"])


def _npy(data: bytes) -> np.ndarray:
    """np.load of a version 1/2 .npy without pickles, with the header parse cached."""
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # let numpy say what is wrong
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran = _npy_header(data[:start])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def _check_indices(idx: np.ndarray, n: int, kept: int) -> str | None:
    """What is wrong with a stored index array, or None."""
    if idx.ndim != 1 or len(idx) != kept:
        return f"has shape {list(idx.shape)}, expected [{kept}]"
    if not np.issubdtype(idx.dtype, np.integer):
        return f"has dtype {idx.dtype}, expected an integer type"
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= n:
        return f"has an index outside 0..{n - 1} (min {idx.min()}, max {idx.max()})"
    if np.any(np.diff(idx) <= 0):
        return "is not strictly increasing"
    return None


def _sample_rng(seed: int, epoch: int, sample: dict, purpose: int) -> np.random.Generator:
    # Keyed by the sample, not by its position in the stream: a sample gets the same draws
    # whatever the number of workers or ranks; a second pass over it in one epoch differs.
    digest = hashlib.blake2b(sample["__key__"].encode(), digest_size=8).digest()
    return np.random.default_rng([seed & (2**64 - 1), epoch, sample["__pass__"],
                                  int.from_bytes(digest, "little"), purpose])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Skips:
    """Bad samples skipped in this process since the last batch. Each DataLoader worker has
    its own copy; the count rides along in Batch.skipped and the Loader sums it."""

    def __init__(self):
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def _bad(message: str, skip: bool, skips: _Skips, n: int = 1) -> None:
    if not skip:
        raise DataError(message)
    skips.n += n
    log.warning("skipping %d sample(s): %s", n, message)


# --- shard-level stages --------------------------------------------------------------------

def shuffle_shards(pairs, seed: int, epoch: int):
    # Before the node split and alike on every rank: the partition stays disjoint, and each
    # epoch gives every rank different shards.
    pairs = list(pairs)
    random.Random(f"shards/{seed}/{epoch}").shuffle(pairs)
    yield from pairs


def split_by_node(pairs, rank: int, world_size: int):
    # Explicit rank rather than wds.split_by_node: that one reads torch.distributed or $RANK.
    yield from itertools.islice(pairs, rank, None, world_size)


class reorder_passes(wds.PipelineStage):
    """A fresh order of this worker's shards on every pass of a repeated (train) stream, with
    the pass number attached. Stateful like wds.detshuffle: DataPipeline.repeat() runs it
    once per pass, and each worker holds its own copy."""

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.passes = 0

    def run(self, pairs):
        pairs, p = list(pairs), self.passes
        self.passes += 1
        worker, _ = _worker()
        if p > 0:  # pass 0 keeps the epoch's shard shuffle
            random.Random(f"passes/{self.seed}/{self.epoch}/{self.rank}/{worker}/{p}").shuffle(pairs)
        return iter([dataclasses.replace(pair, pass_=p) for pair in pairs])


# --- reading a shard pair in lockstep ------------------------------------------------------

def _ustar_members(stream, path: str):
    """(name, bytes) of each regular file of a plain USTAR tar, the format TarWriter writes.

    Python's tarfile spends more time per member than decoding a 224² JPEG takes (~50 µs per
    header); an index shard has 2 + len(ks) members per sample. Anything this does not
    understand (pax/GNU headers, a bad checksum) is an error, never a guess."""
    while True:
        h = stream.read(512)
        if not h or h == bytes(512):  # end of archive (or a shard cut between members)
            return
        if len(h) < 512:
            raise DataError(f"{path}: unreadable tar (truncated header)")
        if h[257:262] != b"ustar" or int(h[148:156].split(b"\0")[0] or b"0", 8) != sum(h[:148]) + 256 + sum(h[156:]):
            raise DataError(f"{path}: unreadable tar (not a plain USTAR header at offset {stream.tell() - 512})")
        size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
        data = stream.read(size)
        if len(data) < size:
            raise DataError(f"{path}: unreadable tar (truncated member)")
        stream.read(-size % 512)
        if h[156:157] in (b"0", b"\0"):
            name, prefix = h[:100].split(b"\0")[0], h[345:500].split(b"\0")[0]
            yield (prefix + b"/" + name if prefix else name).decode("utf-8"), data


def _fast_tar_samples(path: str):
    """Our own shards: group USTAR members by webdataset's key rule (name up to the first dot
    of the basename, suffixes lower-cased), into webdataset-style sample dicts."""
    try:
        with open(path, "rb") as stream:
            sample = None
            for name, data in _ustar_members(stream, path):
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                if dot < 0:
                    continue  # webdataset drops members without a suffix too
                key, ext = name[:dot], name[dot + 1:].lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": path}
                elif ext in sample:
                    raise DataError(f"{path}: unreadable tar (duplicate member {name!r})")
                sample[ext] = data
            if sample is not None:
                yield sample
    except FileNotFoundError:
        raise DataError(f"{path}: shard file missing") from None


def _tar_samples(path: str, ours: bool = True):
    """One tar's samples; errors name the file. A user's own WebDataset (`ours=False`) goes
    through webdataset's expansion, which knows every tar dialect."""
    if ours:
        yield from _fast_tar_samples(path)
        return
    try:
        with open(path, "rb") as stream:
            files = tariterators.tar_file_expander([{"url": path, "stream": stream}])
            yield from tariterators.group_by_keys(files)
    except FileNotFoundError:
        raise DataError(f"{path}: shard file missing") from None
    except Exception as e:  # a truncated or corrupt tar raises tarfile/EOF errors of several kinds
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # wds appends the stream
        raise DataError(f"{path}: unreadable tar ({reason})") from None


def read_pairs(pairs, *, skip_bad: bool, skips: _Skips, sample_split: tuple[int, int] | None = None,
               extra_images: bool = False):
    """Zip each image shard with its index shard, key by key.

    `sample_split` = (rank, world_size) keeps only this rank's samples (every rank reads
    every shard). `extra_images`: the image shard is the user's own WebDataset, which also
    holds the samples that failed at indexing time; those are passed over.
    """
    for pair in pairs:
        def mine(pos: int) -> bool:
            return sample_split is None or (pair.offset + pos) % sample_split[1] == sample_split[0]

        images, index = _tar_samples(pair.images, ours=not extra_images), _tar_samples(pair.index)
        pos = 0
        try:
            for idx_sample in index:
                img_sample = next(images, None)
                while extra_images and img_sample is not None and img_sample["__key__"] != idx_sample["__key__"]:
                    img_sample = next(images, None)
                if img_sample is None or img_sample["__key__"] != idx_sample["__key__"]:
                    got = "end of shard" if img_sample is None else repr(img_sample["__key__"])
                    raise DataError(f"{pair.images} and {pair.index}: keys differ at sample {pos}: "
                                    f"index shard has {idx_sample['__key__']!r}, image shard has {got}")
                if mine(pos):
                    yield {**img_sample, **idx_sample, "__images__": pair.images, "__index__": pair.index,
                           "__pass__": pair.pass_}
                pos += 1
            extra = None if extra_images else next(images, None)
            if extra is not None:
                raise DataError(f"{pair.images} and {pair.index}: keys differ at sample {pos}: image shard "
                                f"has {extra['__key__']!r}, index shard has ended")
            if pos != pair.count:
                raise DataError(f"{pair.names}: {pos} samples, shards.parquet says {pair.count} (truncated shard?)")
        except DataError as e:
            if not skip_bad:
                raise
            _bad(f"{e} (rest of the shard skipped)", skip_bad, skips,
                 n=sum(mine(p) for p in range(pos, max(pos, pair.count))))
        finally:
            images.close()
            index.close()


# --- sample-level stages -------------------------------------------------------------------

def shuffle_samples(samples, bufsize: int, seed: int, epoch: int, rank: int):
    worker, _ = _worker()
    yield from wds.shuffle(bufsize=bufsize, initial=min(bufsize, 100),
                           seed=f"samples/{seed}/{epoch}/{rank}/{worker}")(samples)


def decode(samples, *, image_size: tuple[int, int], skip_bad: bool, skips: _Skips):
    for sample in samples:
        where = f"{sample['__images__']}: sample {sample['__key__']!r}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            if ext is None:
                raise ValueError(f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})")
            # dynaprep's own decoder, without resizing: a user's WebDataset image (wds mode) may
            # carry EXIF orientation or an odd mode, and the pixels must be the ones scored.
            image = load_image(sample[ext], image_size, patch_size=1, keep_size=True).rgb
            label = int(sample["cls"].decode().strip()) if "cls" in sample else UNLABELED
        except Exception as e:  # any undecodable sample is that sample's problem, not the run's
            _bad(f"{where}: {e}", skip_bad, skips)
            continue
        yield {**sample, "image": image, "label": label, "window": (0, 0)}


def crop_window(samples, *, grid: tuple[int, int], window: tuple[int, int], patch: int, train: bool,
         seed: int, epoch: int):
    """A patch-aligned window of `window` patches: random in train, centred in eval."""
    (gh, gw), (wh, ww) = grid, window
    for sample in samples:
        if train:
            rng = _sample_rng(seed, epoch, sample, _CROP)
            r0, c0 = int(rng.integers(0, gh - wh + 1)), int(rng.integers(0, gw - ww + 1))
        else:
            r0, c0 = (gh - wh) // 2, (gw - ww) // 2
        image = sample["image"][r0 * patch:(r0 + wh) * patch, c0 * patch:(c0 + ww) * patch]
        yield {**sample, "image": image, "window": (r0, c0)}


def select_patches(samples, *, mode: str, k: int, grid: tuple[int, int], window: tuple[int, int],
           seed: int, epoch: int, skip_bad: bool, skips: _Skips):
    """Kept patch indices of the (possibly cropped) image, as int64, ascending; None = dense.

    Without a crop, saliency uses the stored k{K}.npy; with one, top-K is re-selected from
    the window of scores.npy (the stored sets refer to the whole grid)."""
    n = window[0] * window[1]
    kept = k_count(k, n)
    cropped = window != grid
    for sample in samples:
        where = f"{sample['__index__']}: sample {sample['__key__']!r}"
        if mode == "dense" or k == 100:
            keep = None
        elif mode == "random":
            keep = np.sort(_sample_rng(seed, epoch, sample, _SELECT).choice(n, kept, replace=False))
        elif mode == "center":
            keep = center_indices(window, kept)
        else:
            member = "scores.npy" if cropped else f"k{k}.npy"
            try:
                if member not in sample:
                    raise ValueError(f"no {member}")
                arr = _npy(sample[member])
                if cropped:
                    if arr.shape != tuple(grid):
                        raise ValueError(f"scores.npy has shape {list(arr.shape)}, expected {list(grid)}")
                    r0, c0 = sample["window"]
                    scores = arr[r0:r0 + window[0], c0:c0 + window[1]].astype(np.float32)
                    keep = select_topk(scores[None], k)[0]
                else:
                    problem = _check_indices(arr, n, kept)
                    if problem:
                        raise ValueError(f"{member} {problem}")
                    keep = arr
            except Exception as e:
                _bad(f"{where}: {e}", skip_bad, skips)
                continue
            keep = keep.astype(np.int64)
        yield {**sample, "keep": keep}


def random_flip(samples, *, grid_w: int, seed: int, epoch: int):
    for sample in samples:
        if _sample_rng(seed, epoch, sample, _FLIP).random() < 0.5:
            keep = sample["keep"]
            sample = {**sample, "image": sample["image"][:, ::-1],
                      "keep": None if keep is None else hflip_indices(keep, grid_w)}
        yield sample


def collate(samples, *, batch_size: int, keep_partial: bool, skips: _Skips):
    for group in wds.batched(batch_size, collation_fn=None, partial=keep_partial)(samples):
        # A channels-last view, no copy: the CPU only stacks; the layout change happens on the
        # device, inside normalize (DESIGN §6: uint8 to the device, normalise there).
        # In a loader worker the batch is stacked straight into shared memory: otherwise
        # torch copies it there again to send it to the main process.
        # In the main process numpy's allocator is several times faster than a fresh torch
        # tensor (page faults on every 4.8 MB batch), and from_numpy shares the memory.
        arrays = [s["image"] for s in group]
        if torch.utils.data.get_worker_info() is not None:
            buf = torch.empty((len(group), *arrays[0].shape), dtype=torch.uint8).share_memory_()
            np.stack(arrays, out=buf.numpy())
        else:
            buf = torch.from_numpy(np.stack(arrays))
        images = buf.permute(0, 3, 1, 2)
        keep = None if group[0]["keep"] is None else torch.from_numpy(np.stack([s["keep"] for s in group]))
        labels = torch.tensor([s["label"] for s in group], dtype=torch.int64)
        yield Batch(images, keep, labels, [s["__key__"] for s in group], skips.take())


# --- the loader ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Everything a pipeline needs, fixed at build time (picklable for workers)."""

    pairs: tuple[ShardPair, ...]
    split_samples: bool  # fewer non-empty shards than ranks: split by sample, not shard
    k: int
    select: str
    batch_size: int
    train: bool
    flip: bool
    seed: int
    rank: int
    world_size: int
    workers: int  # effective: no more than this rank has shards
    shuffle_buffer: int
    skip_bad: bool
    image_size: tuple[int, int]
    patch: int
    grid: tuple[int, int]
    window: tuple[int, int]  # grid of the model input (== grid unless cropping)
    extra_images: bool


class Loader:
    """One epoch of batches per iteration; call set_epoch(e) before each epoch.

    `steps`: train, the same on every rank, and exactly that many full batches come out
    (DataError if skipped samples leave a rank with nothing to cycle over). Eval, this
    rank's batch count (each worker batches its own shards, so with workers there can be
    one partial batch per worker); an upper bound when bad samples are skipped.
    `skipped`: sum of Batch.skipped seen so far. Skips are counted in the process that meets
    them and ride on the next batch it builds, so skips after a worker's last batch of the
    epoch (or past the train cut) are not counted: a lower bound, exact in the common case.
    """

    def __init__(self, plan: _Plan, info: DatasetInfo, steps: int, pin_memory: bool):
        self.plan, self.info, self.steps = plan, info, steps
        self.pin_memory = pin_memory
        self.epoch = 0
        self.skipped = 0

    @property
    def kept(self) -> int | None:
        """Patches kept per sample, or None when dense."""
        p = self.plan
        return None if p.select == "dense" or p.k == 100 else k_count(p.k, p.window[0] * p.window[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.plan.window[0] * self.plan.patch, self.plan.window[1] * self.plan.patch)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        p, skips = self.plan, _Skips()
        train_only = (lambda stage: stage) if p.train else (lambda stage: None)
        samples = wds.DataPipeline(
            partial(iter, p.pairs),  # the source (a bare list would be spliced in as stages)
            train_only(partial(shuffle_shards, seed=p.seed, epoch=epoch)),
            None if p.split_samples else partial(split_by_node, rank=p.rank, world_size=p.world_size),
            wds.split_by_worker,
            train_only(reorder_passes(p.seed, epoch, p.rank)),
            partial(read_pairs, skip_bad=p.skip_bad, skips=skips, extra_images=p.extra_images,
                    sample_split=(p.rank, p.world_size) if p.split_samples else None),
        )
        if p.train:
            samples = samples.repeat()  # ends after a pass that yields nothing: never spins
        cropping = p.window != p.grid
        return wds.DataPipeline(
            samples,
            train_only(partial(shuffle_samples, bufsize=p.shuffle_buffer, seed=p.seed, epoch=epoch, rank=p.rank)
                       if p.shuffle_buffer > 1 else None),
            partial(decode, image_size=p.image_size, skip_bad=p.skip_bad, skips=skips),
            # Crop before selection: a window re-selects top-K from its own scores.
            partial(crop_window, grid=p.grid, window=p.window, patch=p.patch, train=p.train,
                    seed=p.seed, epoch=epoch) if cropping else None,
            partial(select_patches, mode=p.select, k=p.k, grid=p.grid, window=p.window, seed=p.seed,
                    epoch=epoch, skip_bad=p.skip_bad, skips=skips),
            partial(random_flip, grid_w=p.window[1], seed=p.seed, epoch=epoch) if p.flip else None,
            partial(collate, batch_size=p.batch_size, keep_partial=not p.train, skips=skips),
        )

    def __iter__(self) -> Iterator[Batch]:
        p = self.plan
        pipeline = self.pipeline(self.epoch)
        pin = self.pin_memory and torch.cuda.is_available()
        if p.workers > 0:
            batches = iter(wds.WebLoader(pipeline, batch_size=None, num_workers=p.workers,
                                         pin_memory=pin, persistent_workers=False))
        else:
            batches = iter(pipeline)
        done = 0
        try:
            # Train streams are endless (each rank cycles its shards): cut at exactly `steps`.
            for batch in itertools.islice(batches, self.steps if p.train else None):
                if pin and p.workers == 0:
                    batch = batch.pin_memory()
                self.skipped += batch.skipped
                done += 1
                yield batch
        except DataError as e:
            raise DataError(_worker_message(e)) from None
        finally:
            del batches  # shuts DataLoader workers down now, not at garbage collection
        if p.train and done < self.steps:
            raise DataError(f"rank {p.rank}: only {done} of {self.steps} batches this epoch: every sample "
                            f"of its shards was skipped as bad")


def _worker_message(e: DataError) -> str:
    """The one-line message of a DataError, also when DataLoader re-raised it from a worker
    with the worker's traceback prepended."""
    text = str(e).rstrip()
    marker = f"{DataError.__module__}.{DataError.__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text


def _eval_steps(plan: _Plan) -> int:
    """This rank's batch count in eval: each worker batches its own shards, partial batch kept."""
    pairs = list(plan.pairs) if plan.split_samples else list(plan.pairs)[plan.rank::plan.world_size]
    steps = 0
    for w in range(max(1, plan.workers)):
        n = 0
        for pair in pairs[w::max(1, plan.workers)]:
            if plan.split_samples:
                first = pair.offset + (plan.rank - pair.offset) % plan.world_size
                n += len(range(first, pair.offset + pair.count, plan.world_size))
            else:
                n += pair.count
        steps += math.ceil(n / plan.batch_size)
    return steps


def build_loader(dataset_dir, split, *, k: int, scorer: str = "l2", select: str = "saliency",
                 batch_size: int, workers: int = 0, train: bool = True, seed: int = 42,
                 rank: int = 0, world_size: int = 1, input_size: int | None = None,
                 flip: bool | None = None, shuffle_buffer: int = 1000,
                 skip_bad_samples: bool = False, pin_memory: bool = False) -> Loader:
    """The loader of one split for one rank. Every argument error is a one-line DataError."""
    info = open_dataset(dataset_dir)
    if split not in info.splits:
        raise DataError(f"{dataset_dir}: no split {split!r} (available: {', '.join(info.splits) or 'none'})")
    if scorer not in info.scorers:
        raise DataError(f"{dataset_dir}: no scorer {scorer!r} (available: {', '.join(info.scorers)})")
    if select not in SELECT_MODES:
        raise DataError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 100:
        raise DataError(f"K must be an integer in 1..100, got {k!r}")
    k = int(k)
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad loader arguments: batch_size={batch_size}, workers={workers}, "
                        f"rank={rank}, world_size={world_size}")

    patch, (h, w), grid = info.patch_size, info.image_size, info.grid
    if input_size is None:
        window = grid
    else:
        if input_size % patch or not patch <= input_size <= min(h, w):
            raise DataError(f"input size {input_size} must be a multiple of the patch size {patch} "
                            f"and at most the stored size {h}x{w}")
        window = (input_size // patch, input_size // patch)
    if select == "saliency" and k != 100 and window == grid and k not in info.k_values():
        ks = ", ".join(str(v) for v in info.k_values())
        raise DataError(f"{dataset_dir}: K={k} was not indexed (available K: {ks}, or 100 for dense; "
                        f"any K works with an input size smaller than the stored {h}x{w})")

    pairs = _shard_pairs(dataset_dir, info, split, scorer)
    total = sum(pair.count for pair in pairs)
    split_samples = len(pairs) < world_size
    rank_shards = len(pairs) if split_samples else len(pairs[rank::world_size])
    plan = _Plan(
        pairs=tuple(pairs), split_samples=split_samples, k=k, select=select, batch_size=batch_size,
        train=train, flip=train if flip is None else bool(flip), seed=int(seed), rank=rank,
        world_size=world_size, workers=min(workers, rank_shards), shuffle_buffer=shuffle_buffer,
        skip_bad=skip_bad_samples, image_size=(h, w), patch=patch, grid=grid, window=window,
        extra_images=info.external_images,
    )
    if train:
        if total < world_size * batch_size:
            raise DataError(f"{dataset_dir}: split {split!r} has {total} samples, fewer than one step "
                            f"(world size {world_size} × batch size {batch_size})")
        steps = total // (world_size * batch_size)
    else:
        steps = _eval_steps(plan)
    return Loader(plan, info, steps, pin_memory)
