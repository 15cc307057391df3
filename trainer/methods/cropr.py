"""Token Cropr (Bergner et al., "Token Cropr: Faster ViTs for Quite a Few Tasks") as a forward
over an unmodified timm ViT.

A learned baseline for Dyna-ViT. After every block but the last a router scores the tokens
and the top M − R stay (prefix tokens always stay); the router is a cross-attention with
learnable queries on a LayerNorm-ed, *detached* copy of the tokens:

    score_j = Σ_heads Σ_queries q · k_j          (unscaled, as Cropr's code)

- Training (``training=True``): tokens are pruned exactly as at inference; in addition each
  router pools the tokens by its cross-attention (softmax(q·k/√d)·v, projection when
  multi-head, a residual MLP) and an auxiliary head (LayerNorm + Linear) classifies the pooled
  vector. The aux logits are trained with the task loss (``cropr_loss``); since the router's
  input is detached and the selection is a discrete gather, the routers learn only from their
  aux heads and the backbone only from the main loss. Returns (logits, aux_logits list).
- Inference: only the scores run (norm, queries · keys), no aux head.
- Last-layer fusion (``llf=True``): routers after blocks 1..depth−2; the tokens each router
  pruned are concatenated back (in router order) before the last block, so the last block
  and the head see every token.

Decisions:
- Router defaults follow Cropr's classification code (cls/main.py's argparse defaults): one
  query, one head, no q/k/v projection, a residual MLP (ratio 4) before the aux head, and no
  pre-attention LayerNorm (``--cropr_pre_attn_norm`` defaults to false, and the authors'
  logged ImageNet run, logs/cls_cropr_llf.txt, has ``pre_attn_norm: False``);
  ``pre_norm=True`` turns it on. Pinned by golden tests (tests/golden/cropr*.json).
- ``r`` as an int is Cropr's schedule: the first router prunes r + 1, every other r (197 →
  188 → 180 … on ViT-B/16 with r = 8); a sequence gives each router its own count. Each count
  is clipped so that at least one non-prefix token remains.
- Kept (and fused-back) tokens keep their input order (Cropr reorders them by score; attention
  does not care, only float summation order). Prefix tokens stay in front, so timm's own
  ``forward_head`` pools as usual ('token' reads CLS; 'avg' averages the non-prefix tokens,
  while Cropr's own head averages every token, CLS included).
- Routers that prune nothing at inference are skipped, so r = 0 is ``model(x)`` bit for bit.
- With more than one query the pooled vectors are averaged before the aux head (Cropr's code
  only runs one).
- Cropr fine-tunes the backbone together with the routers (``cropr_trainable``).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.tokens import check_images, check_token_model, stem
from dynavit.trainer.methods.learned import (count_inference_macs, gather_tokens, search_closest,
                                     topk_sorted)
from dynavit.trainer.methods.sparse import unwrap_model

__all__ = [
    "CroprRouter",
    "CroprRouters",
    "check_cropr_model",
    "cropr_schedule",
    "cropr_token_counts",
    "cropr_forward",
    "cropr_loss",
    "cropr_trainable",
    "count_cropr_macs",
    "match_cropr_r",
    "match_cropr_budget",
]

METHOD = "Cropr"
RSpec = Union[int, Sequence[int]]


class CroprRouter(nn.Module):
    """One router: learnable queries scoring tokens by q·k, plus (training only) the
    cross-attention pooling and an auxiliary classification head."""

    def __init__(self, dim: int, num_classes: int, *, num_queries: int = 1, num_heads: int = 1,
                 pre_norm: bool = False, q_proj: bool = False, k_proj: bool = False,
                 v_proj: bool = False, mlp: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{METHOD}: embed_dim {dim} is not divisible by {num_heads} heads")
        if num_queries < 1 or num_classes < 1:
            raise ValueError(f"{METHOD}: num_queries and num_classes must be >= 1")
        self.dim, self.num_heads, self.num_queries = dim, num_heads, num_queries
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim, eps=1e-6) if pre_norm else nn.Identity()
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=dim ** -0.5, a=-2 * dim ** -0.5, b=2 * dim ** -0.5)
        self.q = nn.Linear(dim, dim) if q_proj else nn.Identity()
        self.k = nn.Linear(dim, dim) if k_proj else nn.Identity()
        self.v = nn.Linear(dim, dim) if v_proj else nn.Identity()
        self.proj = nn.Linear(dim, dim) if num_heads > 1 else nn.Identity()
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6) if mlp else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp else None
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def _qk(self, x: torch.Tensor):
        B, T, _ = x.shape
        xn = self.norm(x)
        q = self.q(self.queries).reshape(1, self.num_queries, self.num_heads, self.head_dim)
        q = q.transpose(1, 2).expand(B, -1, -1, -1)                              # [B,H,M,hd]
        k = self.k(xn).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        return xn, q, k, q @ k.transpose(-2, -1)                                  # [B,H,M,T]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Token scores [B, T] (sum over heads and queries of q·k)."""
        return self._qk(x)[3].sum(dim=(1, 2))

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux logits [B, classes], scores [B, T]) — the training-time router."""
        B, T, D = x.shape
        xn, q, k, s = self._qk(x)
        v = self.v(xn).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        o = (s * self.scale).softmax(dim=-1) @ v                                  # [B,H,M,hd]
        o = self.proj(o.transpose(1, 2).reshape(B, self.num_queries, D))
        if self.mlp is not None:
            o = o + self.mlp(self.mlp_norm(o))
        return self.head(self.head_norm(o.mean(dim=1))), s.sum(dim=(1, 2))


class CroprRouters(nn.Module):
    """Cropr's routers for one model, kept apart from the timm backbone: ``depth − 1`` of
    them, or ``depth − 2`` with last-layer fusion (``llf``)."""

    def __init__(self, embed_dim: int, depth: int, num_classes: int, llf: bool = False,
                 **router_kwargs):
        super().__init__()
        self.embed_dim, self.depth, self.llf = int(embed_dim), int(depth), bool(llf)
        self.num_classes = int(num_classes)
        self.router_kwargs = dict(router_kwargs)
        n = self.depth - (2 if self.llf else 1)
        if n < 1:
            raise ValueError(f"{METHOD}: a {depth}-block model has no block to route after"
                             + (" with last-layer fusion (needs >= 3 blocks)" if llf else ""))
        self.routers = nn.ModuleList(
            CroprRouter(self.embed_dim, self.num_classes, **router_kwargs) for _ in range(n))

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: Optional[int] = None, llf: bool = False,
                  **router_kwargs):
        m = check_cropr_model(model)
        if num_classes is None:
            num_classes = m.num_classes
        if not num_classes:
            raise ValueError(f"{METHOD}: the aux heads need num_classes (the model has none)")
        with torch.device(m.pos_embed.device):
            routers = cls(m.embed_dim, len(m.blocks), num_classes, llf, **router_kwargs)
        return routers.to(dtype=m.pos_embed.dtype)

    def config(self) -> dict:
        return {"method": "cropr", "embed_dim": self.embed_dim, "depth": self.depth,
                "num_classes": self.num_classes, "llf": self.llf, **self.router_kwargs}

    def extra_repr(self) -> str:
        return f"llf={self.llf}"


def check_cropr_model(model: nn.Module) -> VisionTransformer:
    return check_token_model(model, METHOD)


def _check(m: VisionTransformer, routers: CroprRouters) -> None:
    if not isinstance(routers, CroprRouters):
        raise TypeError(f"{METHOD}: routers must be CroprRouters, got {type(routers).__name__}")
    if routers.embed_dim != m.embed_dim or routers.depth != len(m.blocks):
        raise ValueError(f"{METHOD}: routers were built for embed_dim {routers.embed_dim}, depth "
                         f"{routers.depth}; the model has {m.embed_dim}, {len(m.blocks)}")


def cropr_schedule(r: RSpec, n_routers: int) -> list[int]:
    """Per-router prune counts: an int r is Cropr's [r + 1, r, r, …] (r = 0: nothing); a
    sequence is used as given (one count per router)."""
    if isinstance(r, numbers.Integral) and not isinstance(r, bool):
        if r < 0:
            raise ValueError(f"{METHOD}: r must be >= 0, got {r}")
        return [int(r) + 1 if (i == 0 and r > 0) else int(r) for i in range(n_routers)]
    try:
        rs = [int(v) for v in r]
    except TypeError:
        raise TypeError(f"{METHOD}: r must be an int or one int per router, got {r!r}") from None
    if any(isinstance(v, bool) or v < 0 or int(v) != v for v in r):
        raise ValueError(f"{METHOD}: r values must be non-negative ints, got {list(r)}")
    if len(rs) != n_routers:
        raise ValueError(f"{METHOD}: r lists {len(rs)} counts for {n_routers} routers")
    return rs


def cropr_token_counts(num_patches: int, r: RSpec, n_routers: int) -> list[int]:
    """Non-prefix tokens after each router (each count clipped to keep >= 1 token)."""
    n, out = num_patches, []
    for ri in cropr_schedule(r, n_routers):
        n -= min(ri, n - 1)
        out.append(n)
    return out


def cropr_forward(model: nn.Module, routers: CroprRouters, images: torch.Tensor, r: RSpec,
                  training: bool = False):
    """Token Cropr over ``model``: logits at inference; (logits, aux_logits) with
    ``training=True`` (one aux logits tensor [B, classes] per router)."""
    m = check_cropr_model(model)
    check_images(m, images)
    _check(m, routers)
    P = m.num_prefix_tokens
    x = stem(m, images)
    n_routers = len(routers.routers)
    counts = cropr_token_counts(x.shape[1] - P, r, n_routers)
    aux, pruned = [], []
    last = len(m.blocks) - 1
    for i, blk in enumerate(m.blocks):
        if routers.llf and i == last and pruned:
            x = torch.cat([x] + pruned, dim=1)
        x = blk(x)
        if i >= n_routers:
            continue
        router = routers.routers[i]
        keep = counts[i]
        if training:
            aux_logits, scores = router.pool(x.detach())
            aux.append(aux_logits)
        elif keep < x.shape[1] - P:
            scores = router.score(x)
        if keep < x.shape[1] - P:
            tokens, s = x[:, P:], scores[:, P:]
            keep_idx = topk_sorted(s, keep)
            if routers.llf:
                drop_idx = topk_sorted(-s, tokens.shape[1] - keep)
                pruned.append(gather_tokens(tokens, drop_idx))
            x = torch.cat([x[:, :P], gather_tokens(tokens, keep_idx)], dim=1)
    logits = m.forward_head(m.norm(x))
    return (logits, aux) if training else logits


def cropr_loss(logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], target: torch.Tensor,
               criterion=F.cross_entropy) -> torch.Tensor:
    """Cropr's objective: the task loss on the main logits plus the same loss on every
    router's aux logits (summed, as Cropr's training loop)."""
    return criterion(logits, target) + sum(criterion(a, target) for a in aux_logits)


def cropr_trainable(model: nn.Module, routers: CroprRouters) -> list[nn.Parameter]:
    """What Cropr trains: the backbone and the routers (with their aux heads)."""
    return list(unwrap_model(model).parameters()) + list(routers.parameters())


# ---- exact MACs and budget matching ---------------------------------------------------------

def count_cropr_macs(model: nn.Module, routers: CroprRouters, r: RSpec, batch: int = 1) -> int:
    """Exact MACs of one inference ``cropr_forward`` (router scores included; the aux pooling
    and heads do not run at inference)."""
    m = check_cropr_model(model)
    return count_inference_macs(m, [routers], lambda x: cropr_forward(m, routers, x, r), batch)


def match_cropr_r(model: nn.Module, routers: CroprRouters, target_macs: float) -> tuple[int, int]:
    """(r, macs): the int r (Cropr's schedule) whose exact MACs are closest to the target."""
    m = check_cropr_model(model)
    _check(m, routers)
    gh, gw = m.patch_embed.grid_size
    n = int(gh) * int(gw)
    n_r = len(routers.routers)
    cache: dict = {}

    def exact(r: int) -> int:
        key = tuple(cropr_token_counts(n, r, n_r))
        if key not in cache:
            cache[key] = count_cropr_macs(m, routers, r)
        return cache[key]

    return search_closest(0, n - 1, exact, target_macs, increasing=False)


def match_cropr_budget(model: nn.Module, k: int, routers: Optional[CroprRouters] = None, *,
                       llf: bool = False) -> dict:
    """r whose exact Cropr MACs come closest to Dyna-ViT's at K (routers built on the model's
    device when not given). Returns {'K', 'dynavit', 'r', 'llf', 'macs', 'rel',
    'token_counts'}."""
    from dynavit.trainer.methods.budget import count_dynavit_macs

    m = check_cropr_model(model)
    if routers is None:
        routers = CroprRouters.for_model(m, llf=llf)
    gh, gw = m.patch_embed.grid_size
    dyna = count_dynavit_macs(m, k)
    r, macs = match_cropr_r(m, routers, dyna["macs"])
    return {"K": int(k), "dynavit": dyna, "r": r, "llf": routers.llf, "macs": macs,
            "rel": (macs - dyna["macs"]) / dyna["macs"],
            "token_counts": cropr_token_counts(int(gh) * int(gw), r, len(routers.routers))}
