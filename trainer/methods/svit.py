"""SViT (Liu et al., "Revisiting Token Pruning for Object Detection and Instance
Segmentation", WACV 2024) as a forward over an unmodified timm ViT.

Before each selected block a 2-layer MLP selector decides, per patch token, whether the block
processes it. Tokens it does not select skip the block *unchanged and stay in the sequence*
(preserved), so the feature map keeps every position and a later selector may pick a token
again (reactivation). The rate is dynamic: at inference each image keeps what its selectors
say; training pulls the *batch* mean kept share of each selector to a target (the authors'
dynamic ratio loss), not each image's.

Reference: github.com/uzh-rpg/svit @ 0d81069 (classification/selective_vit.py, engine.py):

- Selector (``SelectiveModule``): LayerNorm(C) → timm Mlp(C, C/4, 2) (Linear, GELU, Linear)
  → LogSoftmax; channel 0 is "keep". Training: ``gumbel_softmax(logp, tau, hard=True)[..., 0]``
  (straight-through); inference: ``argmin(logp)``, i.e. keep iff logp_keep > logp_drop.
- Block (Eq. 1): x ← M ⊙ Block(x, M) + (1 − M) ⊙ x. In training Block(x, M) hides the pruned
  tokens as keys (their columns of the attention, ``src_key_padding_mask=~M``); at inference the
  kept tokens are gathered, run through the block and scattered back.
- Ratio loss (Eq. 2, ``ratio_per_sample=False``): per selector (Σ_b Σ_n M_bn / (B·N) − t_l)²,
  averaged over the selectors, added with weight λ = 4 (paper §4, ``ratio_loss_lambda``).
- Targets: 12 blocks, selectors before blocks 4..12 with t = [ρ, ρ, ρ, ρ², ρ², ρ², ρ³, ρ³, ρ³],
  ρ = 0.7 (``svit_s``). Here: the first round(depth/4) blocks (at least 1) stay dense, the rest
  get a selector each, split into three equal stages (fewer if fewer blocks) with targets ρ^s.

Decisions of ours:
- Prefix tokens (CLS, reg) are always processed (the authors' ``version=1``; their last
  selector, ``last_version=0``, may drop the CLS of a classifier — ours never does: the head
  reads it, and dense tasks have none).
- A pruned token still attends to itself in the training attention (its output is thrown
  away by Eq. 1); this only keeps a row with every key hidden from turning into NaN.
- ``counts=`` runs a *fixed-count* forward: each selector keeps the top-n patches by keep
  score. It is what the MACs are counted on (a dynamic rate has no MACs of its own; budget.py
  matches the expected MACs at the trained rate, i.e. every image at its targets, docs/BASELINES.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.learned import (check_layers, check_rate, count_inference_macs,
                                             gather_tokens, match_rate, topk_sorted)
from dynavit.trainer.methods.tokens import attend, check_images, check_token_model, stem

__all__ = ["Selector", "SViTSelectors", "default_layers", "default_stages", "svit_forward",
           "svit_ratio_loss", "svit_loss", "svit_targets", "svit_keep_counts", "count_svit_macs",
           "match_svit_budget", "RATIO_LAMBDA"]

METHOD = "SViT"
RATIO_LAMBDA = 4.0  # the paper's λ (§4)
RHO_STEP = 0.001


def default_layers(depth: int) -> tuple[int, ...]:
    """1-based blocks that get a selector (before them): all but the first round(depth/4)."""
    if depth < 2:
        raise ValueError(f"{METHOD}: needs at least 2 blocks, the model has {depth}")
    dense = max(1, int(round(depth / 4)))
    return tuple(range(dense + 1, depth + 1))


def default_stages(n: int) -> tuple[int, ...]:
    """Stage (the exponent of ρ in the target) of each of ``n`` selectors: three equal
    consecutive groups, as the authors' 3 x (ρ, ρ², ρ³) for 9 selectors."""
    groups = min(3, n)
    return tuple(j * groups // n + 1 for j in range(n))


class Selector(nn.Module):
    """SViT's selector: LayerNorm → Linear(C, C/4) → GELU → Linear(C/4, 2) → log-softmax."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4:
            raise ValueError(f"{METHOD}: embed_dim must be >= 4, got {dim}")
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim // 4, 2, act_layer=nn.GELU)
        for mod in self.modules():  # timm's _init_vit_weights, which their model applies
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.mlp(self.norm(x)), dim=-1)


class SViTSelectors(nn.Module):
    """One selector per selected block, kept apart from the timm backbone (saved beside it).

    ``layers``: 1-based blocks that a selector acts *before*; ``stages``: each one's exponent s
    (target keep share ρ^s)."""

    def __init__(self, embed_dim: int, layers: Sequence[int], stages: Optional[Sequence[int]] = None):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.layers = check_layers(layers, METHOD)
        stages = default_stages(len(self.layers)) if stages is None else tuple(int(s) for s in stages)
        if len(stages) != len(self.layers) or min(stages) < 1:
            raise ValueError(f"{METHOD}: stages {list(stages)} must be >= 1, one per layer")
        self.stages = stages
        self.selectors = nn.ModuleList(Selector(self.embed_dim) for _ in self.layers)

    @classmethod
    def for_model(cls, model: nn.Module, layers: Optional[Sequence[int]] = None):
        m = check_token_model(model, METHOD)
        layers = default_layers(len(m.blocks)) if layers is None else layers
        with torch.device(m.pos_embed.device):
            heads = cls(m.embed_dim, layers)
        return heads.to(dtype=m.pos_embed.dtype)

    def config(self) -> dict:
        return {"method": "svit", "embed_dim": self.embed_dim, "layers": list(self.layers),
                "stages": list(self.stages)}

    def extra_repr(self) -> str:
        return f"layers={self.layers}, stages={self.stages}"


def _plan(m: VisionTransformer, heads: SViTSelectors) -> dict[int, int]:
    """{0-based block: selector index}."""
    if not isinstance(heads, SViTSelectors):
        raise TypeError(f"{METHOD}: heads must be SViTSelectors, got {type(heads).__name__}")
    if heads.embed_dim != m.embed_dim:
        raise ValueError(f"{METHOD}: selectors built for embed_dim {heads.embed_dim}, the model "
                         f"has {m.embed_dim}")
    if heads.layers[-1] > len(m.blocks):
        raise ValueError(f"{METHOD}: selector layers {list(heads.layers)} exceed the model's "
                         f"{len(m.blocks)} blocks")
    return {layer - 1: j for j, layer in enumerate(heads.layers)}


def svit_targets(heads: SViTSelectors, rho: float) -> list[float]:
    """Target keep share t_l = ρ^stage of each selector."""
    rho = check_rate(rho, "rho", METHOD)
    return [rho ** s for s in heads.stages]


def svit_keep_counts(num_patches: int, heads: SViTSelectors, rho: float) -> list[int]:
    """Patches each selector keeps at the targets: round(N·t_l), in 1..N."""
    return [max(1, min(num_patches, int(round(num_patches * t))))
            for t in svit_targets(heads, rho)]


def _masked_block(blk, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """timm's Block on x [B,T,C] with the tokens where ``keep`` [B,T] is False hidden as keys
    (each still sees itself, so no attention row is empty)."""
    T = x.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=x.device)
    allowed = keep[:, None, None, :].bool() | eye
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(~allowed, float("-inf"))
    x = x + blk.drop_path1(blk.ls1(attend(blk.attn, blk.norm1(x), bias)[0]))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _sparse_block(blk, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The block on each image's kept tokens only (gathered, run, scattered back); the others
    are preserved as they are. All kept: ``blk(x)`` itself."""
    if bool(keep.all()):
        return blk(x)
    out = x.clone()
    for b in range(x.shape[0]):
        idx = keep[b].nonzero().squeeze(1)
        if idx.numel():
            out[b, idx] = blk(x[b:b + 1, idx])[0]
    return out


def _fixed_block(blk, x: torch.Tensor, P: int, score: torch.Tensor, n: int) -> torch.Tensor:
    """The block on the prefix and the top-``n`` patches by keep score, scattered back."""
    if n >= score.shape[1]:
        return blk(x)
    idx = torch.cat([torch.arange(P, device=x.device).expand(x.shape[0], P),
                     topk_sorted(score, n) + P], dim=1)
    y = blk(gather_tokens(x, idx))
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), y)


