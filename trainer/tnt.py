"""TNT, Training Noise Token pruning, as a forward over an unmodified timm ViT.

A learned baseline for Dyna-ViT. After a few chosen blocks a relevance head Linear(D, 1) scores
the patch tokens; alpha = softmax of those scores over the patch tokens (prefix tokens
excluded).

- Training (``training=True``): no token is dropped; each patch token after a chosen block
  gets Gaussian noise (1 − alpha_i)·eps, eps ~ N(0, beta·I) (beta = 0.02), prefix tokens none.
  The least noise goes to the most predictive tokens, so alpha learns relevance. The paper
  trains the heads only, on a frozen backbone (``tnt_trainable``).
- Inference: at each chosen block keep the ceil(keep·n) tokens of highest alpha (n = patch
  tokens entering that layer). At the first chosen block ``s`` more are kept by alpha and then
  removed by similarity matching: the candidates are split at random into two halves A and B,
  every A token finds its most cosine-similar B token (on the token embeddings), and the ``s``
  A tokens with the most similar matches are dropped (redundancy removal by random partition).

Decisions:
- ``layers`` are 1-based blocks after which the heads act; default (3, 4, 5), the paper's
  multi-layer loc, those that leave a block after them on a shallower model.
- beta is the *variance* of eps, as the paper writes N(0, beta·I): the noise std is
  sqrt(beta)·(1 − alpha). The appendix code multiplies unit noise by 0.02 (std 0.02); pass
  ``beta=0.02**2`` for that. The appendix also applies an extra LayerNorm (``alpha_norm``) to
  the tokens in training only; that would change a frozen backbone's residual stream between
  training and inference, so it is not applied.
- Similarity pruning runs once, at the first chosen block ("prune s tokens before they go
  on", rather than at every layer as Zero-TP); s is clipped to min(s, n − k, k) so that exactly
  k = ceil(keep·n) tokens remain. The default s is the paper's 40 of 196 patches scaled to the
  grid: round(40·N/196). ``s=0`` turns it off.
- The random split draws from ``generator`` (a CPU ``torch.Generator``; None: the global RNG),
  so a seeded generator makes inference reproducible. A drops, so exactly s distinct tokens go.
- ``keep`` is one keep rate in (0, 1] for every chosen layer or a sequence of per-layer rates;
  ceil with float noise ignored (as EViT). keep=1 with s=0, or keep=1 at any s (nothing to
  prune: s is clipped to n − k = 0), is ``model(x)`` bit for bit.
- Kept tokens stay in raster order; prefix tokens (CLS, reg) stay in front. Any timm pooling
  works ('avg' pools the kept tokens at inference); no class token is needed.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer._vit_tokens import check_images, check_token_model, stem
from dynavit.trainer.learned import (ceil_count, check_layers, check_rate, count_inference_macs,
                                     gather_tokens, match_rate, resolve_block_layers,
                                     topk_sorted)

__all__ = [
    "TNT_LAYERS",
    "TNT_BETA",
    "TNTHeads",
    "check_tnt_model",
    "default_s",
    "similarity_prune",
    "tnt_token_counts",
    "tnt_forward",
    "tnt_trainable",
    "count_tnt_macs",
    "match_tnt_keep",
    "match_tnt_budget",
]

METHOD = "TNT"
TNT_LAYERS = (3, 4, 5)
TNT_BETA = 0.02
KEEP_STEP = 0.001

KeepSpec = Union[float, Sequence[float]]


def check_tnt_model(model: nn.Module) -> VisionTransformer:
    return check_token_model(model, METHOD)


def default_layers(depth: int) -> tuple[int, ...]:
    ls = tuple(l for l in TNT_LAYERS if l <= depth - 1)
    if not ls:
        raise ValueError(f"{METHOD}: the default layers {TNT_LAYERS} need at least 4 blocks, "
                         f"the model has {depth}; pass layers=...")
    return ls


class TNTHeads(nn.Module):
    """TNT's relevance heads, one Linear(D, 1) per chosen layer (1-based ``layers``), kept apart
    from the timm backbone. ``TNTHeads.for_model(model)`` uses the default layers."""

    def __init__(self, embed_dim: int, layers: Sequence[int]):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.layers = check_layers(layers, METHOD)
        self.heads = nn.ModuleList(nn.Linear(self.embed_dim, 1) for _ in self.layers)
        for h in self.heads:  # timm's ViT init for Linear layers
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)

    @classmethod
    def for_model(cls, model: nn.Module, layers: Optional[Sequence[int]] = None):
        m = check_tnt_model(model)
        depth = len(m.blocks)
        idx = resolve_block_layers(layers if layers is not None else default_layers(depth),
                                   depth, (), METHOD)
        with torch.device(m.pos_embed.device):
            heads = cls(m.embed_dim, [i + 1 for i in idx])
        return heads.to(dtype=m.pos_embed.dtype)

    def alpha(self, j: int, tokens: torch.Tensor) -> torch.Tensor:
        """alpha [B, n]: softmax over the patch tokens [B, n, D] of head j's scores."""
        return self.heads[j](tokens).squeeze(-1).softmax(dim=-1)

    def config(self) -> dict:
        return {"method": "tnt", "embed_dim": self.embed_dim, "layers": list(self.layers)}

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


