"""The sample table of a split: manifest.parquet and shards.parquet read once into one
lookup (key, label, shard, image offset and size), the shard paths resolved and checked
(local, or remote only when trusted), and `read_member`, which reads one image member by
offset after checking its tar header. No per-sample read when the manifest records the
offsets; an older dataset's image shards are scanned, headers only, with one notice.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import locations
from .inputs import open_regular
from .io import read_manifest, read_shards
from .schema import (DATASET_JSON, SHARDS_PARQUET, STATUS_OK, DatasetInfo, FormatError)
from .tar import (BLOCK, TarError, _octal, header_name, split_name)


from .shards import IndexShard, UNLABELED, scan_image_shard

log = logging.getLogger(__name__)


# --- reading: the sample table of a split --------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    images: str  # absolute paths, so worker processes need no dataset dir
    index: str
    layout: IndexShard | None  # None when the shard is bad


@dataclass
class SampleTable:
    """Every usable sample of a split, in file order (shard by shard)."""

    shards: list[Shard]
    keys: list[str]
    shard: np.ndarray      # int32: which shard
    pos: np.ndarray        # int32: position in its index shard
    offset: np.ndarray     # int64: byte offset of the image member's data
    size: np.ndarray       # int64: its length
    label: np.ndarray      # int64; UNLABELED when none
    problems: list[tuple[str, int]]  # (one-line message, samples lost) per bad shard

    def __len__(self) -> int:
        return len(self.keys)


def image_shard_path(dataset_dir, info: DatasetInfo, row: dict, images_root: str | None = None,
                     fetch: bool = True, trust_urls: bool = False) -> str:
    """Where to read the image shard of a shards.parquet row: ours under the dataset dir; a
    user's under `images_root` (default: dataset.json's), a remote one copied into the local
    cache (checked against the sha256 taken at indexing) unless `fetch` is False.

    The row and dataset.json are data: a location they name must stay under the dataset dir
    (ours) or the images root (a user's). `images_root` is the user's own (--images-root), so
    it may be a URL or a command; dataset.json's may only with `trust_urls`
    (locations.TRUST_OPTION). UnsafeRowError otherwise."""
    try:
        if not info.external_images:
            return locations.under(str(Path(dataset_dir).absolute()), row["images"],
                                   f"{SHARDS_PARQUET} (shard {row['split']}/{row['shard']})", trust_urls)
        if not images_root:
            locations.check_root(info.images_root, DATASET_JSON, trust_urls)
        location = locations.under(images_root or info.images_root or "", row["images"],
                                   f"{SHARDS_PARQUET} (shard {row['split']}/{row['shard']})", trust_urls)
    except locations.UnsafeLocationError as e:
        raise UnsafeRowError(f"{dataset_dir}: {e}") from None
    if locations.is_url(location):
        if not fetch:
            return location
        try:
            return locations.fetch(location, (row["images_sha256"], row["images_bytes"]))
        except OSError as e:
            raise ShardError(f"cannot read image shard {location}: {e}") from None
    return str(Path(locations.local_path(location)).absolute())


def index_shard_path(dataset_dir, rel: str, row: dict) -> str:
    """An index shard's path (always ours): under the dataset dir, or UnsafeRowError."""
    try:
        return locations.under(str(Path(dataset_dir).absolute()), rel,
                               f"{SHARDS_PARQUET} (shard {row['split']}/{row['shard']})")
    except locations.UnsafeLocationError as e:
        raise UnsafeRowError(f"{dataset_dir}: {e}") from None


def moved_hint(path: str, root: str | None) -> str:
    """The one-line error for a user's image shard that is not where it was indexed."""
    return (f"{path}: image shard missing (the user's tars are read in place under images_root "
            f"{root or '-'}; if they moved, pass --images-root NEW_ROOT)")


def build_table(dataset_dir, info: DatasetInfo, split: str, scorer: str,
                images_root: str | None = None, trust_urls: bool = False) -> SampleTable:
    """Join manifest.parquet (keys, labels, order, image offsets) with shards.parquet.
    `images_root` overrides where a user's WebDataset lies (see `image_shard_path`).

    No per-sample read: the image offsets are manifest.parquet's. Per shard, one read of
    the last sample's tar header checks that the shard is still the one indexed, and the
    index shard's layout is read from its first sample. A shard without recorded offsets
    (a dataset written before they existed, a compressed user tar) or whose last header is
    not where they say (changed since indexing) is scanned, headers only, as before, with a
    one-line notice."""
    try:
        rows = [r for r in read_shards(dataset_dir).to_pylist() if r["split"] == split]
        manifest = read_manifest(dataset_dir)
    except (FormatError, OSError) as e:
        raise ShardError(str(e)) from None
    import pyarrow.compute as pc  # here, not at the top: dynaprep's workers never need it (start-up time)

    manifest = manifest.filter(pc.and_(pc.equal(manifest["split"], split), pc.equal(manifest["status"], STATUS_OK)))
    all_keys = manifest["key"].to_pylist()
    shard_of = manifest["shard"].to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    labels = manifest["label"].fill_null(UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = manifest["image_offset"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    sizes = manifest["image_bytes"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(shard_of, kind="stable")  # manifest order (file order) within a shard
    numbers, starts, counts = np.unique(shard_of[order], return_index=True, return_counts=True)
    rows_of = {int(n): order[a:a + c] for n, a, c in zip(numbers, starts, counts)}

    shards: list[Shard] = []
    parts: dict[str, list] = {"rows": [], "shard": [], "offset": [], "size": []}
    problems, scanned = [], []
    for row in sorted(rows, key=lambda r: r["shard"]):
        paths = {e["scorer"]: e["path"] for e in row["index"]}
        if scorer not in paths:
            raise ShardError(f"shards.parquet: shard {split}/{row['shard']} has no index shard for scorer "
                            f"{scorer!r} (has {', '.join(sorted(paths)) or 'none'})")
        if row["count"] == 0:
            continue
        index = index_shard_path(dataset_dir, paths[scorer], row)
        try:
            images = image_shard_path(dataset_dir, info, row, images_root, trust_urls=trust_urls)
        except UnsafeRowError:
            raise  # the dataset folder itself is not to be trusted: no shard of it is read
        except ShardError as e:
            problems.append((str(e), row["count"]))
            continue
        if info.external_images and not os.path.exists(images):
            problems.append((moved_hint(images, images_root or info.images_root), row["count"]))
            continue
        mine = rows_of.get(row["shard"], np.zeros(0, np.int64))
        try:
            if len(mine) != row["count"]:
                raise ShardError(f"{images} / {index}: manifest.parquet has {len(mine)} ok samples, shards.parquet "
                                f"says {row['count']}")
            off, size = offsets[mine], sizes[mine]
            if (off < BLOCK).any() or (size < 0).any() or not _last_in_place(images, all_keys[mine[-1]],
                                                                              int(off[-1]), int(size[-1])):
                scanned.append((images, bool((off < 0).any())))
                members = _image_members(images, index, [all_keys[j] for j in mine], row["count"],
                                         info.external_images)
                off = np.fromiter((members[all_keys[j]].offset for j in mine), np.int64, len(mine))
                size = np.fromiter((members[all_keys[j]].size for j in mine), np.int64, len(mine))
            layout = IndexShard(index, row["count"])
        except (TarError, ShardError) as e:
            problems.append((str(e), row["count"]))
            continue
        parts["rows"].append(mine)
        parts["shard"].append(np.full(len(mine), len(shards), np.int32))
        parts["offset"].append(off)
        parts["size"].append(size)
        shards.append(Shard(images, index, layout))
    if scanned:
        _notice_scan(dataset_dir, split, scanned)
    take = np.concatenate(parts["rows"]) if parts["rows"] else np.zeros(0, np.int64)
    cat = {name: np.concatenate(v) if v else np.zeros(0, np.int64) for name, v in parts.items()}
    pos = (np.arange(len(take)) - np.repeat(np.cumsum([0] + [len(r) for r in parts["rows"]])[:-1],
                                             [len(r) for r in parts["rows"]])).astype(np.int32)
    return SampleTable(shards, [all_keys[j] for j in take.tolist()], cat["shard"].astype(np.int32), pos,
                       cat["offset"].astype(np.int64), cat["size"].astype(np.int64), labels[take], problems)


_noticed: set = set()


def _notice_scan(dataset_dir, split: str, scanned: list) -> None:
    """One line, once per dataset and reason in a process (a run builds several loaders):
    why the loader scanned, and how to stop it."""
    old = sum(1 for _, missing in scanned if missing)
    if old:
        why = (f"manifest.parquet records no image offsets for {old} shard(s) (written by an older dynaprep, "
               f"or a compressed tar); re-index to start without the scan")
    else:
        why = f"the image shard changed since indexing ({scanned[0][0]}); `dynaprep verify` checks it"
    if (str(dataset_dir), split if not old else None, bool(old)) in _noticed:
        return
    _noticed.add((str(dataset_dir), split if not old else None, bool(old)))
    log.warning("notice: %s split %r: scanned %d image shard(s) for offsets: %s", dataset_dir, split,
                len(scanned), why)


def _last_in_place(images: str, key: str, offset: int, size: int) -> bool:
    """True when the tar header just before `offset` is the member of `key` with `size`
    bytes: the shard's last sample is where manifest.parquet says (one read per shard;
    a truncated or rewritten shard fails it)."""
    try:
        fd = open_regular(images)
    except FileNotFoundError:
        raise TarError(f"{images}: shard file missing") from None
    except OSError as e:
        raise TarError(f"{images}: unreadable ({e.strerror or e})") from None
    try:
        return member_problem(os.pread(fd, BLOCK, offset - BLOCK), key, size) is None
    finally:
        os.close(fd)


def member_problem(header: bytes, key: str, size: int) -> str | None:
    """What is wrong with the tar header found just before a recorded image offset, or None
    when it is the header of a member of sample `key` with `size` bytes. A name too long
    for the header's field (GNU or pax long names) is checked as far as the field holds it,
    a non-ASCII one not at all (pax keeps it in the extension record before the header)."""
    try:  # any tar dialect (v7, ustar, GNU, pax): the member's own header has a valid checksum
        stored, found = _octal(header[148:156]), _octal(header[124:136])
    except ValueError:
        stored = found = None
    signed = sum(struct.unpack("148b", header[:148]) + struct.unpack("356b", header[156:])) + 256 \
        if len(header) == BLOCK else None
    if len(header) < BLOCK or stored not in (sum(header[:148]) + 256 + sum(header[156:]), signed) \
            or header[156:157] == b"5":
        return "no tar member header there"
    if found != size:
        return f"the member there is {found} bytes, manifest.parquet says {size}"
    name = header_name(header)
    if split_name(name)[0] == key:
        return None
    if header[99] != 0 and not header[345] and (f"{key}.".startswith(name) or name.startswith(f"{key}.")):
        return None  # a long name cut to the 100-byte field; the full name is in an extension header
    if not key.isascii():
        return None  # a pax tar writes such a name in its extension record, '?'s in the header
    return f"the member there is {name[:120]!r}"


def _image_members(images: str, index: str, keys: list[str], count: int, external: bool) -> dict:
    """key → image member for the `keys` of one shard. Our image shard holds exactly those
    keys in that order; a user's WebDataset may also hold samples that failed indexing."""
    if len(keys) != count:
        raise ShardError(f"{images} / {index}: manifest.parquet has {len(keys)} ok samples, shards.parquet "
                        f"says {count}")
    scanned = scan_image_shard(images)
    if not external:
        found = [key for key, _, _ in scanned]
        if len(found) != count:
            raise ShardError(f"{images} / {index}: {len(found)} samples, shards.parquet says {count} "
                            f"(truncated shard?)")
        if found != keys:
            i = next(i for i, (a, b) in enumerate(zip(found, keys)) if a != b)
            raise ShardError(f"{images}: keys differ from manifest.parquet at sample {i}: "
                            f"{found[i]!r} vs {keys[i]!r}")
    members: dict = {}
    for key, member, _ in scanned:  # a key repeated in a user's tar: the first copy, as indexed
        members.setdefault(key, member)
    missing = [key for key in keys if members.get(key) is None]
    if missing:
        problem = next((p for key, _, p in scanned if key == missing[0]), None) or "not in the image shard"
        raise ShardError(f"{images}: sample {missing[0]!r}: {problem}")
    return members


class ShardError(Exception):
    """A shard that does not match the manifests (count, keys, a missing member); one line."""


class UnsafeRowError(ShardError):
    """shards.parquet or dataset.json names a URL, a command or a path outside its folder."""


def read_member(fd_images: int, table: "SampleTable", i: int) -> bytes:
    """The image bytes of sample i (fd_images: the opened image shard of its shard), read
    together with the tar header before them (one pread): the header must name sample i's
    key and size, so a shard changed since indexing is caught at the sample that moved."""
    size, offset = int(table.size[i]), int(table.offset[i])
    raw = os.pread(fd_images, BLOCK + size, offset - BLOCK)
    problem = member_problem(raw[:BLOCK], table.keys[i], size) if len(raw) == BLOCK + size else \
        f"the shard ends before its {size} bytes at offset {offset}"
    if problem:
        raise MemberError(f"{problem}: not the member manifest.parquet records at offset {offset} "
                          f"(shard changed since indexing? `dynaprep verify` checks it)")
    return raw[BLOCK:]


class MemberError(ValueError):
    """The image member is not at its recorded offset (the shard changed since indexing)."""
