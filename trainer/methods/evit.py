"""EViT (Liang et al., ICLR 2022) as a forward over an unmodified timm ViT.

A baseline for Dyna-ViT: at a few chosen blocks, after attention, EViT keeps the
ceil(keep_rate·n) non-prefix tokens the CLS token attends to most (CLS attention averaged
over heads) and fuses the others into one token, their sum weighted by that attention
(``fuse=False`` drops them); the block's MLP and every later block run on the shorter
sequence. At a keep block (timm's pre-norm Block, LayerScale and drop-path included):

    a, p_cls = attention(norm1(x)), softmax row of the CLS query (explicit, [B,H,T])
    x = x + drop_path1(ls1(a))
    x = [prefix, top tokens of x by mean_h p_cls, fused token]
    x = x + drop_path2(ls2(mlp(norm2(x))))

Decisions:
- The model is only read (see ``_vit_tokens``); state_dicts stay timm's. Blocks that prune
  nothing run as timm's own ``Block.forward``, so ``keep_rate=1`` is ``model(x)`` bit for bit.
- The attention output comes from SDPA (fused path kept); the CLS row's probabilities are
  computed explicitly next to it (T·D extra MACs per keep block, counted by ``budget``).
  They are taken before attention dropout (EViT takes them after it; same in eval).
- n counts every non-prefix token at that block, the fused token of an earlier keep block
  included (as in EViT), so with keep_rate=0.7 ViT-B goes 196 → 138+1 → 98+1 → 70+1.
  ceil is taken as ceil(keep_rate·n − 1e-9) so that float noise in keep_rate·n cannot add a
  token (0.7·140 is 98, not 99).
- The fused token weights are the raw CLS attention probabilities (not renormalised), as in
  EViT's code; it goes last. Kept tokens stay in their input order (EViT orders them by
  attention; the order changes nothing but float summation order).
- Needs a class token; reg tokens (and other prefix tokens) are always kept, in front.
- ``layers`` are 1-based block numbers. The default (4, 7, 10) is EViT's setting for 12
  blocks; on a shallower model the default keeps the ones that exist. Layers given
  explicitly must all exist.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from dynavit.trainer.methods.tokens import (attend, check_images, check_token_model,
                                         cls_attention_row, stem)
from dynavit.trainer.methods.sparse import unwrap_model

__all__ = [
    "EVIT_LAYERS",
    "evit_forward",
    "evit_forward_features",
    "evit_select",
    "evit_keep_count",
    "evit_token_counts",
    "resolve_layers",
    "check_evit_model",
]

EVIT_LAYERS = (4, 7, 10)


def check_evit_model(model: nn.Module) -> VisionTransformer:
    m = check_token_model(model, "EViT")
    if m.cls_token is None:
        raise ValueError("EViT: model has no class token (class_token=False); EViT ranks "
                         "tokens by the CLS token's attention")
    return m


def _check_keep_rate(keep_rate) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1], got {keep_rate}")
    return keep_rate


def evit_keep_count(keep_rate: float, n: int) -> int:
    """Tokens kept out of n non-prefix tokens: ceil(keep_rate·n), at least 1."""
    return max(1, min(n, math.ceil(keep_rate * n - 1e-9)))


def resolve_layers(layers: Optional[Sequence[int]], depth: int) -> tuple[int, ...]:
    """0-based block indices from 1-based ``layers`` (None: EVIT_LAYERS, clipped to depth)."""
    if layers is None:
        return tuple(l - 1 for l in EVIT_LAYERS if l <= depth)
    try:
        ls = [int(l) for l in layers]
    except TypeError:
        raise TypeError(f"layers must be a sequence of 1-based block numbers, got "
                        f"{type(layers).__name__}") from None
    bad = [l for l in ls if not 1 <= l <= depth]
    if bad:
        raise ValueError(f"EViT layers {bad} do not exist: the model has blocks 1..{depth}")
    if len(set(ls)) != len(ls):
        raise ValueError(f"EViT layers repeat: {list(layers)}")
    return tuple(sorted(l - 1 for l in ls))


def evit_token_counts(num_patches: int, keep_rate: float, depth: int,
                      layers: Optional[Sequence[int]] = None, fuse: bool = True) -> list[int]:
    """Non-prefix tokens after each block (depth values): block i's attention runs on the
    count after block i-1, its MLP on the count after block i."""
    keep_rate = _check_keep_rate(keep_rate)
    idx = set(resolve_layers(layers, depth))
    n, out = num_patches, []
    for i in range(depth):
        if i in idx:
            keep = evit_keep_count(keep_rate, n)
            if keep < n:
                n = keep + (1 if fuse else 0)
        out.append(n)
    return out


def evit_select(attn: torch.Tensor, keep: int, num_prefix: int = 1):
    """Which non-prefix tokens to keep from attention probabilities ``attn``: [B,H,T,T] (full
    map; row 0 is used), [B,H,T] (the CLS row) or [B,T] (already averaged over heads).

    Returns (keep_idx [B,keep], drop_idx [B,n-keep], cls_attn [B,n]): indices into the
    non-prefix tokens (token ``num_prefix + i``), each ascending; cls_attn is the CLS
    attention to those tokens averaged over heads.
    """
    if attn.ndim == 4:
        attn = attn[:, :, 0]
    if attn.ndim == 3:
        attn = attn.mean(dim=1)
    if attn.ndim != 2:
        raise ValueError(f"attn must be [B,H,T,T], [B,H,T] or [B,T], got {tuple(attn.shape)}")
    cls_attn = attn[:, num_prefix:]
    n = cls_attn.shape[1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in 1..{n}, got {keep}")
    order = cls_attn.argsort(dim=1, descending=True, stable=True)  # ties: lower index first
    keep_idx = order[:, :keep].sort(dim=1)[0]
    drop_idx = order[:, keep:].sort(dim=1)[0]
    return keep_idx, drop_idx, cls_attn


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _evit_block(blk: Block, x: torch.Tensor, keep_rate: float, num_prefix: int,
                fuse: bool) -> torch.Tensor:
    n = x.shape[1] - num_prefix
    keep = evit_keep_count(keep_rate, n)
    if keep == n:
        return blk(x)
    a, q, k = attend(blk.attn, blk.norm1(x))
    x = x + blk.drop_path1(blk.ls1(a))
    keep_idx, drop_idx, cls_attn = evit_select(cls_attention_row(blk.attn, q, k), keep,
                                               num_prefix)
    tokens = x[:, num_prefix:]
    parts = [x[:, :num_prefix], _gather(tokens, keep_idx)]
    if fuse:
        w = cls_attn.gather(1, drop_idx).to(x.dtype)
        parts.append((_gather(tokens, drop_idx) * w.unsqueeze(-1)).sum(dim=1, keepdim=True))
    x = torch.cat(parts, dim=1)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def evit_forward_features(model: nn.Module, images: torch.Tensor, keep_rate: float, *,
                          layers: Optional[Sequence[int]] = None,
                          fuse: bool = True) -> torch.Tensor:
    """Pre-head tokens [B, prefix + n_out, D] of ``model`` with EViT token reorganisation at
    ``layers`` (1-based; None: EViT's (4, 7, 10), those the model has)."""
    m = check_evit_model(model)
    check_images(m, images)
    keep_rate = _check_keep_rate(keep_rate)
    keep_at = set(resolve_layers(layers, len(m.blocks)))
    num_prefix = m.num_prefix_tokens

    x = stem(m, images)
    ckpt = m.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for i, blk in enumerate(m.blocks):
        if i in keep_at and keep_rate < 1.0:
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(_evit_block, blk, x, keep_rate,
                                                      num_prefix, fuse, use_reentrant=False)
            else:
                x = _evit_block(blk, x, keep_rate, num_prefix, fuse)
        elif ckpt:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return m.norm(x)


def evit_forward(model: nn.Module, images: torch.Tensor, keep_rate: float, *,
                 layers: Optional[Sequence[int]] = None, fuse: bool = True) -> torch.Tensor:
    """Logits of ``model`` with EViT (timm's own ``forward_head`` on the kept tokens)."""
    x = evit_forward_features(model, images, keep_rate, layers=layers, fuse=fuse)
    return unwrap_model(model).forward_head(x)
