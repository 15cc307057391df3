"""Shard pairs (DESIGN §3): the writer and the reader side by side.

An image shard holds `{key}.jpg|png` (+ `{key}.cls`) per sample; each index shard holds
`{key}.scores.npy` and one `{key}.k{K}.npy` per K, same keys, same order.

Reading is random access by byte offset, never a stream through the tar:
- an image member's (offset, size) is manifest.parquet's (`image_offset`, `image_bytes`),
  recorded by the writer (ours) or the indexer (a user's WebDataset); a shard without them
  (an older dataset) or changed since indexing is scanned, headers only (`scan_image_shard`);
  every read checks the header before the data (`read_member`);
- an index shard needs no scan at all: every sample has the same members of the same sizes,
  so sample i starts at i · record (`IndexShard`); each read checks the member's name, so
  a shard whose keys differ from its image shard is caught at the sample that differs.
"""
from __future__ import annotations

import ast
import functools
import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import locations
from .inputs import open_regular
from .io import LOADER_COLUMNS, npy_bytes, read_manifest, read_shards, sha256_file
from .schema import (CLS_EXT, DATASET_JSON, IMAGE_EXTS, SHARDS_PARQUET, SCORES_EXT, STATUS_OK, DatasetInfo, FormatError, image_shard_name,
                     index_dtype_name, index_shard_name, k_ext)
from .tar import (BLOCK, TarError, TarWriter, _octal, group_by_keys, header_name, join_fragments,
                  scan_members, split_name)


UNLABELED = -1  # label of a sample of an unlabeled split
log = logging.getLogger(__name__)


# --- writing ------------------------------------------------------------------------------

class ShardPairWriter:
    """Write the tars of one work unit and return its `shards.parquet` row on commit.

    With `external_images` (the user's own WebDataset) no image shard is written: the row
    points at the user's tar (`images_digest`: its (sha256, bytes), which its reader took),
    and only the index shards are ours.

    With `piece` (a path prefix) the writer holds one piece of the shard: its tars are
    fragments `{piece}.images` and `{piece}.topk-{scorer}` without an end of archive, and
    `join_pieces` makes the shard from the pieces in order (the same bytes as written whole).
    """

    def __init__(self, out_dir, split: str, shard: int, scorers, ks, num_patches: int,
                 image_ext: str = "jpg", external_images: str | None = None, images_digest=None,
                 piece=None):
        self.out_dir, self.split, self.shard = Path(out_dir), split, shard
        self.scorers, self.ks, self.image_ext = list(scorers), list(ks), image_ext
        self.dtype = np.dtype(index_dtype_name(num_patches))
        self.external_images = external_images
        self.images_digest = images_digest  # may be set after the samples are written
        self.piece = piece
        self.images_rel = external_images or image_shard_name(split, shard)
        self.index_rel = {s: index_shard_name(split, s, shard) for s in self.scorers}
        where = fragment_paths(piece, self.scorers) if piece is not None else \
            {"images": self.out_dir / self.images_rel, **{s: self.out_dir / r for s, r in self.index_rel.items()}}
        self._images = None if external_images else TarWriter(where["images"], fragment=piece is not None)
        self._index = {s: TarWriter(where[s], fragment=piece is not None) for s in self.scorers}
        self.count = 0

    def add(self, key: str, image: bytes | None, label: int | None,
            scores: dict[str, np.ndarray], indices: dict[str, dict[int, np.ndarray]]) -> tuple[int, int] | None:
        """Write one sample; returns (byte offset, size) of its image member in the image
        tar (in the piece's fragment for a piece), None when the images are the user's."""
        where = None
        if self._images is not None:
            members = {self.image_ext: image}
            if label is not None:
                members[CLS_EXT] = str(int(label)).encode()
            where = (self._images.write(key, members)[self.image_ext], len(image))
        for scorer, writer in self._index.items():
            members = {SCORES_EXT: npy_bytes(np.asarray(scores[scorer], dtype=np.float16))}
            for k in self.ks:
                members[k_ext(k)] = npy_bytes(np.asarray(indices[scorer][k], dtype=self.dtype))
            writer.write(key, members)
        self.count += 1
        return where

    def commit(self) -> dict | int:
        """Close every tar (index shards first, images last) and describe them; a piece
        returns its sample count only (the shard is described when its pieces are joined)."""
        for writer in self._index.values():
            writer.close()
        if self._images is not None:
            self._images.close()
        if self.piece is not None:
            return self.count
        if self._images is not None:
            images_digest = self._images.digest
        else:  # the user's tar: its reader's digest, or the file as it is
            images_digest = self.images_digest or sha256_file(self.out_dir / self.images_rel)
        digests = {self.images_rel: images_digest, **{self.index_rel[s]: w.digest for s, w in self._index.items()}}
        return describe_shard(self.split, self.shard, self.images_rel, self.index_rel, self.count, digests)

    def abort(self) -> None:
        for writer in [*self._index.values(), *([self._images] if self._images else [])]:
            writer.close(ok=False)


def describe_shard(split: str, shard: int, images_rel: str, index_rel: dict, count: int, digests: dict) -> dict:
    """The shard's `shards.parquet` row. `digests` maps each tar's relative path to its
    (sha256, bytes): taken by its writer while writing (ours), or by its reader (a user's
    tar, possibly remote)."""
    index = [{"scorer": scorer, "path": rel, "bytes": digests[rel][1], "sha256": digests[rel][0]}
             for scorer, rel in index_rel.items()]
    digest, size = digests[images_rel]
    return {"split": split, "shard": shard, "images": images_rel, "images_bytes": size,
            "images_sha256": digest, "index": index, "count": count}


