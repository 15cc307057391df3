"""Top-K patch selection (DESIGN.md §3, §5).

k = max(1, floor(K·N/100)); rank by score descending, ties broken by the lower raster
index; the kept indices are returned in ascending (raster) order, dtype uint8 if N <= 256
else uint16. One stable ranking serves every K, so the K=25 set is a subset of the K=50 set.

NaN scores rank below every other score (including -inf), lower index first among NaNs:
selection stays deterministic and a NaN patch is only kept when nothing else is left.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dynavit.manifests.schema import index_dtype_name
from dynavit.manifests.schema import k_count as _k_count_rule  # the contract's rule; here with argument checks


def _check_k(k_percent) -> int:
    if isinstance(k_percent, (bool, np.bool_)) or not isinstance(k_percent, (int, np.integer)):
        raise ValueError(f"K must be an integer percentage in 1..100, got {k_percent!r}")
    if not 1 <= k_percent <= 100:
        raise ValueError(f"K must be in 1..100, got {k_percent!r}")
    return int(k_percent)


def parse_k_list(text: str) -> list[int]:
    """'70,50,25' -> [70, 50, 25] in the given order; ValueError naming the text otherwise.

    One parser for every CLI that takes --k (dynaprep index, dynatrain flops/bench)."""
    try:
        ks = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None
    if not ks or any(not 1 <= k <= 100 for k in ks):
        raise ValueError(f"K must be integer percents in 1..100, got {text!r}")
    return ks


def k_list_option(ctx, param, value: str) -> list[int]:
    """click callback around parse_k_list: a bad --k is a usage error (exit 2)."""
    import click

    try:
        return parse_k_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def index_dtype(n: int) -> np.dtype:
    """dtype of stored indices for a grid of n patches."""
    if n < 1 or n > 65536:
        raise ValueError(f"grid of {n} patches is outside 1..65536 (indices are uint8/uint16)")
    return np.dtype(index_dtype_name(n))


def k_count(k_percent: int, n: int) -> int:
    """Number of kept patches: max(1, floor(K·n/100)), in exact integer arithmetic."""
    k = _check_k(k_percent)
    if n < 1:
        raise ValueError(f"grid must have at least one patch, got n={n}")
    return _k_count_rule(k, int(n))


def seq_len(k_percent: int, n: int, num_prefix: int = 1) -> int:
    """Model sequence length S: kept patches + prefix tokens (1 CLS, plus any registers).

    Equals 1 + floor(K·n/100) for a plain ViT except when that floor is 0: one patch is still
    kept, so S=2.
    """
    return num_prefix + k_count(k_percent, n)


def _rank(scores) -> tuple[np.ndarray, int]:
    s = np.asarray(scores)
    if s.ndim == 3:
        s = s.reshape(s.shape[0], -1)
    elif s.ndim != 2:
        raise ValueError(f"scores must have shape [B,Gh,Gw] or [B,N], got {s.shape}")
    n = s.shape[1]
    index_dtype(n)  # validates n
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)  # negating unsigned ints would wrap
    # argsort puts NaN last; stable sort keeps lower index first among equal scores.
    return np.argsort(-s, axis=1, kind="stable"), n


def select_topk(scores, k_percent: int) -> np.ndarray:
    """Indices [B, k] of the top-K % patches of each row, ascending."""
    return select_topk_multi(scores, [k_percent])[_check_k(k_percent)]


def select_topk_multi(scores, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """{K: indices [B, k_K]} for several K from one ranking (nested by construction)."""
    ks = [_check_k(k) for k in ks]
    order, n = _rank(scores)
    dt = index_dtype(n)
    return {k: np.sort(order[:, :k_count(k, n)], axis=1).astype(dt) for k in ks}