def _stages(m: VisionTransformer, heads: TNTHeads) -> dict[int, int]:
    if not isinstance(heads, TNTHeads):
        raise TypeError(f"{METHOD}: heads must be TNTHeads, got {type(heads).__name__}")
    if heads.embed_dim != m.embed_dim:
        raise ValueError(f"{METHOD}: heads were built for embed_dim {heads.embed_dim}, the model "
                         f"has {m.embed_dim}")
    idx = resolve_block_layers(heads.layers, len(m.blocks), (), METHOD)
    return {i: j for j, i in enumerate(idx)}


def default_s(num_patches: int) -> int:
    """The paper's s = 40 at 196 patches, scaled to the grid."""
    return int(round(40 * num_patches / 196))


def _rates(keep: KeepSpec, stages: int) -> list[float]:
    if isinstance(keep, numbers.Real) and not isinstance(keep, bool):
        return [check_rate(keep, "keep", METHOD)] * stages
    try:
        rates = [check_rate(k, "keep", METHOD) for k in keep]
    except TypeError:
        raise TypeError(f"{METHOD}: keep must be a rate in (0, 1] or one per layer, got "
                        f"{keep!r}") from None
    if len(rates) != stages:
        raise ValueError(f"{METHOD}: keep lists {len(rates)} rates for {stages} layers")
    return rates


def _check_s(s, num_patches: int) -> int:
    if s is None:
        return default_s(num_patches)
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
        raise ValueError(f"{METHOD}: s must be a non-negative int, got {s!r}")
    return int(s)


def tnt_token_counts(num_patches: int, keep: KeepSpec, stages: int,
                     s: Optional[int] = None) -> list[tuple[int, int]]:
    """Per chosen layer (candidates by alpha, tokens after similarity pruning): the first
    layer's candidates are k + s_eff, s_eff = min(s, n − k, k); later layers k, k."""
    rates = _rates(keep, stages)
    s = _check_s(s, num_patches)
    n, out = num_patches, []
    for j, rate in enumerate(rates):
        k = ceil_count(rate, n)
        se = min(s, n - k, k) if j == 0 else 0
        out.append((k + se, k))
        n = k
    return out


