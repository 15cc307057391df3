"""The Source interface: how `dynaprep` reads one dataset layout.

A source lists the samples of each split in a fixed order, cuts that list into work units
(one unit = one output shard) and reads the raw bytes/arrays of one unit.  Decoding is not
a source's business (see `dynavit.pipeline.decode`).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from dynavit.manifests.inputs import InputFileError, read_regular
from dynavit.manifests.schema import key_for

__all__ = ["RawSample", "WorkUnit", "Source", "SourceError", "make_key", "read_bytes",
           "IMAGE_EXTENSIONS", "is_image_name"]

# Extensions the folder sources enumerate (compared lower-cased).  Anything else in a class
# folder is left out of the dataset and reported through `Source.warnings()`.
MIN_PIECE = 16  # samples: smaller pieces cost more in start-up and joining than they spread

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class SourceError(Exception):
    """A dataset-level problem (missing --src, missing split folder, malformed annotation
    file, ...).  The message is one line and names the offending path."""


@dataclass(frozen=True)
class RawSample:
    key: str                  # decimal string, no dots, unique in its split (wds: user's key)
    source: str               # where it came from, for the manifest's `source` column
    label: int | None         # None for unlabeled splits
    class_name: str | None
    data: bytes | np.ndarray | None  # encoded bytes, or uint8 H×W×3 for array-native sources
    error: str | None = None  # set (and data None) when the raw input could not be read
    meta: dict | None = None  # the sample's own metadata (wds: its KEY.json), for padding-aware scoring
    # wds: (byte offset, size) of the image member's data in the user's uncompressed tar,
    # recorded in manifest.parquet so the trainer reads it without scanning; None otherwise
    member: tuple[int, int] | None = None
    # voc-seg: the class-index PNG of the image's segmentation mask (pipeline/seg_mask.py)
    mask: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkUnit:
    """Picklable description of one output shard's inputs."""
    split: str
    index: int                # shard ordinal within the split
    payload: object           # source-specific; default: (ordinals, items), zipped
    count: int | None = None  # number of samples, None when unknown before reading (wds)
    # A piece of a unit: samples written by one worker as fragments that are joined, in
    # order, into the unit's shard (`Source.split_unit`). parts == 1: the whole unit.
    part: int = 0
    parts: int = 1


make_key = key_for  # the contract's key rule (docs/FORMAT.md), under the name sources use


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_bytes(path: str) -> tuple[bytes | None, str | None]:
    """Read a whole file; a failure becomes a reason string instead of an exception because
    one unreadable sample must not stop a run over millions of files."""
    try:
        return read_regular(path), None  # no FIFO, device or file over --max-file-bytes
    except InputFileError as e:
        return None, f"unreadable: {e}"
    except FileNotFoundError:
        return None, "missing file"
    except IsADirectoryError:
        return None, "unreadable: is a directory"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"


class Source:
    """Base class.  Subclasses implement `splits`, `classes`, `entries` and `read_entry`, or
    override `units`/`read_unit` entirely (wds)."""

    name: str = "?"
    external_images: bool = False  # True for `wds`: images stay in the user's shards

    def splits(self) -> list[str]:
        raise NotImplementedError

    def classes(self) -> list[str]:
        """Class index -> name; [] when the source has no class list."""
        return []

    def warnings(self) -> list[str]:
        """One-line notes about inputs that are deliberately not part of the dataset
        (non-image files, excluded images, ...), so that nothing is dropped silently."""
        return list(getattr(self, "_warnings", []))

    def problems(self) -> list[str]:
        """The subset of `warnings()` that means the dataset is probably not what the user
        meant (an empty class folder, a skipped symlink loop): `dynaprep index --strict`
        exits 1 on any of them, as it does on failed inputs."""
        return list(getattr(self, "_problems", []))

    def _warn(self, msg: str, problem: bool = False) -> None:
        if not hasattr(self, "_warnings"):
            self._warnings: list[str] = []
            self._problems: list[str] = []
        if msg not in self._warnings:
            self._warnings.append(msg)
        if problem and msg not in self._problems:
            self._problems.append(msg)

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise SourceError(f"{self.name}: no split {split!r} (have: {', '.join(self.splits())})")

    # --- default planning: a deterministic list cut into fixed-size slices -------------
    def entries(self, split: str) -> Sequence:
        """The split's samples in key order; item i has ordinal (and key) i.

        Listed once per split (folder walks and annotation parsing are the slow part of
        planning) through `_list`, which file-based sources implement; sources whose
        entries are a cheap range override this instead."""
        self._check_split(split)
        cache = self.__dict__.setdefault("_entries", {})
        if split not in cache:
            cache[split] = tuple(self._list(split))
        return cache[split]

    def _list(self, split: str) -> Iterable:
        raise NotImplementedError

    def count(self, split: str) -> int | None:
        return len(self.entries(split))

    def units(self, split: str, shard_size: int, order_seed: int | None = None) -> list[WorkUnit]:
        """The split cut into units of `shard_size` samples.

        `order_seed` None keeps the source order (class by class for folder layouts);
        an int writes the split in a seeded random order instead, so that no shard holds
        one or two classes only. A sample's key stays its ordinal in the source order
        either way: keys are stable for an input whatever the order."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self._check_split(split)
        items = self.entries(split)
        order = range(len(items)) if order_seed is None else split_permutation(len(items), order_seed, split)
        out = []
        for i, start in enumerate(range(0, len(items), shard_size)):
            ordinals = order[start:start + shard_size]
            if isinstance(ordinals, range) and isinstance(items, range):
                chunk = items[start:start + shard_size]
            else:
                ordinals = tuple(int(o) for o in ordinals) if order_seed is not None else ordinals
                chunk = tuple(items[o] for o in ordinals)
            out.append(WorkUnit(split, i, (ordinals, chunk), len(chunk)))
        return out

    def split_unit(self, unit: WorkUnit, parts: int) -> list[WorkUnit]:
        """The unit as up to `parts` contiguous pieces (so that a job with fewer shards than
        workers still uses every worker); the pieces read exactly the unit's samples."""
        ordinals, items = unit.payload
        n = len(items)
        parts = max(1, min(parts, n // MIN_PIECE))
        if parts < 2:
            return [unit]
        bounds = [n * i // parts for i in range(parts + 1)]
        return [WorkUnit(unit.split, unit.index, (ordinals[a:b], items[a:b]), b - a, part=i, parts=parts)
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        ordinals, items = unit.payload
        for ordinal, item in zip(ordinals, items):
            yield self.read_entry(unit.split, ordinal, item)

    def read_entry(self, split: str, ordinal: int, item) -> RawSample:
        raise NotImplementedError

    def image_shard(self, unit: WorkUnit) -> str | None:
        return None

    def images_root(self) -> str | None:
        """external_images only: where the image shards lie (`image_shard` is relative to it)."""
        return None


def split_permutation(n: int, seed: int, split: str) -> list[int]:
    """The seeded write order of a split of n samples: a permutation of range(n) that
    depends only on (seed, split name, n), never on the machine, rank or worker count."""
    rng = np.random.default_rng([int(seed) & (2**63 - 1), zlib.crc32(split.encode())])
    return rng.permutation(n).tolist()


def require_dir(path: str, what: str) -> str:
    if not path:
        raise SourceError(f"{what}: --src is required")
    if not os.path.exists(path):
        raise SourceError(f"{what}: --src {path} does not exist")
    if not os.path.isdir(path):
        raise SourceError(f"{what}: --src {path} is not a directory")
    return os.path.abspath(path)
