"""Opening input files that someone else made: regular files only, and never without a limit.

A folder of images or a dataset folder is data, and data can be hostile or broken: a `.jpg`
that is a symlink to /dev/zero or /dev/urandom reads forever (until the OOM killer), and a
FIFO named `.jpg` blocks `open()` until someone writes to it. Every input file is therefore
opened with O_NONBLOCK (a FIFO opens at once instead of waiting for a writer), checked with
fstat to be a regular file, and read up to a size cap (`--max-file-bytes`). Symlinks to
regular files are followed as before: only what they point at is checked.
"""
from __future__ import annotations

import io
import os
import stat

DEFAULT_MAX_FILE_BYTES = 256 << 20  # 256 MiB: far above any photo, far below the machine's memory
_max_file_bytes = DEFAULT_MAX_FILE_BYTES


class InputFileError(OSError):
    """An input file that is not read: not a regular file, or over the size cap. One line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.strerror = message  # callers print `e.strerror or e`


def set_max_file_bytes(n: int | None) -> None:
    """The cap of every `read_regular` in this process (None: the default)."""
    global _max_file_bytes
    _max_file_bytes = DEFAULT_MAX_FILE_BYTES if n is None else int(n)


def max_file_bytes() -> int:
    return _max_file_bytes


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path) -> int:
    """A read-only descriptor of `path`, which must be a regular file (after symlinks).
    OSError as open() raises it; InputFileError for a FIFO, device, socket or directory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(f"not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)  # a regular file: plain reads from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_size(size: int, limit: int | None = None) -> None:
    limit = _max_file_bytes if limit is None else limit
    if size > limit:
        raise InputFileError(f"{size} bytes, over the {limit}-byte cap (--max-file-bytes)")


def read_regular(path, limit: int | None = None) -> bytes:
    """The bytes of regular file `path`, at most `limit` (default: the process's cap). A file
    that grows past the cap while read is refused too (st_size is only where it started)."""
    limit = _max_file_bytes if limit is None else limit
    fd = open_regular(path)
    try:
        check_size(os.fstat(fd).st_size, limit)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 22, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputFileError(f"more than {limit} bytes, over the cap (--max-file-bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)


METADATA_LIMIT = 4 << 30  # a dataset's own lists and pickles (CIFAR's 150 MB train): not --max-file-bytes


def open_text(path, limit: int = METADATA_LIMIT) -> io.StringIO:
    """A dataset's text file (class list, annotations), read whole as UTF-8 through the same
    regular-file check: usable as `with open_text(p) as f: for line in f`."""
    return io.StringIO(read_regular(path, limit).decode("utf-8"), newline=None)


__all__ = ["DEFAULT_MAX_FILE_BYTES", "METADATA_LIMIT", "open_text", "InputFileError", "check_size", "max_file_bytes", "open_regular",
           "read_regular", "set_max_file_bytes"]
