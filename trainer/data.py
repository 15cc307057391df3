"""Shard pairs → batches of uint8 images, kept-patch indices and labels (DESIGN.md §6).

Samples are read by byte offset, like a map-style dataset with torch's DistributedSampler,
not streamed through the tars:

    manifest.parquet (keys, labels, image offsets) + shards.parquet ─ SampleTable (no per-sample read)
    epoch plan: a seeded permutation of every sample (train) or file order (eval)
    batch j of rank r ─ read image + index member by offset ─ decode ─ crop ─ select ─ flip ─ collate

Why: shards written class by class (an ImageFolder, a user's WebDataset indexed in place)
cannot be mixed by a shard shuffle and a sample buffer; a global permutation mixes any
layout, visits every sample exactly once per epoch, and does not depend on the number of
workers (batch j is a pure function of seed, epoch, rank and j; DataLoader workers only
decide who builds it). Every rank runs `steps = n // (world_size · batch_size)` steps;
the tail of the permutation is dropped, a different one each epoch.

Eval reads every sample once, in file order: rank r takes samples r, r+W, …, partial last
batch kept.

Randomness never comes from global state: the order by (seed, epoch), each per-sample draw
(crop window, random selection, flip) by (seed, epoch, key, purpose).

A bad sample (undecodable image, bad index array, key mismatch) raises DataError naming
the shard and key, or with skip_bad_samples is left out of its batch and counted once.
A bad shard (missing, truncated, count mismatch) is found when the loader is built: its
samples are left out of every epoch (counted once in `skipped`) or, without
skip_bad_samples, the first iteration raises.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dynavit.manifests import DatasetInfo, FormatError, check_indices, read_dataset_info, read_npy
from dynavit.manifests.schema import SCORES_EXT, k_ext
from dynavit.manifests.inputs import open_regular
from dynavit.manifests.shards import UNLABELED, MismatchError, SampleTable, Shard, ShardError, build_table, read_member
from dynavit.pipeline.decode import decode_stored, load_image
from dynavit.pipeline.topk import select_topk

from .selection import MODES as SELECT_MODES
from .selection import Selection, SelectionError, resolve_selection

log = logging.getLogger(__name__)

# Independent per-sample random streams, so that e.g. enabling crops does not change flips.
_CROP, _SELECT, _FLIP, _VFLIP = 1, 2, 3, 4


class DataError(Exception):
    """The dataset cannot be read as asked; the message names the file (and key) at fault."""


def open_dataset(dataset_dir) -> DatasetInfo:
    path = Path(dataset_dir)
    if not path.is_dir():
        raise DataError(f"{dataset_dir}: not a dynavit dataset directory (no such directory)")
    try:
        return read_dataset_info(path)
    except FormatError as e:
        raise DataError(str(e)) from None


# --- batches -------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B,3,H,W], not normalised (that happens on the device)
    keep_idx: torch.Tensor | None  # int64 [B,k], ascending raster indices; None = dense
    labels: torch.Tensor  # int64 [B]; -1 for unlabeled samples
    keys: list[str]
    skipped: int = 0  # bad samples of this batch left out (with skip_bad_samples)
    scores: torch.Tensor | None = None  # float32 [B,Gh,Gw] of the shown window (with_scores: Mixup/CutMix)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        # DataLoader's pin-memory thread calls this on objects that define it.
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, f) -> "Batch":
        keep = None if self.keep_idx is None else f(self.keep_idx)
        scores = None if self.scores is None else f(self.scores)
        return dataclasses.replace(self, images=f(self.images), keep_idx=keep, labels=f(self.labels), scores=scores)


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


def vflip_indices(indices: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Raster indices of the same patches after a vertical flip: r·Gw + c → (Gh−1−r)·Gw + c,
    re-sorted so the kept set stays in raster order."""
    idx = np.asarray(indices, dtype=np.int64)
    r, c = np.divmod(idx, grid_w)
    return np.sort((grid_h - 1 - r) * grid_w + c, axis=-1)


