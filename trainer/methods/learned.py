"""Shared pieces of the learned token-pruning methods (DynamicViT, TNT, Token Cropr).

Like ``_vit_tokens`` (ToMe/EViT) these run over an *unmodified* timm VisionTransformer: the
stem, blocks, norm and head are timm's own modules, called in ``forward_features`` order, and
the model's state_dict stays a plain timm checkpoint. A method's own parameters (predictors,
relevance heads, routers) live in a separate ``nn.Module`` that is saved beside the backbone.

Here: layer validation, sorted top-k selection, gathers, DynamicViT's attention with a keep
policy on the keys, exact inference MAC counts (backbone + the method's module, one
``macs.MacCounter`` pass) and a closest-MACs search over a monotone integer grid.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from dynavit.trainer.methods.macs import count_on_zero_images

__all__ = [
    "resolve_block_layers",
    "check_rate",
    "topk_sorted",
    "gather_tokens",
    "attend_with_policy",
    "policy_block",
    "count_inference_macs",
    "search_closest",
    "param_snapshot",
    "ceil_count",
]


def resolve_block_layers(layers: Optional[Sequence[int]], depth: int, default: Sequence[int],
                         method: str) -> tuple[int, ...]:
    """0-based block indices after which a method acts, from 1-based ``layers`` (None:
    ``default``). Every layer must leave at least one block after it (1..depth-1), none may
    repeat; returned ascending."""
    given = default if layers is None else layers
    try:
        ls = [int(l) for l in given]
    except TypeError:
        raise TypeError(f"{method}: layers must be a sequence of 1-based block numbers, got "
                        f"{type(given).__name__}") from None
    if any(isinstance(l, bool) for l in given) or any(int(l) != l for l in given):
        raise TypeError(f"{method}: layers must be integers, got {list(given)}")
    if not ls:
        raise ValueError(f"{method}: needs at least one layer")
    bad = [l for l in ls if not 1 <= l <= depth - 1]
    if bad:
        what = "default layers" if layers is None else "layers"
        raise ValueError(f"{method}: {what} {bad} do not leave a block after them: the model has "
                         f"blocks 1..{depth}, so layers must lie in 1..{depth - 1}"
                         + ("; pass layers=... for this depth" if layers is None else ""))
    if len(set(ls)) != len(ls):
        raise ValueError(f"{method}: layers repeat: {list(given)}")
    return tuple(sorted(l - 1 for l in ls))


def check_layers(layers: Sequence[int], method: str) -> tuple[int, ...]:
    """1-based block numbers of a method's heads: distinct, ascending, at least one."""
    out = tuple(int(layer) for layer in layers)
    if not out or sorted(set(out)) != list(out) or out[0] < 1:
        raise ValueError(f"{method}: layers must be distinct, ascending, 1-based, got {list(layers)}")
    return out


