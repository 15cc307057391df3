"""Atomic file writes: a temporary name in the same directory, fsync, then `os.replace`, so
a reader (or a resumed run) never sees a half-written file."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

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


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie has finished writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def remove_stale_temp_files(out, min_age_s: float = 0.0, recursive: bool = True) -> list[Path]:
    """Remove the `.name.PID.tmp` files (atomic_path's temp names) of writers that were
    killed (dynaprep workers, merge-manifests, a checkpoint write); they are never part of
    the output. A file whose PID is alive on this machine is kept: another rank or run may
    be writing it right now. A PID means nothing on another machine: with shared storage,
    pass `min_age_s` so that only files untouched that long go."""
    removed = []
    now = time.time()
    for path in Path(out).rglob(f".*{TMP_SUFFIX}") if recursive else Path(out).glob(f".*{TMP_SUFFIX}"):
        pid = path.name[:-len(TMP_SUFFIX)].rpartition(".")[2]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if min_age_s and now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(path)
    return removed