def _run_blocks(m, heads, x, training: bool, tau: float, counts):
    """The encoder blocks with SViT's selectors; returns (tokens before the norm, decisions)."""
    plan, P = _plan(m, heads), m.num_prefix_tokens
    decisions = []
    for i, blk in enumerate(m.blocks):
        if i not in plan:
            x = blk(x)
            continue
        logp = heads.selectors[plan[i]](x[:, P:])
        if counts is not None:
            x = _fixed_block(blk, x, P, logp[..., 0], counts[plan[i]])
            continue
        if training:
            hard = F.gumbel_softmax(logp, tau=tau, hard=True)[..., 0]
        else:
            hard = (logp[..., 0] > logp[..., 1]).to(x.dtype)  # the authors' argmin
        decisions.append(hard)
        mask = torch.cat([hard.new_ones(hard.shape[0], P), hard], dim=1)
        if training:
            mk = mask.unsqueeze(-1)
            x = mk * _masked_block(blk, x, mask > 0.5) + (1 - mk) * x
        else:
            x = _sparse_block(blk, x, mask > 0.5)
    return x, decisions


def svit_forward(model: nn.Module, heads: SViTSelectors, images: torch.Tensor,
                 training: bool = False, *, tau: float = 1.0,
                 counts: Optional[Sequence[int]] = None, features: bool = False):
    """SViT over ``model``: logits [B, classes]; with ``training=True`` (logits, aux), aux
    holding ``decisions`` (per selector [B, N] hard 0/1 straight-through masks) and the
    selectors' ``stages``, for the ratio loss. ``counts``: a fixed-count forward (top-n per selector; MAC counting).
    ``features=True``: the final normed tokens [B, T, D] instead of logits (dense tasks)."""
    m = check_token_model(model, METHOD)
    check_images(m, images)
    if counts is not None and len(counts) != len(heads.layers):
        raise ValueError(f"{METHOD}: {len(counts)} counts for {len(heads.layers)} selectors")
    x, decisions = _run_blocks(m, heads, stem(m, images), training, tau, counts)
    x = m.norm(x)
    out = x if features else m.forward_head(x)
    if training:
        return out, {"decisions": decisions, "stages": heads.stages}
    return out


