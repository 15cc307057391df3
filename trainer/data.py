"""Shard pairs → batches of uint8 images, kept-patch indices and labels (docs/ARCHITECTURE.md, 'Trainer data path').

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
from pathlib import Path


from dynavit.manifests import DatasetInfo, FormatError, read_dataset_info
from dynavit.manifests.samples import ShardError, build_table
from dynavit.manifests.shards import UNLABELED

from dynavit.trainer.selection import MODES as SELECT_MODES
from dynavit.trainer.selection import Selection, SelectionError, resolve_selection
from dynavit.trainer.patches import center_indices, hflip_indices, vflip_indices
from dynavit.trainer.batch import Batch, DataError, TooFewSamples, normalize  # noqa: F401 (the loader's API)
from dynavit.trainer.loader import Loader  # noqa: F401 (the loader's API)
from dynavit.trainer.reader import BatchReader, ReadPlan
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

def build_loader(dataset_dir, split, *, k: int | None = None, scorer: str = "l2", select: str = "saliency",
                 batch_size: int, workers: int = 0, train: bool = True, seed: int = 42,
                 rank: int = 0, world_size: int = 1, input_size: int | None = None,
                 flip: bool | None = None, hflip: float = 0.5, vflip: float = 0.0, skip_bad_samples: bool = False, pin_memory: bool = False,
                 selection: Selection | None = None, recycle_buffers: bool = False,
                 images_root: str | None = None, trust_urls: bool = False,
                 with_scores: bool = False, stream: bool = False, stream_buffer: int = 1000,
                 k_rule=None) -> Loader:
    """The loader of one split for one rank. Every argument error is a one-line DataError.
    Pass a resolved `selection`, or `k`/`select`/`input_size` to resolve one here.
    `images_root`: where a user's WebDataset (`--data wds`) lies now, if it moved (the
    user's own: it may be a URL); `trust_urls`: dataset.json / shards.parquet may name URLs
    and commands too (--trust-dataset-urls).
    `hflip`/`vflip`: per-sample flip probabilities of a train loader (an eval loader never
    flips); `flip=False` turns both off, `flip=True` flips an eval loader too. `with_scores`:
    batches carry the scores of every sample's shown window (Batch.scores; saliency
    selections only), for re-selection after mixing. `stream`: read the tars front to back
    instead of by offset (trainer/stream.py; `stream_buffer` samples in its shuffle buffer).
    `k_rule` (a --k-rule text or KRule): adaptive K from scores.npy with ragged batches
    (adaptive_loader.py); a budget rule is calibrated on this split here."""
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
    if not (0 <= hflip <= 1 and 0 <= vflip <= 1):
        raise DataError(f"flip probabilities must be in [0, 1], got hflip={hflip}, vflip={vflip}")
    flips = train if flip is None else bool(flip)
    plan = ReadPlan(selection, tuple(info.image_size), train, float(hflip) if flips else 0.0, int(seed),
                    skip_bad_samples, info.external_images, recycle_buffers,
                    (info.resize.get("policy", "center-crop"), float(info.resize.get("crop_pct", 0.875))),
                    float(vflip) if flips else 0.0, bool(with_scores))
    if stream and k_rule is not None:
        raise DataError("--k-rule reads each sample's scores by offset: it does not work with --stream yet")
    if stream:
        from dynavit.trainer.stream import build_stream_loader  # here: the random-access path needs none of it
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
        raise TooFewSamples(f"{dataset_dir}: split {split!r} has {len(table)} usable samples, fewer than one step "
                            f"(world size {world_size} × batch size {batch_size}); lower --batch-size")
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
