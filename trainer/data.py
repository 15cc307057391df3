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

Where each part lives: `batch.py` (Batch, DataError, normalize), `patches.py` (per-sample
pure functions: flips of the indices, the centre selection, the seeded draws), `reader.py`
(one batch from its sample numbers), and here the epoch plan and the Loader.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dynavit.manifests import DatasetInfo, FormatError, read_dataset_info
from dynavit.manifests.samples import SampleTable, ShardError, build_table
from dynavit.manifests.shards import UNLABELED

from dynavit.trainer.selection import MODES as SELECT_MODES
from dynavit.trainer.selection import Selection, SelectionError, resolve_selection
from dynavit.trainer.patches import center_indices, hflip_indices, vflip_indices
from dynavit.trainer.batch import Batch, DataError, normalize  # noqa: F401 (the loader's API)
from dynavit.trainer.reader import BatchReader, ReadPlan, _EpochBatches
from dynavit.trainer.adaptive_loader import nominal_selection, resolve_rule
from dynavit.trainer.adaptive_k import parse_k_rule

log = logging.getLogger(__name__)


def open_dataset(dataset_dir) -> DatasetInfo:
    path = Path(dataset_dir)
    if not path.is_dir():
        raise DataError(f"{dataset_dir}: not a dynavit dataset directory (no such directory)")
    try:
        return read_dataset_info(path)
    except FormatError as e:
        raise DataError(str(e)) from None


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
        batches = self.batches(self.epoch)
        pin = self.pin_memory and torch.cuda.is_available()
        if self.workers > 0:
            # A generator of its own: DataLoader otherwise draws its workers' base seed from the
            # global torch RNG, and the model's dropout / drop-path masks would then depend on
            # --workers (every draw of ours is hashed from the sample; the workers' seeds are unused).
            it = iter(torch.utils.data.DataLoader(_EpochBatches(self.reader, batches, self.epoch), batch_size=None,
                                                  num_workers=self.workers, pin_memory=pin,
                                                  generator=torch.Generator()))
        else:
            it = (self.reader(idx, self.epoch) for idx in batches)
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
                 with_scores: bool = False, k_rule=None) -> Loader:
    """The loader of one split for one rank. Every argument error is a one-line DataError.
    Pass a resolved `selection`, or `k`/`select`/`input_size` to resolve one here.
    `images_root`: where a user's WebDataset (`--data wds`) lies now, if it moved (the
    user's own: it may be a URL); `trust_urls`: dataset.json / shards.parquet may name URLs
    and commands too (--trust-dataset-urls).
    `hflip`/`vflip`: per-sample flip probabilities of a train loader (an eval loader never
    flips); `flip=False` turns both off, `flip=True` flips an eval loader too. `with_scores`:
    batches carry the scores of every sample's shown window (Batch.scores; saliency
    selections only), for re-selection after mixing. `k_rule` (a --k-rule text or KRule):
    adaptive K from scores.npy with ragged batches (adaptive_loader.py); a budget rule is
    calibrated on this split here."""
    info = open_dataset(dataset_dir)
    if split not in info.splits:
        raise DataError(f"{dataset_dir}: no split {split!r} (available: {', '.join(info.splits) or 'none'})")
    if scorer not in info.scorers:
        raise DataError(f"{dataset_dir}: no scorer {scorer!r} (available: {', '.join(info.scorers)})")
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad loader arguments: batch_size={batch_size}, workers={workers}, "
                        f"rank={rank}, world_size={world_size}")
    if selection is None and k_rule is not None:  # adaptive: a nominal selection (adaptive_loader)
        try:
            selection = nominal_selection(info, parse_k_rule(k_rule) if isinstance(k_rule, str) else k_rule,
                                          input_size)
        except (SelectionError, ValueError) as e:
            raise DataError(f"{dataset_dir}: {e}") from None
    if selection is None:
        try:
            selection = resolve_selection(info, None if select == "dense" else k, select, input_size)
        except SelectionError as e:
            raise DataError(f"{dataset_dir}: {e}") from None
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
    if not (0 <= hflip <= 1 and 0 <= vflip <= 1):
        raise DataError(f"flip probabilities must be in [0, 1], got hflip={hflip}, vflip={vflip}")
    flips = train if flip is None else bool(flip)
    plan = ReadPlan(selection, tuple(info.image_size), train, float(hflip) if flips else 0.0, int(seed),
                    skip_bad_samples, info.external_images, recycle_buffers,
                    (info.resize.get("policy", "center-crop"), float(info.resize.get("crop_pct", 0.875))),
                    float(vflip) if flips else 0.0, bool(with_scores))
    if k_rule is not None:
        try:
            rule, _ = resolve_rule(k_rule, BatchReader(table, plan), skip_bad_samples)
        except ValueError as e:
            raise DataError(f"{dataset_dir}: split {split!r}: {e}") from None
        plan = dataclasses.replace(plan, k_rule=rule)
    return Loader(table, plan, info, batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
                  pin_memory=pin_memory)


__all__ = ["Batch", "DataError", "Loader", "SELECT_MODES", "UNLABELED", "build_loader", "center_indices",
           "hflip_indices", "normalize", "open_dataset", "vflip_indices"]
