"""Shared pieces of the token-reduction baselines (ToMe, EViT) over an unmodified timm ViT.

Like ``sparse.py`` these only *read* the model: the stem, norms, MLPs and head are timm's own
modules, called in the order ``VisionTransformer.forward_features`` calls them; only the
attention of a block is re-run here (from the block's own ``qkv``, ``q_norm``/``k_norm``,
``norm``, ``gate`` and ``proj``) so that a method can add a bias to the logits or read the keys
or the CLS row of the attention. Nothing is patched, so state_dicts stay timm's.

Supported: exactly ``timm.models.vision_transformer.Block`` with exactly ``Attention`` (fused
SDPA or timm's manual path, whichever the module is set to), qkv bias, qk-norm, scale-norm,
gated attention, LayerScale, drop-path, reg tokens, ``no_embed_class``, class_token=False.
Refused with a one-line error (the same refusals as ``sparse.check_model``, plus any other
block or attention class): attention-pool heads, models without an absolute pos_embed
(rope / pos_embed='none'), dynamic_img_size, subclasses that override the forward,
ResPostBlock / parallel blocks / AttentionRope.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from dynavit.trainer.methods.sparse import _check_images, check_model

__all__ = ["check_token_model", "stem", "attend", "cls_attention_row", "check_images"]


def check_token_model(model: nn.Module, method: str) -> VisionTransformer:
    """The unwrapped ViT, or a one-line TypeError/ValueError naming what ``method`` cannot run."""
    try:
        m = check_model(model)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{method}: {e}") from None
    for i, blk in enumerate(m.blocks):
        if type(blk) is not Block:
            raise ValueError(f"{method}: block {i} is {type(blk).__name__}; only timm's "
                             f"pre-norm vision_transformer.Block is supported")
        if type(blk.attn) is not Attention:
            raise ValueError(f"{method}: block {i} uses {type(blk.attn).__name__}; only "
                             f"timm's vision_transformer Attention is supported")
    return m


check_images = _check_images  # the sparse forward's input checks, one definition


def stem(m: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """forward_features up to the blocks: embed, timm's own _pos_embed, patch_drop, norm_pre."""
    x = m.patch_embed(images)
    x = m._pos_embed(x)
    x = m.patch_drop(x)
    return m.norm_pre(x)


def attend(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """timm ``Attention.forward`` on x [B,T,C] with an optional additive float bias on the
    logits (broadcastable to [B,H,T,T]); returns (out [B,T,C], q, k) with q, k [B,H,T,hd]
    after q_norm/k_norm, i.e. the queries and keys the attention really used.

    Same ops in the same order as timm, so with ``bias=None`` the output equals
    ``attn(x)`` bit for bit; the fused path stays fused (SDPA takes the float mask).
    """
    B, N, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.)
    else:
        s = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        p = attn.attn_drop(s.softmax(dim=-1))
        o = p @ v
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    o = attn.proj(o)
    return attn.proj_drop(o), q, k


def cls_attention_row(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities of the first (CLS) query [B,H,T], computed explicitly
    (1·T·hd MACs per head; the full map is never materialised, so SDPA stays fused)."""
    s = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
    return s.float().softmax(dim=-1)[:, :, 0]
