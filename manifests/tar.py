"""Tar files as the shards use them: a deterministic writer, a header-only scanner, and the
one rule that groups members into samples (webdataset's).

Writer and reader sit side by side (as ffcv keeps a field's encoder and decoder together),
so the byte layout the writer produces is the one the scanner assumes.

- `TarWriter` writes plain USTAR, byte-equal to `tarfile` with fixed header fields.
- `scan_members(path)` lists every regular member as (name, data offset, size) by reading
  headers only (512 bytes each, data skipped): this is what makes random access by byte
  offset possible without storing offsets anywhere. Plain USTAR is parsed directly; any
  other dialect (GNU long names, pax) goes through `tarfile`, which knows them all.
  Compressed tars cannot be read by offset: `TarError` says so.
- `split_name` / `group_by_keys`: a member `dir/key.ext` belongs to sample `dir/key`
  (key = name up to the first dot of the basename, ext lower-cased); consecutive members
  with the same key form one sample. Every reader of shards, ours or a user's, groups
  through these two functions.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator

from .atomic import atomic_path
from .inputs import open_regular

BLOCK = tarfile.BLOCKSIZE  # 512
_ZEROS = bytes(BLOCK)
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst")


class TarError(ValueError):
    """A tar that cannot be read as asked (truncated, not a tar, compressed); one line naming the file."""


# --- writing ------------------------------------------------------------------------------

def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile` writes for a regular file with mode 0444, uid/gid
    0, no user names and mtime 0, built directly from a fixed template: tarfile's generic
    path (TarInfo copies, field-by-field encoding) was ~10 % of dynaprep's time per image.
    Only the name, the size and the checksum vary; the checksum is the template's plus the
    byte sums of those two fields. Long names go through tarfile (its prefix/name split)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _HEADER_MODE_IDS, size_field, _HEADER_MTIME,
                     b"%06o\0 " % checksum, _HEADER_TAIL))


_HEADER_MODE_IDS = b"0000444\0" b"0000000\0" b"0000000\0"  # bytes 100-124: mode, uid, gid
_HEADER_MTIME = b"00000000000\0"  # bytes 136-148
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(512 - 265)  # typeflag, linkname, magic, version, rest
# the checksum of a header with an empty name and size field: fixed fields + 8 spaces for itself
_HEADER_SUM = sum(_HEADER_MODE_IDS) + sum(_HEADER_MTIME) + sum(_HEADER_TAIL) + 8 * ord(" ")


class TarWriter:
    """Deterministic tar writer: same members in the same order give the same bytes.

    webdataset's TarWriter stamps the current time and user into each header; a resumed
    run must reproduce an uninterrupted run byte for byte, so every header field is fixed.
    The output is what `tarfile` writes in USTAR format (a test compares them byte for byte).
    The file appears under its final name only on `close()` without an exception.

    fragment=True leaves out the end-of-archive blocks: the file is then one piece of a tar
    that `join_fragments` assembles. Member bytes do not depend on where a member sits, so
    a shard written in pieces by several workers is the same file as one written whole.

    After `close()`, `digest` is the file's (sha256 hex, bytes), hashed as the bytes were
    written: reading the file back to hash it cost as much again.
    """

    def __init__(self, path, fragment: bool = False):
        self.fragment = fragment
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "wb")
        self._offset = 0
        self._sha = hashlib.sha256()
        self.digest: tuple[str, int] | None = None
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> dict[str, int]:
        """Write one sample: `members` maps extension (e.g. "jpg", "k70.npy") to bytes.
        Returns ext -> byte offset of that member's data in this file (a fragment: in
        the fragment; `join_fragments` shifts it by the fragments before it)."""
        parts, offsets, at = [], {}, self._offset
        for ext, data in members.items():
            header = ustar_header(f"{key}.{ext}", len(data))
            offsets[ext] = at + len(header)
            parts += (header, data, _ZEROS[:-len(data) % BLOCK])
            at += len(header) + len(data) + (-len(data) % BLOCK)
        sample = b"".join(parts)  # one write per sample: a call per field cost as much as the bytes
        self._file.write(sample)
        self._sha.update(sample)
        self._offset += len(sample)
        self.count += 1
        return offsets

    def close(self, ok: bool = True) -> None:
        if self._file.closed:  # abort() after a failed commit() must not mask the first error
            return
        size = self._offset
        if not self.fragment:
            tail = end_of_archive(self._offset)
            self._file.write(tail)
            self._sha.update(tail)
            size += len(tail)
        self.digest = (self._sha.hexdigest(), size)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if ok:
            self._atomic.__exit__(None, None, None)
        else:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
        return False


def end_of_archive(offset: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record, as tarfile ends an archive of
    `offset` bytes of members."""
    return b"\0" * (2 * BLOCK + (-(offset + 2 * BLOCK) % tarfile.RECORDSIZE))


