"""Reading one batch: sample numbers -> image and index members read by byte offset ->
decode -> crop -> select -> flip -> collate (a Batch in shared memory for loader workers)."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from dynavit.manifests import check_indices, read_npy
from dynavit.manifests.schema import SCORES_EXT, k_ext
from dynavit.manifests.inputs import open_regular
from dynavit.manifests.samples import SampleTable, Shard, read_member
from dynavit.manifests.shards import MismatchError
from dynavit.pipeline.decode import decode_stored, load_image
from dynavit.pipeline.topk import select_topk

from dynavit.trainer.selection import Selection
from dynavit.trainer.batch import Batch, DataError
from dynavit.trainer.adaptive_loader import sample_keep
from dynavit.trainer.methods.packing import RaggedKeep
from dynavit.trainer.patches import (_CROP, _FLIP, _SELECT, _VFLIP, _sample_bits, _sample_rng, center_indices, draw,
                                     hflip_indices, vflip_indices)

log = logging.getLogger(__name__)


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
    k_rule: object = None  # adaptive K (adaptive_k.KRule, τ known): kept sets from scores.npy, ragged batches


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
        batch = collate(images, keeps, labels, keys, skipped, recycle=self.plan.recycle,
                        ragged=self.plan.k_rule is not None)
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
        elif p.k_rule is not None:
            keep = sample_keep(self, i, shard, key, r0, c0)
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


def collate(images: list, keeps: list, labels: list, keys: list[str], skipped: int, recycle: bool = False,
            ragged: bool = False) -> Batch:
    if not images:
        return Batch(torch.empty(0, dtype=torch.uint8), None, torch.empty(0, dtype=torch.int64), [], skipped)
    # A channels-last view, no copy: the CPU only stacks; the layout change happens on the
    # device, inside normalize (uint8 to the device, normalised there).
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
    if keeps[0] is None:
        keep = None
    else:  # adaptive K: kept sets of different lengths, run packed (methods/packing.py)
        keep = RaggedKeep.from_list(keeps) if ragged else torch.from_numpy(np.stack(keeps))
    return Batch(buf.permute(0, 3, 1, 2), keep, torch.tensor(labels, dtype=torch.int64), keys, skipped)


class _EpochBatches(torch.utils.data.Dataset):
    """Batch j of one epoch, for DataLoader workers (map-style: in order, any worker count)."""

    def __init__(self, reader: BatchReader, batches: list[np.ndarray], epoch: int):
        self.reader, self.batches, self.epoch = reader, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Batch:
        return self.reader(self.batches[j], self.epoch)
