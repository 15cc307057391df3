"""Parsing the contract's values from text (K lists, name lists, R,G,B triples) and the one
error for a bad argument, shared by both programs' CLIs and libraries.

Libraries raise ArgumentError (or a subclass) naming the offending option in `param`; each
CLI module maps it to a one-line usage error, exit 2. No click here: the CLI stays at the edges.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


class ArgumentError(ValueError):
    """A bad argument, found before anything is written. `param` names the option."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_list(text: str, cast=str, what: str = "values") -> list:
    """'a,b,c' → [cast(a), cast(b), cast(c)] in the given order, blanks dropped; ValueError
    naming the text otherwise. The one list parser of both CLIs."""
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    try:
        out = [cast(v) for v in items]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {what}") from None
    if not out:
        raise ValueError(f"expected a comma-separated list of {what}, got {text!r}")
    return out


def parse_k_list(text: str) -> list[int]:
    """'70,50,25' → [70, 50, 25]: integer percents in 1..100."""
    ks = parse_list(text, int, "integers")
    if any(not 1 <= k <= 100 for k in ks):
        raise ValueError(f"K must be integer percents in 1..100, got {text!r}")
    return ks


def parse_triple(text: str, positive: str | None = None) -> tuple[float, float, float]:
    """'0.485,0.456,0.406' → three finite floats (R,G,B); with `positive` (the value's name,
    e.g. "std") each must also be > 0."""
    try:
        t = tuple(parse_list(text, float, "numbers"))
    except ValueError:
        t = ()
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"expected three comma-separated finite numbers (R,G,B), got {text!r}")
    if positive and min(t) <= 0:
        raise ValueError(f"{positive} must be positive, got {text!r}")
    return t


def check_output_file(path, param: str) -> None:
    """A file to be written at `path` must be possible before any work is done: not a
    folder, and its nearest existing parent a writable folder (not a file it would lie
    under). ArgumentError naming `param` otherwise."""
    path = Path(path).absolute()
    if path.is_dir():
        raise ArgumentError(f"{path} is a directory, not a file", param)
    _check_parents(path, param)


def _check_parents(path: Path, param: str | None) -> None:
    for p in path.parents:
        try:
            if not p.exists():
                continue
        except OSError as e:
            raise ArgumentError(f"cannot access {p}: {e.strerror or e}", param) from None
        if not p.is_dir():
            raise ArgumentError(f"{p} is not a directory ({path} would lie under it)", param)
        if not os.access(p, os.W_OK | os.X_OK):
            raise ArgumentError(f"{p} is not writable", param)
        return


def check_output_dir(path, param: str) -> None:
    """A folder to be created or filled at `path`: not an existing file, not under a file."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path} is not a directory", param)
    if not path.exists():
        _check_parents(path, param)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise ArgumentError(f"{path} is not writable", param)


def finite_float(value, name: str = "value", low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """float(value), refused (ValueError naming `name`) when not finite or out of range.
    click's FloatRange lets NaN through (every comparison with NaN is False)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v