def join_fragments(fragments, path) -> tuple[str, int]:
    """Write the tar at `path` from fragments (TarWriter(fragment=True) files) in order:
    their bytes back to back, then the end of archive. Atomic, like TarWriter. Returns
    its (sha256 hex, bytes), hashed while written."""
    sha = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        offset = 0
        for fragment in fragments:
            with open(fragment, "rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    sha.update(chunk)
                    offset += len(chunk)
        tail = end_of_archive(offset)
        out.write(tail)
        sha.update(tail)
        out.flush()
        os.fsync(out.fileno())
    return sha.hexdigest(), offset + len(tail)


# --- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # byte offset of the member's data in the (uncompressed) tar file
    size: int


def _octal(field: bytes) -> int:
    return int(field.split(b"\0")[0].strip() or b"0", 8)


def header_name(h: bytes) -> str:
    """The member name of a USTAR header (prefix/name joined)."""
    name, prefix = h[:100].split(b"\0")[0], h[345:500].split(b"\0")[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _plain_header(h: bytes) -> bool:
    """A USTAR header this scanner understands: checksum right, a regular file or directory."""
    return (h[257:262] == b"ustar" and h[156:157] in (b"0", b"\0", b"5")
            and _octal(h[148:156]) == sum(h[:148]) + 256 + sum(h[156:]))


def scan_members(path: str) -> list[Member]:
    """Every regular member of an uncompressed tar, in file order, from its headers alone.

    Raises TarError for a missing, truncated, compressed or unreadable file."""
    if str(path).lower().endswith(COMPRESSED_SUFFIXES):
        raise TarError(f"{path}: compressed tar; members cannot be read by offset (decompress it, e.g. gunzip)")
    try:
        fd = open_regular(path)  # a FIFO must not block the scan, a device must not be read
    except FileNotFoundError:
        raise TarError(f"{path}: shard file missing") from None
    except OSError as e:
        raise TarError(f"{path}: unreadable ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos + BLOCK <= size:
            h = os.pread(fd, BLOCK, pos)
            if h == bytes(BLOCK):  # end-of-archive marker
                return out
            if not _plain_header(h):
                return _scan_with_tarfile(path)
            n = _octal(h[124:136])
            if pos + BLOCK + n > size:
                raise TarError(f"{path}: unreadable tar (truncated member at offset {pos})")
            if h[156:157] != b"5":
                out.append(Member(header_name(h), pos + BLOCK, n))
            pos += BLOCK + n + (-n % BLOCK)
        if pos != size:
            raise TarError(f"{path}: unreadable tar (truncated header at offset {pos})")
        return out  # no end marker: tolerated, as tarfile does
    finally:
        os.close(fd)


def _scan_with_tarfile(path: str) -> list[Member]:
    try:
        with tarfile.open(path, mode="r:") as tf:
            return [Member(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TarError(f"{path}: unreadable tar ({e})") from None


_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's tariterators.base_plus_ext
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta, matched at the start


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, lower-cased extension) of a member name, or (None, None) for members that
    belong to no sample (no extension, webdataset metadata such as __key__), exactly as
    webdataset's tar_file_iterator + base_plus_ext decide."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
        return None, None
    m = _BASE_PLUS_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def group_by_keys(members: Iterable) -> Iterator[tuple[str, dict, str | None]]:
    """(key, {ext: member}, problem) per sample, for any items with a `.name` (Member,
    TarInfo) or (name, payload) pairs. Consecutive members with one key form a sample;
    a repeated extension in a sample is its `problem` (webdataset would raise)."""
    key, group, problem = None, {}, None
    for item in members:
        name = item[0] if isinstance(item, tuple) else item.name
        k, ext = split_name(name)
        if k is None:
            continue
        if k != key:
            if key is not None:
                yield key, group, problem
            key, group, problem = k, {}, None
        if ext in group:
            problem = problem or f"duplicate member {name}"
        else:
            group[ext] = item
    if key is not None:
        yield key, group, problem


def read_at(fd: int, member: Member) -> bytes:
    data = os.pread(fd, member.size, member.offset)
    if len(data) != member.size:
        raise TarError(f"member {member.name} is truncated")
    return data