def svit_ratio_loss(aux, targets: Sequence[float]) -> torch.Tensor:
    """The authors' dynamic ratio loss: mean over selectors l of (mean_{b,n} M_bn − t_l)²:
    the kept share is averaged over the whole batch, so images may differ."""
    decisions = aux["decisions"] if isinstance(aux, dict) else aux
    if not decisions or len(decisions) != len(targets):
        raise ValueError(f"{METHOD}: {len(decisions)} decisions for {len(targets)} targets")
    loss = 0.0
    for d, t in zip(decisions, targets):
        loss = loss + (d.sum() / d.numel() - t) ** 2
    return loss / len(decisions)


def svit_loss(logits, aux: dict, target, rho: float, *, criterion=F.cross_entropy,
              ratio_lambda: float = RATIO_LAMBDA) -> torch.Tensor:
    """SViT's objective (engine.py): task loss + λ·ratio loss, targets ρ^stage (``aux`` from
    the training forward)."""
    rho = check_rate(rho, "rho", METHOD)
    targets = [rho ** s for s in aux["stages"]]
    return criterion(logits, target) + ratio_lambda * svit_ratio_loss(aux, targets)


# ---- MACs at the targets and budget matching ------------------------------------------------

def _num_patches(m) -> int:
    gh, gw = m.patch_embed.grid_size
    return int(gh) * int(gw)


def count_svit_macs(model: nn.Module, heads: SViTSelectors, rho: float, batch: int = 1) -> int:
    """Exact MACs (macs.MacCounter) of the forward with every image at the targets ρ^s
    (the fixed-count forward), the selectors included: the expected MACs at the trained rate."""
    m = check_token_model(model, METHOD)
    counts = svit_keep_counts(_num_patches(m), heads, rho)
    return count_inference_macs(m, [heads], lambda x: svit_forward(m, heads, x, counts=counts),
                                batch)


def match_svit_budget(model: nn.Module, k: int, heads: Optional[SViTSelectors] = None, *,
                      step: float = RHO_STEP) -> dict:
    """ρ on a grid of ``step`` whose MACs at the targets come closest to Dyna-ViT's exact MACs
    at K. Returns {'K', 'dynavit', 'rho', 'macs', 'rel', 'keep_counts'}."""
    from dynavit.trainer.methods.budget import count_dynavit_macs

    m = check_token_model(model, METHOD)
    heads = SViTSelectors.for_model(m) if heads is None else heads
    dyna = count_dynavit_macs(m, k)
    n = _num_patches(m)
    rho, macs = match_rate(step, lambda r: tuple(svit_keep_counts(n, heads, r)),
                           lambda r: count_svit_macs(m, heads, r), dyna["macs"])
    return {"K": int(k), "dynavit": dyna, "rho": rho, "macs": macs,
            "rel": (macs - dyna["macs"]) / dyna["macs"], "layers": list(heads.layers),
            "keep_counts": svit_keep_counts(n, heads, rho)}
