"""Token Merging (ToMe, Bolya et al., ICLR 2023) as a forward over an unmodified timm ViT.

A baseline for Dyna-ViT: instead of dropping patches before the encoder, ToMe merges ``r``
tokens in every block, between attention and MLP, by bipartite soft matching on the keys.
Per block (timm's pre-norm Block, LayerScale and drop-path included):

    a, k = attention(norm1(x)) + log(size) on the logits     (proportional attention)
    x    = x + drop_path1(ls1(a))
    x, size = merge r tokens of x by the mean-over-heads keys k (size-weighted averages)
    x    = x + drop_path2(ls2(mlp(norm2(x))))

Decisions:
- The model is only read (see ``_vit_tokens``); state_dicts stay timm's. Blocks in which no
  token has been merged yet and that merge nothing run as timm's own ``Block.forward``, so
  ``r=0`` reproduces ``model(x)`` bit for bit.
- Proportional attention uses SDPA's additive float mask (log size, broadcast over queries),
  so the fused kernel is kept; timm's manual path (fused_attn=False) adds the same bias.
- Prefix tokens (CLS, reg tokens) are never merged and stay in front, in order. The patch
  tokens alternate A/B keeping the parity of their position in the sequence, so for a
  CLS model the sets, the matching and the output order are exactly ToMe's
  (``[cls, unmerged A in order, B]``). Without a class token ToMe does not sort the
  unmerged A tokens (``[unmerged A by descending edge score, B]``, merge.py lines 67-68), and
  neither does this: the order feeds the next block's A/B alternation, so sorting them
  changes which tokens merge later (golden test against facebookresearch/ToMe af95e4b).
- r is clipped per layer to half the mergeable (non-prefix) tokens, as in ToMe.
- The merge metric is the mean over heads of the keys after ``k_norm`` (the keys the
  attention used; with qk-norm off it is ToMe's metric).
- Pooling is timm's ``forward_head`` on the merged tokens: 'token' reads the CLS token; 'avg'
  averages merged tokens without size weights (as ToMe's timm patch does).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from dynavit.trainer.methods.tokens import attend, check_images, check_token_model, stem
from dynavit.trainer.methods.sparse import unwrap_model

__all__ = [
    "tome_forward",
    "tome_forward_features",
    "tome_schedule",
    "resolve_r",
    "tome_token_counts",
    "Matching",
    "bipartite_soft_matching",
    "merge_tokens",
    "merge_wavg",
    "check_tome_model",
]

RSpec = Union[int, Sequence[int]]


def check_tome_model(model: nn.Module) -> VisionTransformer:
    return check_token_model(model, "ToMe")


def tome_schedule(r: int, depth: int, inflect: float = 0.0) -> list[int]:
    """ToMe's per-layer schedule: ``inflect=0`` constant r, ``-1`` decreasing (2r → 0),
    ``+1`` increasing (0 → 2r), linearly, floored; the mean stays ≈ r."""
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
        raise ValueError(f"r must be a non-negative int, got {r!r}")
    r = int(r)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not -1.0 <= inflect <= 1.0:
        raise ValueError(f"inflect must lie in [-1, 1], got {inflect}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    if depth == 1:
        return [r]
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def resolve_r(r: RSpec, depth: int) -> list[int]:
    """Per-layer r list from an int (constant) or a list (shorter lists are padded with 0)."""
    if isinstance(r, bool):
        raise TypeError("r must be an int or a sequence of ints, got bool")
    if isinstance(r, numbers.Integral):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return [int(r)] * depth
    try:
        rs = [int(v) for v in r]
    except TypeError:
        raise TypeError(f"r must be an int or a sequence of ints, got {type(r).__name__}") \
            from None
    if any(v < 0 for v in rs) or any(int(v) != v for v in r):
        raise ValueError(f"r values must be non-negative ints, got {list(r)}")
    if len(rs) > depth:
        raise ValueError(f"r lists {len(rs)} layers but the model has {depth} blocks")
    return rs + [0] * (depth - len(rs))


def _clip_r(r: int, tokens: int, num_prefix: int) -> int:
    return max(0, min(r, (tokens - num_prefix) // 2))


def tome_token_counts(num_tokens: int, r: RSpec, depth: int, num_prefix: int = 1) -> list[int]:
    """Sequence length entering each block and after the last one (depth + 1 values)."""
    counts = [num_tokens]
    for ri in resolve_r(r, depth):
        counts.append(counts[-1] - _clip_r(ri, counts[-1], num_prefix))
    return counts


@dataclass
class Matching:
    """Result of bipartite soft matching over tokens [B, T, ·]: which A tokens stay
    (``unm_idx``), which merge (``src_idx``) into which B tokens (``dst_idx``); indices are
    into the A / B sets ``x[:, a_start::2]`` / ``x[:, b_start::2]``, all [B, ·, 1]."""
    num_prefix: int
    a_start: int
    b_start: int
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def _ab_starts(num_prefix: int) -> tuple[int, int]:
    # Keep the parity of the position in the whole sequence (ToMe alternates over all tokens).
    a = num_prefix + (num_prefix % 2)
    b = num_prefix + 1 - (num_prefix % 2)
    return a, b


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> Matching:
    """ToMe's matching on ``metric`` [B, T, C]: the non-prefix tokens alternate into sets A and
    B; each A token's most cosine-similar B token is its edge; the ``r`` A tokens with the
    most similar edges merge (r clipped to half the non-prefix tokens). Prefix tokens are
    never touched. Returns a ``Matching`` for ``merge_tokens`` / ``merge_wavg``."""
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, T, C], got {tuple(metric.shape)}")
    t = metric.shape[1]
    if not 0 <= num_prefix <= t:
        raise ValueError(f"num_prefix={num_prefix} out of range for {t} tokens")
    r = _clip_r(int(r), t, num_prefix)
    a_start, b_start = _ab_starts(num_prefix)
    with torch.no_grad():  # the matching is a discrete choice; no gradient flows through it
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, a_start::2], metric[:, b_start::2]
        scores = a @ b.transpose(-1, -2)                      # [B, Na, Nb]
        node_max, node_idx = scores.max(dim=-1)               # best B for every A
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]                             # unmerged A, by edge score
        if num_prefix:
            # ToMe sorts the unmerged A tokens back to sequence order only when there is a
            # class token (tome/merge.py, ``if class_token``); without one they stay in
            # edge-score order, which changes the next block's A/B split: follow it.
            unm_idx = unm_idx.sort(dim=1)[0]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    return Matching(num_prefix, a_start, b_start, unm_idx, src_idx, dst_idx)


def merge_tokens(x: torch.Tensor, m: Matching, mode: str = "sum") -> torch.Tensor:
    """Apply a matching to x [B, T, C]: ``[prefix, unmerged A, B with sources reduced in]``,
    T - r tokens. ``mode`` is a ``scatter_reduce`` reduction ('sum', 'mean', 'amax', ...)."""
    c = x.shape[-1]
    prefix = x[:, :m.num_prefix]
    a, b = x[:, m.a_start::2], x[:, m.b_start::2]
    unm = a.gather(1, m.unm_idx.expand(-1, -1, c))
    if m.r:
        src = a.gather(1, m.src_idx.expand(-1, -1, c))
        b = b.scatter_reduce(1, m.dst_idx.expand(-1, -1, c), src, reduce=mode)
    return torch.cat([prefix, unm, b], dim=1)


def merge_wavg(m: Matching, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Size-weighted average merge; returns (x, size) with size [B, T - r, 1] counting the
    original tokens in each merged token."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge_tokens(x * size, m, "sum")
    size = merge_tokens(size, m, "sum")
    return x / size, size


def _tome_block(blk: Block, x: torch.Tensor, size: Optional[torch.Tensor],
                source: Optional[torch.Tensor], r: int, num_prefix: int, prop_attn: bool,
                trace_source: bool):
    bias = None
    if prop_attn and size is not None:
        bias = size.log()[:, None, None, :, 0]            # [B, 1, 1, T] over every query
    a, _, k = attend(blk.attn, blk.norm1(x), bias)
    x = x + blk.drop_path1(blk.ls1(a))
    if r > 0:
        matching = bipartite_soft_matching(k.mean(dim=1), r, num_prefix)
        if trace_source:
            if source is None:
                b, t, _ = x.shape
                source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(b, t, t)
            source = merge_tokens(source, matching, "amax")
        x, size = merge_wavg(matching, x, size)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, source


def tome_forward_features(model: nn.Module, images: torch.Tensor, r: RSpec, *,
                          prop_attn: bool = True, trace_source: bool = False,
                          return_state: bool = False):
    """Pre-head tokens [B, T_out, D] of ``model`` with ToMe merging ``r`` tokens per block.

    ``r``: int (every block) or a per-block list (see ``tome_schedule``). With
    ``return_state=True`` returns (x, size [B,T_out,1] or None, source [B,T_out,T_in] or
    None; source only with ``trace_source``).
    """
    m = check_tome_model(model)
    check_images(m, images)
    rs = resolve_r(r, len(m.blocks))
    num_prefix = m.num_prefix_tokens

    x = stem(m, images)
    size = source = None
    for blk, ri in zip(m.blocks, rs):
        ri = _clip_r(ri, x.shape[1], num_prefix)
        if size is None and ri == 0:
            x = blk(x)  # timm's own forward: nothing merged yet, nothing to merge here
            continue
        if m.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x, size, source = torch.utils.checkpoint.checkpoint(
                _tome_block, blk, x, size, source, ri, num_prefix, prop_attn, trace_source,
                use_reentrant=False)
        else:
            x, size, source = _tome_block(blk, x, size, source, ri, num_prefix, prop_attn,
                                          trace_source)
    x = m.norm(x)
    if return_state:
        return x, size, source
    return x


def tome_forward(model: nn.Module, images: torch.Tensor, r: RSpec, *, prop_attn: bool = True,
                 trace_source: bool = False):
    """Logits of ``model`` with ToMe (timm's own ``forward_head`` on the merged tokens).

    With ``trace_source=True`` returns (logits, source): source [B, T_out, T_in] is 1 where
    output token t contains input token j (T_in = prefix + patches; None if nothing merged).
    """
    x, _, source = tome_forward_features(model, images, r, prop_attn=prop_attn,
                                         trace_source=trace_source, return_state=True)
    logits = unwrap_model(model).forward_head(x)
    return (logits, source) if trace_source else logits
