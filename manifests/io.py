"""Atomic writers and typed readers for the files of a dataset directory.

Every writer goes through a temporary name in the same directory and `os.replace`, so a
reader (or a resumed run) never sees a half-written file.
"""
from __future__ import annotations

import functools
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

from .atomic import TMP_SUFFIX, atomic_path, write_bytes_atomic, write_json_atomic  # noqa: F401 (re-exported)
from .inputs import open_regular
from .schema import (
    DATASET_JSON,
    MANIFEST_PARQUET,
    MANIFEST_SCHEMA,
    MANIFEST_SCHEMA_NO_OFFSETS,
    SHARDS_PARQUET,
    SHARDS_SCHEMA,
    DatasetInfo,
    FormatError,
)

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
    with os.fdopen(open_regular(path), "rb") as f:  # a FIFO in a dataset folder must not block
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


def _read_table(path: Path, schema: pa.Schema, older: pa.Schema | None = None,
                columns: tuple[str, ...] | None = None) -> pa.Table:
    """The table at `path`, checked against `schema`. A table with the `older` schema (the
    contract before its last columns were added) is returned with those columns null.
    `columns`: only these are read (the file's whole schema is still checked).

    Read once per process while the file stays the same (same inode, size and mtime): a
    training run asks for the manifest from its config check and from each loader, and
    at 1.28 M rows every read costs a second and a copy of the table."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    return _read_table_cached(str(Path(path).absolute()), (st.st_ino, st.st_size, st.st_mtime_ns), schema, older,
                              columns)


@functools.lru_cache(maxsize=8)
def _read_table_cached(path: str, _stamp: tuple, schema: pa.Schema, older: pa.Schema | None,
                       columns: tuple[str, ...] | None = None) -> pa.Table:
    found = pq.read_schema(path)
    is_older = older is not None and found.equals(older, check_metadata=False)
    if not is_older and not found.equals(schema, check_metadata=False):
        raise FormatError(f"{path}: schema differs from the contract:\n{found}\nexpected:\n{schema}")
    names = schema.names if columns is None else list(columns)
    table = pq.read_table(path, columns=[c for c in names if c in found.names])
    for name in names:
        if name not in table.schema.names:  # a column the older contract did not have
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(names)


# What the trainer's loaders and config check read of manifest.parquet: a third of an
# ImageNet manifest's bytes (source paths, class names and sha256 digests are the rest).
LOADER_COLUMNS = ("split", "key", "shard", "label", "status", "image_offset", "image_bytes")


def read_manifest(out_dir, columns: tuple[str, ...] | None = None) -> pa.Table:
    """manifest.parquet (only `columns` if given, in that order); one written before the
    offset columns existed has them null."""
    return _read_table(Path(out_dir) / MANIFEST_PARQUET, MANIFEST_SCHEMA, MANIFEST_SCHEMA_NO_OFFSETS,
                       None if columns is None else tuple(columns))


def read_shards(out_dir) -> pa.Table:
    return _read_table(Path(out_dir) / SHARDS_PARQUET, SHARDS_SCHEMA)


def resolve(out_dir, path: str) -> Path:
    """Shard paths are relative to the dataset directory unless absolute (wds images)."""
    p = Path(path)
    return p if p.is_absolute() else Path(out_dir) / p


# --- .npy members -------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    """np.save's bytes of an array. The header depends only on dtype and shape, so it is
    built once per (dtype, shape) by np.save itself: np.save per array was ~50 µs, four of
    them per image the largest part of writing a sample's index members."""
    a = np.ascontiguousarray(array)
    return _npy_header(a.dtype.str, a.shape) + a.tobytes()


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.dtype(dtype)), allow_pickle=False)
    data = buf.getvalue()
    return data[:len(data) - np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))]


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --- tar shards ---------------------------------------------------------------------------

def iter_tar_samples(path, where: dict | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a tar by key the way webdataset does (key = name up to the
    first dot of the basename), in file order, with `tarfile` itself. Independent of the
    trainer's reader (manifests.tar.scan_members) on purpose: the validator must not trust
    the reader it is checking for. `where`, when given, gets key -> {ext: (data offset,
    size)} as tarfile found them (the first copy of a repeated key)."""
    current_key, current, first = None, {}, False
    with os.fdopen(open_regular(path), "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
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
                first = where is not None and key not in where
                if first:
                    where[key] = {}
            current[ext] = tar.extractfile(member).read()
            if first:
                where[key].setdefault(ext, (member.offset_data, member.size))
    if current_key is not None:
        yield current_key, current
