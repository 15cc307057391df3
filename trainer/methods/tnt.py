"""TNT, Training Noise Token pruning (mx-ethan-rao/tnt), as a forward over an unmodified timm ViT.

A learned baseline for Dyna-ViT. Relevance heads Linear(D, 1), one per block, score the patch
tokens; alpha = softmax of those scores over the patch tokens (prefix tokens excluded).
The defaults follow the authors' code (models.py ``VisionTransformerWithTNT`` and main.py at
d095619), pinned by golden tests (tests/golden/tnt_*.json):

- Training (``training=True``): no token is dropped. After each of blocks 1..5 (``i < 5`` in
  their loop, whatever the pruning layers; here also after a pruning layer beyond 5, so that
  its head gets trained) the tokens go through ``alpha_norm`` (a LayerNorm, eps 1e-6, over
  every token, CLS included) and the patch tokens get noise 0.02·(1 − alpha_i)·eps,
  eps ~ N(0, I); prefix tokens get none. The least noise goes to the most predictive tokens,
  so alpha learns relevance. Their main.py freezes the backbone and trains the alpha heads
  (``tnt_trainable``); it sets ``requires_grad`` on the alpha_norm *module*, not on its
  parameters, so alpha_norm stays at its init (weight 1, bias 0): it is a parameter-free
  LayerNorm here. ``alpha_norm=False`` / ``noise_std`` give the paper's variant (no extra
  norm; the paper writes eps ~ N(0, beta·I) with beta = 0.02, i.e. ``noise_std=0.02**0.5``).
- Inference: at each pruning layer keep the int(rate·n) tokens of highest alpha (n = patch
  tokens entering that layer; at least 1).
- Similarity pruning of ``s`` tokens (redundancy removal by random partition: the tokens are
  split by ONE batch-wide random permutation, A = the first floor(T/2), B = the rest; every A
  token finds its most cosine-similar B token; the ``s`` A tokens with the most similar
  matches are dropped):
  * one pruning layer: at that layer, the int(rate·n) + s tokens of highest alpha are the
    candidates (taken in descending alpha order, as torch.topk gives them), and similarity
    pruning brings them back to int(rate·n);
  * several pruning layers: before block 1, on all patch tokens (their code first draws a
    random "importance" torch.rand(B, N) that only orders the survivors; it is drawn here
    too, so that a seed gives their split), in addition to the keep budget: N − s tokens
    enter block 1 and each pruning layer keeps int(rate·n) of what is left.
  s is clipped so that A can hold it: min(s, int(rate·n)) at a single layer (and at most
  n − int(rate·n)), min(s, N // 2) before block 1.

Decisions:
- ``layers`` are 1-based blocks after which the heads prune; default (3, 4, 5) (their README's
  multi-layer ``--pru_loc 2,3,4``), those that leave a block after them on a shallower model.
  The default s is their README's, scaled to the grid: 40 of 196 patches with several layers
  (``--sim_pru 40``), 25 of 196 with one (``--sim_pru 25``).
- The random draws come from ``generator`` (a CPU ``torch.Generator``; None: the global RNG,
  as their code), so a seeded generator makes inference reproducible.
- ``keep`` is one keep rate in (0, 1] for every chosen layer or a sequence of per-layer rates.
  keep=1 with s=0 is ``model(x)`` bit for bit.
- Prefix tokens (CLS, reg) stay in front; the order of the kept patch tokens is whatever the
  selection gives (attention and pooling do not depend on it). Any timm pooling works ('avg'
  pools the kept tokens at inference); no class token is needed.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.tokens import check_images, check_token_model, stem
from dynavit.trainer.methods.learned import (check_layers, check_rate, count_inference_macs,
                                     gather_tokens, match_rate, resolve_block_layers,
                                     topk_sorted)

__all__ = [
    "TNT_LAYERS",
    "TNT_NOISE_STD",
    "TNT_NOISE_BLOCKS",
    "tnt_plan",
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
TNT_NOISE_BLOCKS = 5   # models.py: noise after blocks with i < 5
TNT_NOISE_STD = 0.02   # models.py: x = alpha_norm(x) + 0.02 * noise
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
    """TNT's relevance heads, kept apart from the timm backbone: ``heads[b - 1]`` is the
    Linear(D, 1) after block b, for every block that gets training noise (1..``noise_blocks``)
    or prunes (``layers``, 1-based). ``TNTHeads.for_model(model)`` uses the default layers and
    noise after blocks 1..min(5, depth)."""

    def __init__(self, embed_dim: int, layers: Sequence[int],
                 noise_blocks: int = TNT_NOISE_BLOCKS):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.layers = check_layers(layers, METHOD)
        if isinstance(noise_blocks, bool) or int(noise_blocks) != noise_blocks or noise_blocks < 0:
            raise ValueError(f"{METHOD}: noise_blocks must be a non-negative int, got {noise_blocks!r}")
        self.noise_blocks = int(noise_blocks)
        n = max(self.noise_blocks, max(self.layers))
        self.heads = nn.ModuleList(nn.Linear(self.embed_dim, 1) for _ in range(n))
        for h in self.heads:  # timm's ViT init for Linear layers (their alpha_heads.apply(_init_weights))
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)

    @classmethod
    def for_model(cls, model: nn.Module, layers: Optional[Sequence[int]] = None,
                  noise_blocks: int = TNT_NOISE_BLOCKS):
        m = check_tnt_model(model)
        depth = len(m.blocks)
        idx = resolve_block_layers(layers if layers is not None else default_layers(depth),
                                   depth, (), METHOD)
        with torch.device(m.pos_embed.device):
            heads = cls(m.embed_dim, [i + 1 for i in idx], min(int(noise_blocks), depth))
        return heads.to(dtype=m.pos_embed.dtype)

    def noisy(self, depth: int) -> set[int]:
        """1-based blocks after which training adds noise."""
        return {b for b in range(1, self.noise_blocks + 1) if b <= depth} | set(self.layers)

    def alpha(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """alpha [B, n]: softmax over the patch tokens [B, n, D] of the scores of the head
        after (1-based) ``block``."""
        return self.heads[block - 1](tokens).squeeze(-1).softmax(dim=-1)

    def config(self) -> dict:
        return {"method": "tnt", "embed_dim": self.embed_dim, "layers": list(self.layers),
                "noise_blocks": self.noise_blocks}

    def extra_repr(self) -> str:
        return f"layers={self.layers}, noise_blocks={self.noise_blocks}"


def _stages(m: VisionTransformer, heads: TNTHeads) -> dict[int, int]:
    if not isinstance(heads, TNTHeads):
        raise TypeError(f"{METHOD}: heads must be TNTHeads, got {type(heads).__name__}")
    if heads.embed_dim != m.embed_dim:
        raise ValueError(f"{METHOD}: heads were built for embed_dim {heads.embed_dim}, the model "
                         f"has {m.embed_dim}")
    idx = resolve_block_layers(heads.layers, len(m.blocks), (), METHOD)
    return {i: j for j, i in enumerate(idx)}


def default_s(num_patches: int, stages: int = len(TNT_LAYERS)) -> int:
    """The authors' README s scaled to the grid: 40 of 196 patches with several pruning
    layers, 25 of 196 with one."""
    return int(round((40 if stages > 1 else 25) * num_patches / 196))


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


def _check_s(s, num_patches: int, stages: int) -> int:
    if s is None:
        return default_s(num_patches, stages)
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
        raise ValueError(f"{METHOD}: s must be a non-negative int, got {s!r}")
    return int(s)


def _keep_count(rate: float, n: int) -> int:
    # the authors' int(n * rate) (float noise ignored: 0.7·140 is 98), at least one token
    return max(1, min(n, int(rate * n + 1e-9)))


def tnt_plan(num_patches: int, keep: KeepSpec, stages: int,
             s: Optional[int] = None) -> tuple[int, list[tuple[int, int]]]:
    """(s_before, per layer (candidates by alpha, tokens after the layer)). With several
    layers s_before = min(s, N // 2) tokens go by similarity before block 1 and each layer
    keeps int(rate·n) of the n left; with one layer s_before = 0 and the layer takes
    int(rate·n) + s_eff candidates, s_eff = min(s, n − k, k), and keeps k."""
    rates = _rates(keep, stages)
    s = _check_s(s, num_patches, stages)
    pre = min(s, num_patches // 2) if stages > 1 else 0
    n, out = num_patches - pre, []
    for rate in rates:
        k = _keep_count(rate, n)
        se = min(s, n - k, k) if stages == 1 else 0
        out.append((k + se, k))
        n = k
    return pre, out


def tnt_token_counts(num_patches: int, keep: KeepSpec, stages: int,
                     s: Optional[int] = None) -> list[int]:
    """Patch tokens entering block 1 and leaving each pruning layer (stages + 1 values)."""
    pre, plan = tnt_plan(num_patches, keep, stages, s)
    return [num_patches - pre] + [k for _, k in plan]


def similarity_prune(tokens: torch.Tensor, s: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices [B, T − s] (ascending) of the tokens [B, T, D] that survive TNT's redundancy
    removal (models.py ``random_sim_prune``): one random permutation for the whole batch,
    A = its first T // 2, B = the rest; each A token's best cosine similarity to B; the s A
    tokens with the highest are dropped (ties: earlier in the permutation). Needs
    0 <= s <= T // 2."""
    B, T, _ = tokens.shape
    ar = torch.arange(T, device=tokens.device).expand(B, T)
    if s == 0:
        return ar
    na = T // 2
    if not 0 < s <= na:
        raise ValueError(f"{METHOD}: cannot drop {s} of {T} tokens by similarity")
    if tokens.device.type == "meta":
        perm = torch.randperm(T, device="meta")
    else:
        perm = torch.randperm(T, generator=generator).to(tokens.device)
    a_idx, b_idx = perm[:na].expand(B, na), perm[na:].expand(B, T - na)
    xn = F.normalize(tokens, p=2, dim=-1)
    sim = gather_tokens(xn, a_idx) @ gather_tokens(xn, b_idx).transpose(1, 2)   # [B, na, nb]
    best = sim.max(dim=-1)[0]
    drop = a_idx.gather(1, best.argsort(dim=1, descending=True, stable=True)[:, :s])
    dropped = torch.zeros(B, T, dtype=torch.long, device=tokens.device).scatter(1, drop, 1)
    return (dropped * T + ar).argsort(dim=1)[:, :T - s]   # survivors first, in index order


def _randn(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                       device=generator.device).to(like.device)


def tnt_forward(model: nn.Module, heads: TNTHeads, images: torch.Tensor, keep: KeepSpec,
                s: Optional[int] = None, training: bool = False, *,
                noise_std: float = TNT_NOISE_STD, alpha_norm: bool = True,
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
        if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or noise_std < 0:
            raise ValueError(f"{METHOD}: noise_std must be a non-negative number, got {noise_std!r}")
        noisy = heads.noisy(len(m.blocks))
        for i, blk in enumerate(m.blocks):
            x = blk(x)
            if i + 1 in noisy:
                alpha = heads.alpha(i + 1, x[:, P:])
                eps = _randn(x[:, P:], generator)
                if alpha_norm:  # parameter-free: theirs stays at its init (see the module doc)
                    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
                x = torch.cat([x[:, :P], x[:, P:] + float(noise_std) * (1.0 - alpha).unsqueeze(-1) * eps], 1)
        return m.forward_head(m.norm(x))

    pre, plan = tnt_plan(n0, keep, len(stages), s)
    if pre:
        # Their multi-layer path: a random "importance" (only orders the survivors; drawn to
        # keep their random stream), then similarity pruning of s tokens before block 1.
        if x.device.type != "meta":
            torch.rand(x.shape[0], n0, generator=generator)
        tokens = x[:, P:]
        x = torch.cat([x[:, :P], gather_tokens(tokens, similarity_prune(tokens, pre, generator))], 1)
    for i, blk in enumerate(m.blocks):
        x = blk(x)
        if i in stages:
            cand, k = plan[stages[i]]
            tokens = x[:, P:]
            if k < tokens.shape[1]:
                alpha = heads.alpha(i + 1, tokens)
                if cand > k:  # one layer: k + s candidates in descending alpha (torch.topk's order)
                    order = alpha.argsort(dim=1, descending=True, stable=True)[:, :cand]
                    tokens = gather_tokens(tokens, order)
                    tokens = gather_tokens(tokens, similarity_prune(tokens, cand - k, generator))
                else:
                    tokens = gather_tokens(tokens, topk_sorted(alpha, k))
                x = torch.cat([x[:, :P], tokens], dim=1)
    return m.forward_head(m.norm(x))


def tnt_trainable(model: nn.Module, heads: TNTHeads) -> list[nn.Parameter]:
    """What TNT trains: the relevance heads only (the authors freeze the backbone)."""
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
    def plan(r):
        pre, layers = tnt_plan(n, r, n_st, s)
        return pre, tuple(layers)

    return match_rate(step, plan,
                      lambda r: count_tnt_macs(m, heads, r, s), target_macs)


def match_tnt_budget(model: nn.Module, k: int, heads: Optional[TNTHeads] = None, *,
                     s: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                     step: float = KEEP_STEP) -> dict:
    """keep whose exact TNT MACs come closest to Dyna-ViT's at K (heads built on the model's
    device when not given). Returns {'K', 'dynavit', 'keep', 's', 'macs', 'rel', 'layers',
    'token_counts'}; token_counts are the patch tokens entering block 1 (N − s with several
    layers) and leaving each pruning layer."""
    from dynavit.trainer.methods.budget import count_dynavit_macs

    m = check_tnt_model(model)
    if heads is None:
        heads = TNTHeads.for_model(m, layers)
    gh, gw = m.patch_embed.grid_size
    n = int(gh) * int(gw)
    dyna = count_dynavit_macs(m, k)
    keep, macs = match_tnt_keep(m, heads, dyna["macs"], s, step=step)
    return {"K": int(k), "dynavit": dyna, "keep": keep, "s": _check_s(s, n, len(heads.layers)),
            "macs": macs,
            "rel": (macs - dyna["macs"]) / dyna["macs"], "layers": list(heads.layers),
            "token_counts": tnt_token_counts(n, keep, len(heads.layers), s)}
