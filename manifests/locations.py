"""Where a user's image shards live: local paths or URLs, and how to reach them.

`--data wds` indexes tars in place, and they need not be on this machine: `http(s)://`,
`s3://`/`gs://` (through fsspec and its s3fs/gcsfs backend), `pipe:COMMAND` (webdataset's
convention: the command's stdout is the tar) and `file://` are read as streams. dataset.json
records the common root of a dataset's image shards (`images_root`) and shards.parquet each
shard relative to it, so moved tars are found again by overriding the root
(`dynatrain train --images-root`, `dynaprep verify --images-root`).

The trainer reads images by byte offset, which a stream cannot do: a remote shard is copied
once into a local cache (`fetch`), checked against the sha256 that indexing recorded, and
read from there.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from .atomic import atomic_path

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_PLAIN = re.compile(r"[A-Za-z0-9._/-]+")  # a shard name that may follow a user's pipe: root
FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


class LocationError(OSError):
    """A shard location that cannot be read; one line naming it."""


# A dataset folder is data: what it names is read, never run. A location read from
# dataset.json, shards.parquet or a run's config.json may only be a local path under the
# dataset folder (our shards) or under the images root (a user's tars); a URL or a `pipe:`
# command is honoured only when given on the command line (--images-root) or with this option.
TRUST_OPTION = "--trust-dataset-urls"


class UnsafeLocationError(LocationError):
    """A location read from disk that names a URL, a command or a path outside its folder."""


def _kind(location: str) -> str:
    return "a command" if location.startswith("pipe:") else "a URL"


def check_root(root: str | None, what: str, trusted: bool) -> None:
    """Refuse `root` (an images root read from `what`, e.g. "dataset.json") when it is a URL
    or a command and the user has not vouched for it."""
    if root and is_url(root) and not trusted:
        raise UnsafeLocationError(
            f"{what}'s images_root {root[:80]!r} is {_kind(root)}; a dataset folder may only name local "
            f"paths (pass --images-root with the location, or {TRUST_OPTION} if you trust this folder)")


def under(root: str, rel: str, what: str, trusted: bool = False) -> str:
    """`rel` (read from `what`) joined under `root`, refused unless it stays inside `root`:
    no URL or command, no absolute path elsewhere, no `..` out of it. With `trusted` (the
    user's opt-in) anything goes, as `join` does."""
    rel = str(rel)
    if trusted:
        return join(root, rel)
    if is_url(rel) or "\0" in rel:
        raise UnsafeLocationError(f"{what} names {_kind(rel)} ({rel[:80]!r}) where a path under {root or '.'} "
                                  f"belongs (pass {TRUST_OPTION} if you trust this folder)")
    if root and is_url(root):
        parts = local_path(rel).split("/")
        if rel.startswith("/") or ".." in parts:
            raise UnsafeLocationError(f"{what} names {rel[:80]!r}, which is not under {root}")
        if root.startswith("pipe:") and not _PLAIN.fullmatch(rel):  # it is appended to a shell command
            raise UnsafeLocationError(f"{what} names {rel[:80]!r}, which may not be appended to a pipe: command "
                                      f"(plain relative paths only: letters, digits, . _ - /)")
        return root.rstrip("/") + "/" + rel
    base = os.path.abspath(local_path(root) if root else ".")
    path = os.path.normpath(os.path.join(base, local_path(rel)))
    if os.path.commonpath([base, path]) != base:
        raise UnsafeLocationError(f"{what} names {rel[:80]!r}, which is outside {base} "
                                  f"(absolute paths and '..' may not leave the folder)")
    return path


def is_url(location: str) -> bool:
    """Whether `location` names a stream rather than a local path (file:// is local)."""
    location = str(location)
    return location.startswith("pipe:") or (bool(_SCHEME.match(location)) and not location.startswith("file://"))


def local_path(location: str) -> str:
    """The local path of a location that is not a URL (file:// prefix removed)."""
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def join(root: str | None, rel: str) -> str:
    """A shard's location: `rel` under `root` (a folder or a URL prefix); an absolute
    `rel` (datasets written before roots were recorded) stands alone."""
    if not root or is_url(rel) or os.path.isabs(rel):
        return rel
    if is_url(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(local_path(root), rel)


def common_root(locations: list[str]) -> str:
    """The deepest folder (or URL prefix ending before a '/') that holds every location."""
    if not locations:
        return ""
    if all(is_url(loc) for loc in locations):
        prefix = os.path.commonprefix(list(locations))
        return prefix[:prefix.rfind("/") + 1].rstrip("/") if "/" in prefix else ""
    if any(is_url(loc) for loc in locations):
        raise LocationError("the shards mix local paths and URLs; index them in separate runs")
    return os.path.commonpath([os.path.dirname(os.path.abspath(local_path(loc))) for loc in locations])


def relative(location: str, root: str) -> str:
    """`location` relative to `root` (the inverse of `join`)."""
    if not root:
        return location
    if is_url(location):
        return location[len(root):].lstrip("/")
    return os.path.relpath(os.path.abspath(local_path(location)), root)


def open_stream(location: str):
    """A binary stream over the bytes of `location`; the caller closes it. Errors are
    LocationError with the location spelled as given."""
    location = str(location)
    if location.startswith("pipe:"):
        return _PipeStream(location[len("pipe:"):])
    if not is_url(location):
        try:
            return open(local_path(location), "rb")
        except OSError as e:
            raise LocationError(f"{location}: {e.strerror or e}") from None
    scheme = _SCHEME.match(location).group(1).lower()
    if scheme in ("http", "https"):
        return _HTTPStream(location)
    try:
        import fsspec
    except ImportError:
        raise LocationError(f"{location}: {scheme}:// needs fsspec (pip install fsspec "
                            f"{FSSPEC_PACKAGES.get(scheme, '')})".rstrip() + ")") from None
    try:
        return fsspec.open(location, "rb").open()
    except ImportError as e:
        need = FSSPEC_PACKAGES.get(scheme)
        raise LocationError(f"{location}: {scheme}:// needs " + (f"pip install {need}" if need else str(e))) from None
    except (OSError, ValueError) as e:
        raise LocationError(f"{location}: {e}") from None


HTTP_TIMEOUT = float(os.environ.get("DYNAVIT_HTTP_TIMEOUT") or 60)  # seconds without a byte from the server
HTTP_RETRIES = 3  # reconnections after a download that stopped short of its Content-Length


class TruncatedDownload(LocationError):
    """A download that stopped short: the server closed before Content-Length bytes on
    every retry, or sent nothing for HTTP_TIMEOUT seconds."""


def _http_open(location: str, start: int = 0):
    headers = {"User-Agent": "dynavit", **({"Range": f"bytes={start}-"} if start else {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(location, headers=headers), timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise LocationError(f"{location}: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise LocationError(f"{location}: no answer in {HTTP_TIMEOUT:g} s (DYNAVIT_HTTP_TIMEOUT)") from None
    except (urllib.error.URLError, OSError) as e:
        raise LocationError(f"{location}: {getattr(e, 'reason', None) or e}") from None


class _HTTPStream:
    """An http(s) body that is either whole or an error. urllib returns a short body as if
    it were the end when the server closes early; a tar cut there reads as a smaller tar.
    Short of Content-Length, it reconnects (a Range request, or the body again with the part
    already read skipped) up to HTTP_RETRIES times, then raises TruncatedDownload; so does a
    server silent for HTTP_TIMEOUT seconds (not retried: each wait would cost as much again)."""

    def __init__(self, location: str):
        self.location, self.pos, self.retries = location, 0, 0
        self.resp = _http_open(location)
        length = self.resp.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self.resp.read(n)
            except TimeoutError:
                raise TruncatedDownload(f"{self.location}: no data for {HTTP_TIMEOUT:g} s after {self.pos} bytes "
                                        f"(a stalled server; DYNAVIT_HTTP_TIMEOUT sets the wait)") from None
            except OSError as e:  # a reset connection: retried like a short one
                data, error = b"", e
            else:
                error = None
            if data or n == 0:
                self.pos += len(data)
                return data
            if self.length is None or self.pos >= self.length:
                if error is not None:
                    raise LocationError(f"{self.location}: {error}") from None
                return b""
            if self.retries >= HTTP_RETRIES:
                raise TruncatedDownload(f"{self.location}: the server sent {self.pos} of {self.length} bytes "
                                        f"(Content-Length), {HTTP_RETRIES} retries included; truncated download")
            self.retries += 1
            self._reconnect()

    def _reconnect(self) -> None:
        self.resp.close()
        self.resp = _http_open(self.location, self.pos)
        if self.resp.status != 206:  # no ranges: the whole body again, minus what was read
            skip = self.pos
            while skip:
                chunk = self.resp.read(min(skip, 1 << 20))
                if not chunk:
                    break
                skip -= len(chunk)

    def close(self) -> None:
        self.resp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _PipeStream:
    """stdout of a shell command; closing it checks the command's exit status (a failed
    `pipe:curl ...` must not look like a short tar)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdout.read(1):  # not read to the end: stop it
            self.proc.kill()
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        code = self.proc.wait()
        if code not in (0, -9):
            raise LocationError(f"pipe:{self.command} exited with status {code}"
                                + (f": {err.splitlines()[-1]}" if err else ""))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class HashingReader:
    """Reads through to a stream and hashes every byte read; `finish()` reads the rest
    (tar padding after the end marker) and returns (sha256, bytes)."""

    def __init__(self, stream):
        self.stream, self.hash, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def finish(self) -> tuple[str, int]:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest(), self.size


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNAVIT_CACHE") or Path.home() / ".cache" / "dynavit") / "shards"


def fetch(location: str, expect: tuple[str, int] | None = None, cache_dir=None) -> str:
    """A local path holding the bytes of `location`: itself when local, else a copy in the
    cache, downloaded once and checked against `expect` (sha256, bytes)."""
    if not is_url(location):
        return local_path(location)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = hashlib.sha256(location.encode()).hexdigest()[:24] + "-" + re.sub(r"[^A-Za-z0-9._-]", "_",
                                                                             location.rsplit("/", 1)[-1])[-60:]
    path = cache / name
    # A cached copy is used only when its bytes are still the indexed ones: a size that
    # matches says nothing about a copy that was changed or half-overwritten.
    if path.is_file() and (expect is None or (path.stat().st_size == expect[1] and _sha256(path) == expect[0])):
        return str(path)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        stream = open_stream(location)
        try:
            hashing = HashingReader(stream)
            with open(tmp, "wb") as f:
                while chunk := hashing.read(1 << 22):
                    f.write(chunk)
        finally:
            stream.close()
        digest = hashing.hash.hexdigest(), hashing.size
        if expect is not None and tuple(expect) != digest:
            raise LocationError(f"{location}: its bytes changed since indexing (sha256 {digest[0][:12]}…/"
                                f"{digest[1]} B, indexed {expect[0][:12]}…/{expect[1]} B)")
    return str(path)


__all__ = ["TruncatedDownload", "LocationError", "UnsafeLocationError", "TRUST_OPTION", "check_root", "under", "is_url", "local_path", "join", "common_root", "relative", "open_stream",
           "HashingReader", "fetch", "default_cache_dir"]
