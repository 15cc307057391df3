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

class TarWriter:
    """Deterministic tar writer: same members in the same order give the same bytes.

    webdataset's TarWriter stamps the current time and user into each header; a resumed
    run must reproduce an uninterrupted run byte for byte, so every header field is fixed.
    The file appears under its final name only on `close()` without an exception.
    """

    def __init__(self, path):
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: `members` maps extension (e.g. "jpg", "k70.npy") to bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._file.closed:  # abort() after a failed commit() must not mask the first error
            return
        self._tar.close()
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
