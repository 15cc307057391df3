"""Sequence packing: images that keep different numbers of patches, at the cost of what
they keep (NaViT, Dehghani et al. 2023), through the unmodified timm blocks.

Each sample is the sequence sparse_forward would build for it (its CLS/register tokens and
its kept patches with their positional rows). Samples are placed, in order, first-fit into
rows of a fixed token budget T; the tail of a row is padding. Every block runs on the rows
[R, T, D] with a block-diagonal boolean attention mask passed to timm's ``Block(x,
attn_mask=...)``, which hands it to ``F.scaled_dot_product_attention``: a token attends only
to the tokens of its own sample (padding attends only to padding, so no softmax row is
empty). LayerNorm, MLP and the projections are per token, so a packed sample gets the
outputs of its own forward; pooling ('token', 'avg', 'avgmax', 'max') is timm's own
``pool`` on each sample's slice, then ``fc_norm`` and ``head``.

Cost: the matmuls scale with the R·T packed tokens (padding included), attention with R·T²
per block: SDPA with a dense mask computes the masked scores too (a FlexAttention block mask
would skip them; not used: it needs torch.compile to be fast, and the counter would have to
count its block-sparse kernel). ``packed_macs`` is the closed form of what runs.

Refused: training with PatchDropout (it would drop tokens across samples of a row) and
``global_pool=''`` (no single vector per sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from dynavit.trainer.methods.sparse import _embed_tokens, _pos_embed_sparse, _check_images, check_model

__all__ = ["Packing", "RaggedKeep", "pack", "packed_forward", "packed_macs", "pad_keep", "sample_macs"]


@dataclass(frozen=True)
class RaggedKeep:
    """Kept indices of samples that keep different numbers of patches: idx [B, kmax] (row b's
    first counts[b] entries, ascending; the rest padding) and counts [B]. Travels where a
    keep_idx tensor travels (``.to``, ``.pin_memory``); counts stay on the host, where the
    packing layout is computed."""

    idx: torch.Tensor
    counts: torch.Tensor

    def to(self, *args, **kwargs) -> "RaggedKeep":
        return RaggedKeep(self.idx.to(*args, **kwargs), self.counts)

    def pin_memory(self) -> "RaggedKeep":
        return RaggedKeep(self.idx.pin_memory(), self.counts)

    @property
    def shape(self):
        return self.idx.shape

    @classmethod
    def from_list(cls, keeps: list) -> "RaggedKeep":
        return cls(*pad_keep(keeps))


@dataclass(frozen=True)
class Packing:
    """Where each sample lies: row[i], start[i], length[i] (tokens, prefix included)."""

    rows: int
    budget: int
    row: tuple[int, ...]
    start: tuple[int, ...]
    length: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.length)

    @property
    def fill(self) -> float:
        """Share of the R·T packed positions that are real tokens."""
        return self.tokens / (self.rows * self.budget)


def pack(lengths, budget: int) -> Packing:
    """First-fit in sample order: each sample goes to the first row with room (NaViT's
    greedy packing). A one-line ValueError when a sample is longer than the budget."""
    lengths = [int(v) for v in lengths]
    if budget < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"packing needs a budget >= 1 and samples of >= 1 token, got budget {budget}")
    if max(lengths) > budget:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {budget} tokens")
    free: list[int] = []
    row, start = [], []
    for n in lengths:
        r = next((j for j, f in enumerate(free) if f >= n), None)
        if r is None:
            free.append(budget)
            r = len(free) - 1
        row.append(r)
        start.append(budget - free[r])
        free[r] -= n
    return Packing(len(free), budget, tuple(row), tuple(start), tuple(lengths))


def pad_keep(keeps: list, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_idx [B, kmax] int64 padded with `fill`, counts [B]) from per-sample index arrays."""
    counts = torch.tensor([len(k) for k in keeps], dtype=torch.int64)
    out = torch.full((len(keeps), int(counts.max())), fill, dtype=torch.int64)
    for i, k in enumerate(keeps):
        out[i, :len(k)] = torch.as_tensor(k, dtype=torch.int64)
    return out, counts


def _dest(p: Packing, device) -> torch.Tensor:
    """Flat position in the [R·T] buffer of every real token, samples in order."""
    parts = [torch.arange(n) + r * p.budget + s for r, s, n in zip(p.row, p.start, p.length)]
    return torch.cat(parts).to(device)


def _segments(p: Packing, device) -> torch.Tensor:
    seg = torch.full((p.rows * p.budget,), -1, dtype=torch.int64)
    for i, (r, s, n) in enumerate(zip(p.row, p.start, p.length)):
        seg[r * p.budget + s: r * p.budget + s + n] = i
    return seg.view(p.rows, p.budget).to(device)


