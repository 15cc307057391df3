"""Compute accounting for the sparse forward (paper §3.4, Table 4).

MACs are counted, not estimated: one ``sparse_forward`` runs under our own counter
(``macs.MacCounter``: every matmul-class aten op by its formula from the input shapes, the
same on CPU, CUDA and the meta device, whatever torch version is installed). It covers the
matmuls, the patch-embed conv *and* attention (the fused SDPA kernels on CPU/CUDA, the bmm's
of the math path on meta). Elementwise work (norms, GELU, softmax, adds) is not counted, as
in every MAC table. fvcore skips SDPA; the ``attn`` column here lets you see what such a tool
reports (total minus attention).

For a plain ViT the count is exactly quadratic in the sequence length S:
    per block  4·S·D² (qkv + proj) + 2·S·D·H (MLP, H = mlp_ratio·D) + 2·S²·D (QKᵀ, AV)
    + N·D·P²·C patch embed (all N patches: sparse_forward embeds before it gathers)
    + D·num_classes head (one pooled vector).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from dynavit.manifests import k_count, seq_len  # noqa: F401 (seq_len: re-exported)
from dynavit.trainer.methods.macs import count_on_zero_images
from dynavit.trainer.methods.sparse import check_model, sparse_forward

__all__ = [
    "seq_len",
    "count_macs",
    "count_macs_breakdown",
    "closed_form_macs",
    "closed_form_coeffs",
    "model_dims",
    "fit_analytic",
    "build_meta_model",
    "flops_table",
]


def count_macs_breakdown(model: torch.nn.Module, k_percent: int, batch: int = 1) -> dict:
    """{'total', 'attention', 'S'} for one sparse_forward at K on ``batch`` images.

    Runs where the model lives; a model on the meta device costs no memory or time. The
    model is put in eval mode for the count (patch dropout would change S) and restored.
    """
    m = check_model(model)
    n = int(np.prod(m.patch_embed.grid_size))
    k = k_count(k_percent, n)
    keep = torch.arange(k, device=m.pos_embed.device).expand(batch, -1)
    mc = count_on_zero_images(m, lambda images: sparse_forward(m, images, keep, validate=False), batch=batch)
    return {"total": mc.total, "attention": mc.attention, "S": m.num_prefix_tokens + k}


def count_macs(model: torch.nn.Module, k_percent: int, batch: int = 1) -> int:
    """Exact MACs of one ``sparse_forward`` at K (K=100: dense), attention included."""
    return count_macs_breakdown(model, k_percent, batch)["total"]


def closed_form_coeffs(depth: int, dim: int, mlp_ratio: float = 4.0, num_classes: int = 1000,
                       N: int = 196, patch=16, in_chans: int = 3) -> tuple[int, int, int]:
    """(alpha, beta, gamma) with MACs(S) = alpha·S² + beta·S + gamma for a plain ViT."""
    hidden = int(dim * mlp_ratio)  # timm's Block rounds the same way
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    alpha = depth * 2 * dim
    beta = depth * (4 * dim * dim + 2 * dim * hidden)
    gamma = N * dim * ph * pw * in_chans + dim * num_classes
    return alpha, beta, gamma


def closed_form_macs(depth: int, dim: int, S: int, mlp_ratio: float = 4.0,
                     num_classes: int = 1000, N: int = 196, patch=16, in_chans: int = 3) -> int:
    a, b, c = closed_form_coeffs(depth, dim, mlp_ratio, num_classes, N, patch, in_chans)
    return a * S * S + b * S + c


def model_dims(model: torch.nn.Module) -> dict:
    """closed_form_macs keyword arguments read off a timm ViT."""
    m = check_model(model)
    dim = m.embed_dim
    head = m.head
    return dict(depth=len(m.blocks), dim=dim,
                mlp_ratio=m.blocks[0].mlp.fc1.out_features / dim,
                num_classes=head.out_features if isinstance(head, torch.nn.Linear) else 0,
                N=int(np.prod(m.patch_embed.grid_size)),
                patch=tuple(m.patch_embed.patch_size), in_chans=m.in_chans)


def fit_analytic(S_list: Sequence[int], macs_list: Sequence[float]):
    """Least-squares alpha·S² + beta·S + gamma; returns (alpha, beta, gamma, max_rel_err)."""
    S = np.asarray(S_list, dtype=np.float64)
    y = np.asarray(macs_list, dtype=np.float64)
    if S.shape != y.shape or S.ndim != 1:
        raise ValueError("S_list and macs_list must be 1-D and of equal length")
    if len(np.unique(S)) < 3:
        raise ValueError("a quadratic fit needs at least 3 distinct sequence lengths")
    A = np.stack([S * S, S, np.ones_like(S)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    rel = np.abs(A @ np.array([a, b, c]) - y) / np.abs(y)
    return float(a), float(b), float(c), float(rel.max())


def build_meta_model(model_name: str, **kwargs) -> torch.nn.Module:
    """timm model with no weights allocated (meta device): counting needs only shapes."""
    import timm

    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **kwargs)


def flops_table(model_name, ks: Iterable[int]):
    """Rows (K, S, MACs, GMACs, ...) for ``model_name`` (a timm name or a model) and the fit.

    Returns (rows, fit): each row a dict with K, S, macs, gmacs, attn_macs,
    gmacs_no_attn (what fvcore, which skips SDPA, would say) and, when a fit exists,
    fit_gmacs and rel_err; fit is a dict alpha, beta, gamma, max_rel_err, or None with
    fewer than 3 distinct S.
    """
    model = build_meta_model(model_name) if isinstance(model_name, str) else model_name
    rows = []
    for k in ks:
        b = count_macs_breakdown(model, k)
        rows.append(dict(K=int(k), S=b["S"], macs=b["total"], gmacs=b["total"] / 1e9,
                         attn_macs=b["attention"],
                         gmacs_no_attn=(b["total"] - b["attention"]) / 1e9))
    fit = None
    if len({r["S"] for r in rows}) >= 3:
        a, b, c, err = fit_analytic([r["S"] for r in rows], [r["macs"] for r in rows])
        fit = dict(alpha=a, beta=b, gamma=c, max_rel_err=err)
        for r in rows:
            f = a * r["S"] ** 2 + b * r["S"] + c
            r["fit_gmacs"] = f / 1e9
            r["rel_err"] = abs(f - r["macs"]) / r["macs"]
    return rows, fit