def check_rate(value, name: str, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{method}: {name} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{method}: {name} must lie in (0, 1], got {value}")
    return value


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k highest ``scores`` [B, n] per row, ascending (ties: lower
    index first). Meta-device safe (no data-dependent shapes)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1)[0]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] for x [B, T, C], idx [B, k]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def attend_with_policy(attn: Attention, x: torch.Tensor, policy: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """timm ``Attention.forward`` on x [B,T,C] with DynamicViT's keep policy on the keys.

    ``policy`` [B, T, 1] in {0, 1} (differentiable: straight-through Gumbel decisions). Token
    j is hidden as a key from every query i != j where policy_j = 0; a dropped token still
    attends to itself, so no row is empty. The softmax is DynamicViT's stable form:
    p = (exp(s - max)·P + eps/T) / (Σ exp(s - max)·P + eps), in float32. Always the explicit
    (non-fused) path: the policy multiplies the probabilities, it is not an additive bias.
    """
    B, T, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    s = (q * attn.scale) @ k.transpose(-2, -1)                       # [B, H, T, T]
    keep = policy.reshape(B, 1, 1, T).to(torch.float32)
    eye = torch.eye(T, dtype=torch.float32, device=x.device).view(1, 1, T, T)
    keep = keep + (1.0 - keep) * eye
    s = s - s.max(dim=-1, keepdim=True)[0]
    p = s.to(torch.float32).exp() * keep
    p = ((p + eps / T) / (p.sum(dim=-1, keepdim=True) + eps)).to(v.dtype)
    p = attn.attn_drop(p)
    o = (p @ v).transpose(1, 2).reshape(B, T, attn.attn_dim)
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def policy_block(blk: Block, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """timm's pre-norm ``Block.forward`` with ``attend_with_policy`` as its attention."""
    x = x + blk.drop_path1(blk.ls1(attend_with_policy(blk.attn, blk.norm1(x), policy)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def count_inference_macs(m: VisionTransformer, modules: Iterable[nn.Module],
                         run: Callable[[torch.Tensor], object], batch: int = 1) -> int:
    """Exact MACs (``macs.MacCounter``) of ``run(images)`` on zero images of the
    model's size, where the model lives (the meta device costs nothing), with the model and
    ``modules`` in eval mode (restored after) and no grad. Counted: every matmul, the
    patch-embed conv, attention (SDPA or its bmm's) — the method's own Linear layers and
    similarity / score matmuls included. Not counted: norms, softmax, GELU, adds, sorts,
    gathers."""
    return count_on_zero_images(m, run, modules, batch).total


def search_closest(lo: int, hi: int, exact: Callable[[int], int], target: float,
                   increasing: bool) -> tuple[int, int]:
    """(i, exact(i)) over integers i in [lo, hi] with ``exact`` monotone in i (non-decreasing
    if ``increasing``) whose MACs are closest to ``target`` (ties: the cheaper one, then the
    smaller i). Bisection on exact counts: O(log(hi - lo)) calls."""
    if lo > hi:
        raise ValueError(f"empty search range [{lo}, {hi}]")
    sign = 1 if increasing else -1

    def below(i):  # i lies on the low-parameter side of the crossing
        return sign * (exact(i) - target) < 0

    if not below(lo):
        i = lo
    elif below(hi):
        i = hi
    else:
        a, b = lo, hi  # below(a), not below(b)
        while b - a > 1:
            mid = (a + b) // 2
            if below(mid):
                a = mid
            else:
                b = mid
        i = a
    best = (i, exact(i))
    if i < hi:
        cand = (i + 1, exact(i + 1))
        da, db = abs(best[1] - target), abs(cand[1] - target)
        if db < da or (db == da and cand[1] < best[1]):
            best = cand
    return best


def match_rate(step: float, plan: Callable[[float], tuple], count: Callable[[float], int],
               target: float) -> tuple[float, int]:
    """(rate, macs): the rate on a grid of ``step`` in (0, 1] whose exact MACs ``count(rate)``
    are closest to ``target``; the smallest grid point with that token plan (``plan(rate)``,
    the kept counts: equal plans cost the same, so each is counted once)."""
    steps = int(round(1.0 / step))
    cache: dict = {}

    def rate(i: int) -> float:
        return round(i / steps, 9)

    def exact(i: int) -> int:
        key = plan(rate(i))
        if key not in cache:
            cache[key] = count(rate(i))
        return cache[key]

    i, macs = search_closest(1, steps, exact, target, increasing=True)
    while i > 1 and plan(rate(i - 1)) == plan(rate(i)):
        i -= 1
    return rate(i), macs


def param_snapshot(*modules: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: detached clone} of every parameter, for before/after comparisons."""
    out = {}
    for j, mod in enumerate(modules):
        for name, prm in mod.named_parameters():
            out[f"{j}.{name}"] = prm.detach().clone()
    return out


def ceil_count(rate: float, n: int) -> int:
    """ceil(rate·n) in 1..n, with float noise in rate·n ignored (0.7·140 is 98, not 99)."""
    return max(1, min(n, math.ceil(rate * n - 1e-9)))