def draw(bits: int, p: float) -> bool:
    """True with probability `p` for uniform 64-bit `bits`: bits ≥ 2⁶⁴·(1−p), in integers.
    At p = 0.5 this is the top bit, the draw every flip was before --hflip existed, so the
    default keeps every earlier run's flips."""
    return p > 0 and bits >= (1 << 64) - int(p * 2.0 ** 64)


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


def _sample_bits(seed: int, epoch: int, key: str, purpose: int) -> int:
    """64 random bits of one sample's draw. Keyed by the sample, not by its position: a
    sample gets the same draws whatever the number of workers or ranks. A hash, not a
    Generator: constructing numpy's Generator per sample cost ~0.1 ms."""
    text = f"{seed}/{epoch}/{purpose}/{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _sample_rng(seed: int, epoch: int, key: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng(_sample_bits(seed, epoch, key, purpose))


# --- reading one batch ---------------------------------------------------------------------

@dataclass(frozen=True)
class ReadPlan:
    """What a batch reader needs, fixed when the loader is built (picklable for workers)."""

    selection: Selection
    image_size: tuple[int, int]
    train: bool
    hflip: float  # probability of a horizontal flip per sample (train only)
    seed: int
    skip_bad: bool
    external_images: bool  # images are the user's own WebDataset (not written by dynaprep)
    recycle: bool = False  # workers reuse a ring of shared buffers (see _shared_buffer)
    resize: tuple = ("center-crop", 0.875)  # external images: dataset.json's resize, as dynaprep applied it
    vflip: float = 0.0  # probability of a vertical flip per sample (train only)
    scores: bool = False  # also deliver each sample's scores.npy window, flipped as its pixels