def similarity_prune(tokens: torch.Tensor, s: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices [B, T − s] (ascending) of the tokens [B, T, D] that survive TNT's redundancy
    removal: random halves A (the first ceil(T/2) of a random permutation) and B; each A token's
    best cosine similarity to B; the s A tokens with the highest are dropped (ties: earlier in
    the permutation). Needs s <= ceil(T/2) and T >= 2 when s > 0."""
    B, T, _ = tokens.shape
    ar = torch.arange(T, device=tokens.device).expand(B, T)
    if s == 0:
        return ar
    na = (T + 1) // 2
    if not 0 < s <= na or T < 2:
        raise ValueError(f"{METHOD}: cannot drop {s} of {T} tokens by similarity")
    if tokens.device.type == "meta":
        perm = torch.rand(B, T, device="meta").argsort(dim=1)
    else:
        perm = torch.rand(B, T, generator=generator).argsort(dim=1).to(tokens.device)
    a_idx, b_idx = perm[:, :na], perm[:, na:]
    xn = tokens / tokens.norm(dim=-1, keepdim=True)
    sim = gather_tokens(xn, a_idx) @ gather_tokens(xn, b_idx).transpose(1, 2)   # [B, na, nb]
    best = sim.max(dim=-1)[0]
    drop = a_idx.gather(1, best.argsort(dim=1, descending=True, stable=True)[:, :s])
    dropped = torch.zeros(B, T, dtype=torch.long, device=tokens.device).scatter(1, drop, 1)
    return (dropped * T + ar).argsort(dim=1)[:, :T - s]   # survivors first, in index order


def tnt_forward(model: nn.Module, heads: TNTHeads, images: torch.Tensor, keep: KeepSpec,
                s: Optional[int] = None, training: bool = False, *, beta: float = TNT_BETA,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits of ``model`` with TNT (see the module doc). ``training=True``: the noise forward
    (every token kept; ``keep`` and ``s`` unused); otherwise the pruning forward.
    ``generator`` feeds the noise (training) or the random split (inference)."""
    m = check_tnt_model(model)
    check_images(m, images)
    stages = _stages(m, heads)
    P = m.num_prefix_tokens
    x = stem(m, images)
    n0 = x.shape[1] - P

    if training:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or beta < 0:
            raise ValueError(f"{METHOD}: beta must be a non-negative number, got {beta!r}")
        std = math.sqrt(float(beta))
        for i, blk in enumerate(m.blocks):
            x = blk(x)
            if i in stages:
                tokens = x[:, P:]
                alpha = heads.alpha(stages[i], tokens)
                if generator is None:
                    eps = torch.randn_like(tokens)
                else:
                    eps = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype,
                                      device=generator.device).to(tokens.device)
                x = torch.cat([x[:, :P], tokens + (1.0 - alpha).unsqueeze(-1) * std * eps], 1)
        return m.forward_head(m.norm(x))

    plan = tnt_token_counts(n0, keep, len(stages), s)
    for i, blk in enumerate(m.blocks):
        x = blk(x)
        if i in stages:
            cand, k = plan[stages[i]]
            tokens = x[:, P:]
            if k < tokens.shape[1]:
                alpha = heads.alpha(stages[i], tokens)
                tokens = gather_tokens(tokens, topk_sorted(alpha, cand))
                if cand > k:
                    tokens = gather_tokens(tokens, similarity_prune(tokens, cand - k, generator))
                x = torch.cat([x[:, :P], tokens], dim=1)
    return m.forward_head(m.norm(x))


def tnt_trainable(model: nn.Module, heads: TNTHeads) -> list[nn.Parameter]:
    """What TNT trains: the relevance heads only (the paper freezes the backbone)."""
    return list(heads.parameters())


# ---- exact MACs and budget matching ---------------------------------------------------------

def count_tnt_macs(model: nn.Module, heads: TNTHeads, keep: KeepSpec, s: Optional[int] = None,
                   batch: int = 1) -> int:
    """Exact MACs of one inference ``tnt_forward`` (relevance heads and the similarity
    matmul included)."""
    m = check_tnt_model(model)
    gen = torch.Generator().manual_seed(0)
    return count_inference_macs(
        m, [heads], lambda x: tnt_forward(m, heads, x, keep, s, generator=gen), batch)


def match_tnt_keep(model: nn.Module, heads: TNTHeads, target_macs: float,
                   s: Optional[int] = None, *, step: float = KEEP_STEP) -> tuple[float, int]:
    """(keep, macs): one keep rate for every chosen layer, on a grid of ``step``, whose exact
    MACs are closest to the target (the smallest grid point with those MACs)."""
    m = check_tnt_model(model)
    n_st = len(_stages(m, heads))
    gh, gw = m.patch_embed.grid_size
    n = int(gh) * int(gw)
    return match_rate(step, lambda r: tuple(tnt_token_counts(n, r, n_st, s)),
                      lambda r: count_tnt_macs(m, heads, r, s), target_macs)


def match_tnt_budget(model: nn.Module, k: int, heads: Optional[TNTHeads] = None, *,
                     s: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                     step: float = KEEP_STEP) -> dict:
    """keep whose exact TNT MACs come closest to Dyna-ViT's at K (heads built on the model's
    device when not given). Returns {'K', 'dynavit', 'keep', 's', 'macs', 'rel', 'layers',
    'token_counts'}."""
    from dynavit.trainer.budget import count_dynavit_macs

    m = check_tnt_model(model)
    if heads is None:
        heads = TNTHeads.for_model(m, layers)
    gh, gw = m.patch_embed.grid_size
    n = int(gh) * int(gw)
    dyna = count_dynavit_macs(m, k)
    keep, macs = match_tnt_keep(m, heads, dyna["macs"], s, step=step)
    return {"K": int(k), "dynavit": dyna, "keep": keep, "s": _check_s(s, n), "macs": macs,
            "rel": (macs - dyna["macs"]) / dyna["macs"], "layers": list(heads.layers),
            "token_counts": tnt_token_counts(n, keep, len(heads.layers), s)}
