"""Shard pairs (docs/FORMAT.md): the writer and the reader side by side; the sample table
that reads them by offset is samples.py.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inputs import open_regular
from .io import npy_bytes, sha256_file
from .schema import (CLS_EXT, IMAGE_EXTS, SCORES_EXT, image_shard_name, index_dtype_name, index_shard_name, k_ext)
from .tar import (BLOCK, TarError, TarWriter, group_by_keys, header_name, join_fragments, scan_members,
                  split_name)


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


__all__ = ["ShardPairWriter", "join_pieces", "describe_shard", "fragment_paths", "UNLABELED", "ImageMember", "scan_image_shard", "IndexShard", "MismatchError", "read_npy", "check_indices", "TarError", "CLS_EXT", "SCORES_EXT", "k_ext"]
