"""Atomic writers and typed readers for the files of a dataset directory.

Every writer goes through a temporary name in the same directory and `os.replace`, so a
reader (or a resumed run) never sees a half-written file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import (
    DATASET_JSON,
    MANIFEST_PARQUET,
    MANIFEST_SCHEMA,
    SHARDS_PARQUET,
    SHARDS_SCHEMA,
    DatasetInfo,
    FormatError,
)

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table_atomic(path, rows: list[dict] | pa.Table, schema: pa.Schema) -> pa.Table:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    table = table.cast(schema)  # raises on a column of the wrong type
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def sha256_file(path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex digest, size in bytes) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# --- dataset.json -------------------------------------------------------------------------

def write_dataset_info(out_dir, info: DatasetInfo) -> None:
    write_json_atomic(Path(out_dir) / DATASET_JSON, info.to_dict())


def read_dataset_info(out_dir) -> DatasetInfo:
    path = Path(out_dir) / DATASET_JSON
    if not path.exists():
        raise FormatError(f"{out_dir}: not a dynavit dataset directory (no {DATASET_JSON}; incomplete run?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    return DatasetInfo.from_dict(d)


# --- Parquet manifests --------------------------------------------------------------------

def write_manifest(out_dir, rows) -> pa.Table:
    return write_table_atomic(Path(out_dir) / MANIFEST_PARQUET, rows, MANIFEST_SCHEMA)


def write_shards(out_dir, rows) -> pa.Table:
    return write_table_atomic(Path(out_dir) / SHARDS_PARQUET, rows, SHARDS_SCHEMA)


def _read_table(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.exists():
        raise FormatError(f"{path}: missing")
    table = pq.read_table(path)
    if not table.schema.equals(schema, check_metadata=False):
        raise FormatError(f"{path}: schema differs from the contract:\n{table.schema}\nexpected:\n{schema}")
    return table


def read_manifest(out_dir) -> pa.Table:
    return _read_table(Path(out_dir) / MANIFEST_PARQUET, MANIFEST_SCHEMA)


def read_shards(out_dir) -> pa.Table:
    return _read_table(Path(out_dir) / SHARDS_PARQUET, SHARDS_SCHEMA)


def resolve(out_dir, path: str) -> Path:
    """Shard paths are relative to the dataset directory unless absolute (wds images)."""
    p = Path(path)
    return p if p.is_absolute() else Path(out_dir) / p


# --- .npy members -------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --- tar shards ---------------------------------------------------------------------------

def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile` writes for a regular file with mode 0444, uid/gid
    0, no user names and mtime 0, built directly: tarfile's generic path (TarInfo copies,
    field-by-field encoding) was ~10 % of dynaprep's time per image. Long names go through
    tarfile (its prefix/name split)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "  # checksum is computed with this field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class TarWriter:
    """Deterministic tar writer: same members in the same order give the same bytes.

    webdataset's TarWriter stamps the current time and user into each header; a resumed
    run must reproduce an uninterrupted run byte for byte, so every header field is fixed.
    The output is what `tarfile` writes in USTAR format (a test compares them byte for byte).
    The file appears under its final name only on `close()` without an exception.
    """

    def __init__(self, path):
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "wb")
        self._offset = 0
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: `members` maps extension (e.g. "jpg", "k70.npy") to bytes."""
        for ext, data in members.items():
            pad = -len(data) % tarfile.BLOCKSIZE
            self._file.write(ustar_header(f"{key}.{ext}", len(data)))
            self._file.write(data)
            self._file.write(b"\0" * pad)
            self._offset += tarfile.BLOCKSIZE + len(data) + pad
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._file.closed:  # abort() after a failed commit() must not mask the first error
            return
        # End of archive: two zero blocks, then zeros up to a whole record, as tarfile does.
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
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


def iter_tar_samples(path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a tar by key the way webdataset does (key = name up to the
    first dot of the basename), in file order. Independent of webdataset on purpose: the
    validator must not trust the reader it is checking for."""
    current_key, current = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                raise FormatError(f"{path}: member {member.name!r} has no extension")
            key = f"{dirname}/{stem}" if dirname else stem
            if key != current_key:
                if current_key is not None:
                    yield current_key, current
                current_key, current = key, {}
            current[ext] = tar.extractfile(member).read()
    if current_key is not None:
        yield current_key, current