class BatchReader:
    """Builds the Batch of a list of sample numbers. One per process: file descriptors are
    opened on first use and kept (at most `max_open`), reads are `os.pread` at known offsets."""

    def __init__(self, table: SampleTable, plan: ReadPlan, max_open: int = 256):
        self.table, self.plan, self.max_open = table, plan, max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = open_regular(path)
            except FileNotFoundError:
                raise DataError(f"{path}: shard file missing") from None
            except OSError as e:
                raise DataError(f"{path}: {e.strerror or e}") from None
            self._fds[path] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __call__(self, samples: np.ndarray, epoch: int) -> Batch:
        images, keeps, labels, keys, skipped, scores = [], [], [], [], 0, []
        for i in samples:
            try:
                image, keep, score = self.sample(int(i), epoch)
            except DataError as e:
                if not self.plan.skip_bad:
                    raise
                log.warning("skipping a sample: %s", e)
                skipped += 1
                continue
            images.append(image)
            keeps.append(keep)
            scores.append(score)
            labels.append(self.table.label[i])
            keys.append(self.table.keys[i])
        batch = collate(images, keeps, labels, keys, skipped, recycle=self.plan.recycle)
        if images and scores[0] is not None:
            batch.scores = torch.from_numpy(np.stack(scores))
        return batch

    def sample(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(image HWC, kept indices or None, the window's scores if plan.scores else None)."""
        t, p, sel = self.table, self.plan, self.plan.selection
        shard, key = t.shards[t.shard[i]], t.keys[i]
        try:
            data = self._image_bytes(i, shard)  # checks the member's tar header too
            flip = draw(_sample_bits(p.seed, epoch, key, _FLIP), p.hflip)
            vflip = draw(_sample_bits(p.seed, epoch, key, _VFLIP), p.vflip)
            if p.external_images:
                # A user's WebDataset image has any size, EXIF orientation or mode: dynaprep's
                # own decoder with the recorded resize gives exactly the pixels that were scored.
                image = load_image(data, p.image_size, p.resize[0], p.resize[1], patch_size=1, keep_size=True,
                                   hflip=flip).rgb
            else:  # what dynaprep's encode_image wrote
                image = decode_stored(data, p.image_size, hflip=flip)
        except DataError:
            raise
        except Exception as e:  # any undecodable sample is that sample's problem, not the run's
            raise DataError(f"{shard.images}: sample {key!r}: {e}") from None
        if vflip:  # a copy: stacking negatively-strided views into a batch is slow
            image = np.ascontiguousarray(image[::-1])

        # The image may be mirrored already; the window and the kept set are chosen in the
        # stored (unflipped) frame, then mapped: column c of the window is column Ww-1-c
        # (row r is row Wh-1-r after a vertical flip).
        r0 = c0 = 0
        if sel.cropped:  # random window in train, centred in eval
            (gh, gw), (wh, ww) = sel.grid, sel.window
            if p.train:
                bits = _sample_bits(p.seed, epoch, key, _CROP)
                r0, c0 = bits % (gh - wh + 1), (bits >> 32) % (gw - ww + 1)
            else:
                r0, c0 = (gh - wh) // 2, (gw - ww) // 2
            fc0 = gw - ww - c0 if flip else c0  # the same window in the mirrored image
            fr0 = gh - wh - r0 if vflip else r0
            image = image[fr0 * sel.patch:(fr0 + wh) * sel.patch, fc0 * sel.patch:(fc0 + ww) * sel.patch]

        if sel.dense:
            keep = None
        elif sel.mode == "random":
            keep = np.sort(_sample_rng(p.seed, epoch, key, _SELECT).choice(sel.num_patches, sel.kept, replace=False))
        elif sel.mode == "center":
            keep = center_indices(sel.window, sel.kept)
        else:
            keep = self._saliency(i, shard, key, r0, c0)

        if flip and keep is not None:
            keep = hflip_indices(keep, sel.window[1])
        if vflip and keep is not None:
            keep = vflip_indices(keep, *sel.window)
        scores = None
        if p.scores and keep is not None:  # the scores of what is shown: same window, same flips
            scores = self._scores(i, shard, key)[r0:r0 + sel.window[0], c0:c0 + sel.window[1]]
            scores = np.ascontiguousarray(scores[::-1 if vflip else 1, ::-1 if flip else 1], dtype=np.float32)
        return image, keep, scores

    # The two reads of a sample; trainer/stream.py's reader takes them from a tar stream instead.
    def _image_bytes(self, i: int, shard: Shard) -> bytes:
        return read_member(self._fd(shard.images), self.table, i)

    def _index_member(self, i: int, shard: Shard, key: str, ext: str) -> bytes:
        return shard.layout.read(self._fd(shard.index), int(self.table.pos[i]), key, ext)

    def _scores(self, i: int, shard: Shard, key: str) -> np.ndarray:
        """The sample's scores.npy [Gh, Gw]."""
        sel = self.plan.selection
        try:
            arr = read_npy(self._index_member(i, shard, key, SCORES_EXT))
            if arr.shape != tuple(sel.grid):
                raise ValueError(f"scores.npy has shape {list(arr.shape)}, expected {list(sel.grid)}")
            return arr
        except MismatchError as e:
            raise DataError(f"{shard.images} and {shard.index}: keys differ at sample {e.pos}: index shard has "
                            f"{e.got!r}, image shard has {key!r}") from None
        except Exception as e:
            raise DataError(f"{shard.index}: sample {key!r}: {e}") from None

    def _saliency(self, i: int, shard: Shard, key: str, r0: int, c0: int) -> np.ndarray:
        """The stored k{K}.npy; with a crop, top-K re-selected from the window of scores.npy
        (the stored sets refer to the whole grid)."""
        sel = self.plan.selection
        member = SCORES_EXT if sel.cropped else k_ext(sel.k)
        where = f"{shard.index}: sample {key!r}"
        try:
            arr = read_npy(self._index_member(i, shard, key, member))
            if sel.cropped:
                if arr.shape != tuple(sel.grid):
                    raise ValueError(f"scores.npy has shape {list(arr.shape)}, expected {list(sel.grid)}")
                scores = arr[r0:r0 + sel.window[0], c0:c0 + sel.window[1]].astype(np.float32)
                return select_topk(scores[None], sel.k)[0].astype(np.int64)
            problem = check_indices(arr, sel.num_patches, sel.kept)
            if problem:
                raise ValueError(f"{member} {problem}")
            return arr.astype(np.int64)
        except MismatchError as e:
            raise DataError(f"{shard.images} and {shard.index}: keys differ at sample {e.pos}: index shard has "
                            f"{e.got!r}, image shard has {key!r}") from None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{where}: {e}") from None


# Batches a worker sends are recycled: allocating a fresh shared-memory segment for every
# 4.8 MB batch (tmpfs page faults) cost ~0.35 ms per image, a third of a JPEG decode. A
# DataLoader worker has at most prefetch_factor (2) batches in flight, so a buffer comes
# back into use only after RING - 2 more batches of that worker were taken by the main
# process: batch.images stays valid while the consumer draws a few more batches (the loop
# normalises it into a new tensor at once); copy it to keep it longer. Opt-in
# (build_loader(recycle_buffers=True)): the training loop and the benchmarks use it, a
# caller that keeps batches (list(loader)) gets fresh buffers.
RING = 8
_rings: dict[tuple, list] = {}


def _shared_buffer(shape: tuple) -> torch.Tensor:
    ring = _rings.setdefault(shape, [])
    if len(ring) < RING:
        ring.append(torch.empty(shape, dtype=torch.uint8).share_memory_())
        return ring[-1]
    ring.append(ring.pop(0))
    return ring[-1]


def collate(images: list, keeps: list, labels: list, keys: list[str], skipped: int, recycle: bool = False) -> Batch:
    if not images:
        return Batch(torch.empty(0, dtype=torch.uint8), None, torch.empty(0, dtype=torch.int64), [], skipped)
    # A channels-last view, no copy: the CPU only stacks; the layout change happens on the
    # device, inside normalize (DESIGN §6: uint8 to the device, normalise there).
    # In a loader worker the batch is stacked straight into shared memory: otherwise
    # torch copies it there again to send it to the main process.
    # In the main process numpy's allocator is several times faster than a fresh torch
    # tensor (page faults on every 4.8 MB batch), and from_numpy shares the memory.
    if torch.utils.data.get_worker_info() is not None:
        shape = (len(images), *images[0].shape)
        buf = _shared_buffer(shape) if recycle else torch.empty(shape, dtype=torch.uint8).share_memory_()
        np.stack(images, out=buf.numpy())
    else:
        buf = torch.from_numpy(np.stack(images))
    keep = None if keeps[0] is None else torch.from_numpy(np.stack(keeps))
    return Batch(buf.permute(0, 3, 1, 2), keep, torch.tensor(labels, dtype=torch.int64), keys, skipped)


class _EpochBatches(torch.utils.data.Dataset):
    """Batch j of one epoch, for DataLoader workers (map-style: in order, any worker count)."""

    def __init__(self, reader: BatchReader, batches: list[np.ndarray], epoch: int):
        self.reader, self.batches, self.epoch = reader, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Batch:
        return self.reader(self.batches[j], self.epoch)


# --- the loader ----------------------------------------------------------------------------

class Loader:
    """One epoch of batches per iteration; call set_epoch(e) before each epoch.

    `steps`: train, the same on every rank, and exactly that many batches come out (a
    DataError if skipped samples empty a whole batch). Eval, this rank's batch count.
    `skipped`: bad samples left out so far (bad shards once, bad samples once per epoch).
    """

    def __init__(self, table: SampleTable, plan: ReadPlan, info: DatasetInfo, *, batch_size: int, workers: int,
                 rank: int, world_size: int, pin_memory: bool):
        self.table, self.plan, self.info = table, plan, info
        self.selection = plan.selection
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.pin_memory = pin_memory
        self.reader = BatchReader(table, plan)
        self.epoch = 0
        self.skipped = sum(n for _, n in table.problems) if plan.skip_bad else 0
        for message, _ in table.problems:
            if plan.skip_bad:
                log.warning("skipping a shard: %s", message)
        n = len(table)
        if plan.train:
            self.steps = n // (world_size * batch_size)
        else:
            self.steps = math.ceil(len(range(rank, n, world_size)) / batch_size)
        self.workers = min(workers, self.steps)

    @property
    def kept(self) -> int | None:
        return self.selection.kept

    @property
    def input_size(self) -> tuple[int, int]:
        return self.selection.input_size

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's sample numbers, batch by batch, for `epoch`."""
        n, b, w, r = len(self.table), self.batch_size, self.world_size, self.rank
        if self.plan.train:
            # DistributedSampler-style: one permutation of every sample, alike on every rank;
            # global batch j·W + r is this rank's batch j; the tail (< W·b) is dropped.
            order = np.random.default_rng([self.plan.seed & (2**64 - 1), epoch]).permutation(n)
            return [order[(j * w + r) * b:(j * w + r + 1) * b] for j in range(self.steps)]
        mine = np.arange(r, n, w)
        return [mine[j * b:(j + 1) * b] for j in range(self.steps)]

    def __iter__(self) -> Iterator[Batch]:
        if self.table.problems and not self.plan.skip_bad:
            raise DataError(self.table.problems[0][0])
        pin = self.pin_memory and torch.cuda.is_available()
        it = self._batch_iter(pin)
        counts = {"done": 0}
        try:
            try:
                yield from self._consume(it, pin, counts)
            finally:
                # Shut DataLoader workers down now, not at garbage collection: an exception's
                # traceback keeps the iterator alive, and while its worker pids stay registered
                # torch's SIGCHLD handler raises at a random later point when one of them dies.
                # Inside the outer try, so that the handler firing here is converted too.
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
        except DataError as e:
            raise DataError(_worker_message(e)) from None
        except (RuntimeError, ConnectionError, EOFError) as e:
            # A killed worker: torch's DataLoader notices it (SIGCHLD) and raises RuntimeError,
            # or, when it died while sending a batch, the receive breaks first.
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
            what = str(e).splitlines()[0] if isinstance(e, RuntimeError) else \
                f"a DataLoader worker died while sending a batch ({type(e).__name__})"
            raise DataError(f"rank {self.rank}, epoch {self.epoch}: {what} (out of memory? fewer --workers or a "
                            f"smaller --batch-size may help)") from None
        done = counts["done"]
        if self.plan.train and done < self.steps:
            raise DataError(f"rank {self.rank}: only {done} of {self.steps} batches this epoch: every sample "
                            f"of the others was skipped as bad")

    def _batch_iter(self, pin: bool) -> Iterator[Batch]:
        """This epoch's batches, built by DataLoader workers or in this process."""
        batches = self.batches(self.epoch)
        if self.workers > 0:
            # A generator of its own: DataLoader otherwise draws its workers' base seed from the
            # global torch RNG, and the model's dropout / drop-path masks would then depend on
            # --workers (every draw of ours is hashed from the sample; the workers' seeds are unused).
            return iter(torch.utils.data.DataLoader(_EpochBatches(self.reader, batches, self.epoch), batch_size=None,
                                                    num_workers=self.workers, pin_memory=pin,
                                                    generator=torch.Generator()))
        return (self.reader(idx, self.epoch) for idx in batches)

    def _consume(self, it, pin: bool, counts: dict) -> Iterator[Batch]:
        pending = 0
        for batch in it:
            self.skipped += batch.skipped
            if len(batch) == 0:  # every sample of it was bad: its count rides on the next batch
                pending += batch.skipped
                continue
            if pending:
                batch, pending = dataclasses.replace(batch, skipped=batch.skipped + pending), 0
            if pin and self.workers == 0:
                batch = batch.pin_memory()
            counts["done"] += 1
            yield batch


def _worker_message(e: DataError) -> str:
    """The one-line message of a DataError, also when DataLoader re-raised it from a worker
    with the worker's traceback prepended."""
    text = str(e).rstrip()
    marker = f"{DataError.__module__}.{DataError.__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text


def build_loader(dataset_dir, split, *, k: int | None = None, scorer: str = "l2", select: str = "saliency",
                 batch_size: int, workers: int = 0, train: bool = True, seed: int = 42,
                 rank: int = 0, world_size: int = 1, input_size: int | None = None,
                 flip: bool | None = None, hflip: float = 0.5, vflip: float = 0.0, skip_bad_samples: bool = False, pin_memory: bool = False,
                 selection: Selection | None = None, recycle_buffers: bool = False,
                 images_root: str | None = None, trust_urls: bool = False,
                 with_scores: bool = False, stream: bool = False, stream_buffer: int = 1000) -> Loader:
    """The loader of one split for one rank. Every argument error is a one-line DataError.
    Pass a resolved `selection`, or `k`/`select`/`input_size` to resolve one here.
    `images_root`: where a user's WebDataset (`--data wds`) lies now, if it moved (the
    user's own: it may be a URL); `trust_urls`: dataset.json / shards.parquet may name URLs
    and commands too (--trust-dataset-urls).
    `hflip`/`vflip`: per-sample flip probabilities of a train loader (an eval loader never
    flips); `flip=False` turns both off, `flip=True` flips an eval loader too. `with_scores`:
    batches carry the scores of every sample's shown window (Batch.scores; saliency
    selections only), for re-selection after mixing. `stream`: read the tars front to back
    instead of by offset (trainer/stream.py; `stream_buffer` samples in its shuffle buffer)."""
    info = open_dataset(dataset_dir)
    if split not in info.splits:
        raise DataError(f"{dataset_dir}: no split {split!r} (available: {', '.join(info.splits) or 'none'})")
    if scorer not in info.scorers:
        raise DataError(f"{dataset_dir}: no scorer {scorer!r} (available: {', '.join(info.scorers)})")
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad loader arguments: batch_size={batch_size}, workers={workers}, "
                        f"rank={rank}, world_size={world_size}")
    if selection is None:
        try:
            selection = resolve_selection(info, None if select == "dense" else k, select, input_size)
        except SelectionError as e:
            raise DataError(f"{dataset_dir}: {e}") from None
    if not (0 <= hflip <= 1 and 0 <= vflip <= 1):
        raise DataError(f"flip probabilities must be in [0, 1], got hflip={hflip}, vflip={vflip}")
    flips = train if flip is None else bool(flip)
    plan = ReadPlan(selection, tuple(info.image_size), train, float(hflip) if flips else 0.0, int(seed),
                    skip_bad_samples, info.external_images, recycle_buffers,
                    (info.resize.get("policy", "center-crop"), float(info.resize.get("crop_pct", 0.875))),
                    float(vflip) if flips else 0.0, bool(with_scores))
    if stream:
        from .stream import build_stream_loader  # here: the random-access path needs none of it
        return build_stream_loader(dataset_dir, info, split, scorer, plan, batch_size=batch_size, workers=workers,
                                   rank=rank, world_size=world_size, pin_memory=pin_memory, buffer=stream_buffer,
                                   images_root=images_root, trust_urls=trust_urls)
    try:
        table = build_table(dataset_dir, info, split, scorer, images_root=images_root, trust_urls=trust_urls)
    except ShardError as e:
        raise DataError(str(e)) from None
    if table.problems and (len(table) == 0 or (train and len(table) < world_size * batch_size)):
        # Every shard (or all but too few) unreadable: say which and why, not 0 steps.
        lost = sum(n for _, n in table.problems)
        raise DataError(f"{dataset_dir}: split {split!r}: {len(table.problems)} shard(s) with {lost} samples "
                        f"cannot be read, {len(table)} usable samples left; first: {table.problems[0][0]}")
    if train and len(table) < world_size * batch_size:
        raise DataError(f"{dataset_dir}: split {split!r} has {len(table)} usable samples, fewer than one step "
                        f"(world size {world_size} × batch size {batch_size})")
    return Loader(table, plan, info, batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
                  pin_memory=pin_memory)


__all__ = ["Batch", "DataError", "Loader", "SELECT_MODES", "UNLABELED", "build_loader", "center_indices",
           "hflip_indices", "normalize", "open_dataset", "vflip_indices"]
