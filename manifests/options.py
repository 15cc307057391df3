"""Parsing the contract's values from text (K lists, name lists, R,G,B triples) and the one
error for a bad argument, shared by both programs' CLIs and libraries.

Libraries raise ArgumentError (or a subclass) naming the offending option in `param`; each
CLI module maps it to a one-line usage error, exit 2. No click here: the CLI stays at the edges.
"""
from __future__ import annotations

import math


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