def _check_counts(keep_idx: torch.Tensor, counts: torch.Tensor, n: int) -> list[int]:
    if keep_idx.ndim != 2 or counts.ndim != 1 or counts.shape[0] != keep_idx.shape[0]:
        raise ValueError(f"keep_idx [B, kmax] and counts [B] expected, got {tuple(keep_idx.shape)} "
                         f"and {tuple(counts.shape)}")
    ks = [int(c) for c in counts.tolist()]
    if min(ks) < 1 or max(ks) > min(n, keep_idx.shape[1]):
        raise ValueError(f"kept counts must lie in 1..{min(n, keep_idx.shape[1])}, got {min(ks)}..{max(ks)}")
    return ks


def packed_forward(model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor, counts: torch.Tensor,
                   budget: int | None = None) -> torch.Tensor:
    """Logits [B, classes]: sample b keeps keep_idx[b, :counts[b]] (ascending raster indices;
    the rest of the row is padding and ignored). ``budget``: tokens per packed row, default
    the batch's longest sample: with a dense mask a row of T tokens pays T² attention
    whoever fills it, so the tightest rows that fit every sample cost least; shorter samples
    still share a row when they fit together."""
    m = check_model(model)
    _check_images(m, images)
    if m.global_pool not in ("token", "avg", "avgmax", "max"):
        raise ValueError(f"packing needs a pooled head, got global_pool={m.global_pool!r}")
    if m.training and getattr(m.patch_drop, "prob", 0.0) > 0:
        raise ValueError("packing does not support PatchDropout in training (patch_drop_rate > 0)")
    n = int(m.patch_embed.num_patches)
    ks = _check_counts(keep_idx, counts, n)
    prefix = m.num_prefix_tokens
    lengths = [prefix + k for k in ks]
    p = pack(lengths, budget or max(lengths))
    keep = keep_idx.long().to(images.device)
    # Padded index columns point at patch 0: gathered, then dropped by `valid`.
    cols = torch.arange(keep.shape[1], device=keep.device)
    keep = torch.where(cols[None] < counts.to(keep.device)[:, None], keep, torch.zeros_like(keep))
    seq = _pos_embed_sparse(m, _embed_tokens(m, images), keep)  # [B, prefix + kmax, D]
    width = torch.arange(seq.shape[1], device=seq.device)
    valid = width[None] < (counts.to(seq.device) + prefix)[:, None]
    tokens = seq[valid]  # [Σ L_i, D], sample by sample
    dest = _dest(p, seq.device)
    d = seq.shape[-1]
    x = torch.zeros(p.rows * p.budget, d, dtype=seq.dtype, device=seq.device).index_put((dest,), tokens)
    x = m.norm_pre(m.patch_drop(x.view(p.rows, p.budget, d)))
    seg = _segments(p, seq.device)
    mask = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)  # [R, 1, T, T], True = may attend
    for blk in m.blocks:  # with set_grad_checkpointing(), as timm's forward_features does
        if m.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, attn_mask=mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask=mask)
    x = m.norm(x).reshape(p.rows * p.budget, d)
    if m.global_pool == "token":  # each sample's CLS: its first position (one gather, no loop)
        starts = torch.tensor([r * p.budget + s for r, s in zip(p.row, p.start)], device=x.device)
        pooled = x[starts]
    else:
        pooled = torch.cat([m.pool(s[None]) for s in torch.split(x[dest], list(p.length))])
    return m.head(m.head_drop(m.fc_norm(pooled)))


def _cost(m):
    """(cost of one row of t tokens -> (MACs, attention MACs), embed MACs per image, head MACs
    per image) of a timm ViT: the closed form of methods/flops.py per row."""
    n, dim = int(m.patch_embed.num_patches), m.embed_dim
    hidden, depth = m.blocks[0].mlp.fc1.out_features, len(m.blocks)
    classes = m.head.out_features if isinstance(m.head, nn.Linear) else 0
    ph, pw = m.patch_embed.patch_size

    def row(t: int) -> tuple[int, int]:
        attn = depth * 2 * t * t * dim
        return depth * t * (4 * dim * dim + 2 * dim * hidden) + attn, attn
    return row, n * dim * ph * pw * m.in_chans, dim * classes


def sample_macs(model: nn.Module, counts) -> int:
    """Σ over samples of each one's own sparse-forward MACs (kept counts `counts`), i.e.
    what they cost one by one, unpacked."""
    m = check_model(model)
    row, embed, head = _cost(m)
    ks, freq = torch.unique(torch.as_tensor([int(k) for k in counts]), return_counts=True)
    return sum(int(f) * (row(m.num_prefix_tokens + int(k))[0] + embed + head) for k, f in zip(ks, freq))


def packed_macs(model: nn.Module, counts, budget: int | None = None) -> dict:
    """Closed-form MACs of ``packed_forward`` for these kept counts: {'total', 'attention',
    'rows', 'budget', 'useful'} ('useful': what the samples would cost one by one)."""
    m = check_model(model)
    row, embed, head = _cost(m)
    lengths = [m.num_prefix_tokens + int(k) for k in counts]
    p = pack(lengths, budget or max(lengths))
    packed, attn = row(p.budget)
    b = len(lengths)
    return dict(total=b * (embed + head) + p.rows * packed, attention=p.rows * attn, rows=p.rows, budget=p.budget,
                useful=sample_macs(m, counts))
