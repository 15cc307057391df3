"""Top-K patch selection (docs/FORMAT.md 'Top-K').

k = max(1, floor(K·N/100)); rank by score descending, ties broken by the lower raster
index; the kept indices are returned in ascending (raster) order, dtype uint8 if N <= 256
else uint16. One stable ranking serves every K, so the K=25 set is a subset of the K=50 set.

NaN scores rank below every other score (including -inf), lower index first among NaNs:
selection stays deterministic and a NaN patch is only kept when nothing else is left.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dynavit.manifests.schema import index_dtype_name, k_count, seq_len  # noqa: F401 (seq_len: re-exported)


def index_dtype(n: int) -> np.dtype:
    """dtype of stored indices for a grid of n patches."""
    if n < 1 or n > 65536:
        raise ValueError(f"grid of {n} patches is outside 1..65536 (indices are uint8/uint16)")
    return np.dtype(index_dtype_name(n))


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
    return select_topk_multi(scores, [k_percent])[int(k_percent)]


def select_topk_multi(scores, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """{K: indices [B, k_K]} for several K from one ranking (nested by construction)."""
    order, n = _rank(scores)
    ks = [int(k) for k in ks if k_count(k, n)]  # k_count checks each K
    dt = index_dtype(n)
    return {k: np.sort(order[:, :k_count(k, n)], axis=1).astype(dt) for k in ks}