def join_pieces(out_dir, split: str, shard: int, scorers, pieces: list, counts: list[int],
                external_images: str | None = None, images_digest: tuple[str, int] | None = None) -> dict:
    """Make one shard's tars from the fragments of its `pieces` (path prefixes, in order)
    and return its row: byte for byte what one ShardPairWriter would have written."""
    out_dir = Path(out_dir)
    images_rel = external_images or image_shard_name(split, shard)
    index_rel = {s: index_shard_name(split, s, shard) for s in scorers}
    targets = dict(index_rel) if external_images else {"images": images_rel, **index_rel}
    digests = {rel: join_fragments([fragment_paths(p, scorers)[name] for p in pieces], out_dir / rel)
               for name, rel in targets.items()}
    if external_images:  # the user's tar: its reader's digest, or the file as it is
        digests[images_rel] = images_digest or sha256_file(out_dir / images_rel)
    return describe_shard(split, shard, images_rel, index_rel, sum(counts), digests)


def fragment_paths(piece, scorers) -> dict:
    """Where the tar fragments of one piece go: "images" and one per scorer."""
    return {"images": Path(f"{piece}.images"), **{s: Path(f"{piece}.topk-{s}") for s in scorers}}


# --- reading: image shards ----------------------------------------------------------------

@dataclass(frozen=True)
class ImageMember:
    ext: str
    offset: int
    size: int


def scan_image_shard(path: str) -> list[tuple[str, ImageMember | None, str | None]]:
    """(key, image member or None, problem) per sample of an image shard, in file order.
    Raises TarError when the tar itself cannot be read."""
    out = []
    for key, group, problem in group_by_keys(scan_members(path)):
        ext = next((e for e in IMAGE_EXTS if e in group), None)
        if ext is None and problem is None:
            problem = f"no image member (has {', '.join(sorted(group)) or 'none'})"
        member = None if ext is None else ImageMember(ext, group[ext].offset, group[ext].size)
        out.append((key, member, problem))
    return out


# --- reading: index shards ----------------------------------------------------------------

class IndexShard:
    """Random access to an index shard: sample i's record starts at i · record bytes.

    The layout (member order and sizes) is read from the first sample; a shard that does not
    follow it is caught by the name check of every read."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            raise TarError(f"{path}: shard file missing") from None
        except OSError as e:  # a FIFO or device where a shard belongs
            raise TarError(f"{path}: {e.strerror or e}") from None
        try:
            size = os.fstat(fd).st_size
            first_key, members, pos = None, {}, 0
            while pos + BLOCK <= size:  # headers of the first sample only
                h = os.pread(fd, BLOCK, pos)
                key, ext = split_name(header_name(h))
                if h == bytes(BLOCK) or (first_key is not None and key != first_key):
                    break
                n = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
                first_key = key
                members[ext] = (pos, n)
                pos += BLOCK + n + (-n % BLOCK)
        finally:
            os.close(fd)
        if count and not members:
            raise TarError(f"{path}: 0 samples, shards.parquet says {count}")
        self.record = pos
        self.members = members  # ext -> (offset of its header within a record, data size)
        if count * self.record > size:
            raise TarError(f"{path}: {size // max(1, self.record)} samples, shards.parquet says {count} "
                           f"(truncated shard?)")

    def read(self, fd: int, pos: int, key: str, ext: str) -> bytes:
        """The bytes of member `ext` of sample number `pos`, which must have key `key`."""
        if ext not in self.members:
            raise KeyError(f"no {ext}")
        rel, n = self.members[ext]
        raw = os.pread(fd, BLOCK + n, pos * self.record + rel)
        name = header_name(raw)
        if name != f"{key}.{ext}":
            got, _ = split_name(name)
            raise MismatchError(got, pos)
        return raw[BLOCK:]


class MismatchError(Exception):
    """The index shard's sample at `pos` has another key than the image shard's."""

    def __init__(self, got: str | None, pos: int):
        super().__init__(got, pos)
        self.got, self.pos = got, pos


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
        manifest = read_manifest(dataset_dir, LOADER_COLUMNS)
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


# --- .npy members -------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple, bool]:
    """Parsed once per distinct header: every k70.npy of a dataset has the same one, and
    numpy's own parser (ast.literal_eval) costs more per sample than the rest of a read."""
    d = ast.literal_eval(header[10 if header[6] == 1 else 12:].decode("latin1"))
    return np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"])


def read_npy(data: bytes) -> np.ndarray:
    """np.load of a version 1/2 .npy without pickles, with the header parse cached."""
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # let numpy say what is wrong
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran = _npy_header(data[:start])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def check_indices(idx: np.ndarray, n: int, kept: int) -> str | None:
    """What is wrong with a stored kept-index array (DESIGN §3), or None."""
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


__all__ = ["ShardPairWriter", "join_pieces", "describe_shard", "fragment_paths", "SampleTable", "Shard", "ShardError", "build_table", "image_shard_path", "index_shard_path", "UnsafeRowError", "UNLABELED", "ImageMember", "scan_image_shard", "IndexShard", "MismatchError", "read_npy", "read_member", "MemberError", "member_problem",
           "check_indices", "TarError", "CLS_EXT", "SCORES_EXT", "k_ext"]
