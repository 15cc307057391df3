"""DynamicViT (Rao et al., NeurIPS 2021) as a forward over an unmodified timm ViT.

A learned baseline for Dyna-ViT: after a few chosen blocks a small prediction MLP scores every
remaining patch token from its *local* feature and a *global* feature (the mean over the kept
tokens) and keeps a fixed share of the patches: N·rho, N·rho², N·rho³ at the three stages
(N = patches of the grid), hierarchically (a token dropped once stays dropped).

- Training (``training=True``): the keep decisions are hard Gumbel-softmax samples
  (straight-through gradients) multiplied by the previous stage's decisions; no token is
  removed: dropped tokens are hidden as keys in every later attention (a dropped token only
  attends to itself), so shapes stay fixed and the decisions get gradients through the
  attention. Returns (logits, aux); ``ratio_loss`` pulls each stage's kept share to rho^s,
  ``distill_loss`` is DynamicViT's KL to the dense teacher's logits (+ MSE of the kept tokens
  to the teacher's tokens), ``dynamicvit_loss`` the weighted sum of its paper/code.
- Inference: the predictor's keep score (log-prob of "keep") ranks the tokens, the top
  int(N·rho^s) are gathered and timm's own blocks run on them.

The predictor (``PredictorLG``, as in DynamicViT's code): LayerNorm → Linear(D, D) → GELU,
split into a local half and a global half (the policy-weighted mean of the global half over
the tokens), concatenated → Linear(D, D/2) → GELU → Linear(D/2, D/4) → GELU → Linear(D/4, 2)
→ log-softmax; channel 0 is "keep".

Decisions:
- ``layers`` are 1-based block numbers after which a stage acts (DynamicViT's
  pruning_loc=[3, 6, 9] is "before 0-based block 3, 6, 9", i.e. after blocks 3, 6, 9). The
  default is (3, 6, 9) scaled to the depth: round(depth·s/4) for s = 1..3 (12 blocks: 3, 6, 9;
  8: 2, 4, 6; 4: 1, 2, 3). Any number of stages is allowed; stage s keeps rho^s.
- Keep counts are int(N·rho^s + 1e-9) (DynamicViT's int(), float noise ignored), at least 1
  and at most the tokens left. Kept tokens are gathered in raster order (DynamicViT orders them
  by score; attention does not care, only float summation order differs).
- Needs a class token and ``global_pool='token'``: the training path keeps dropped tokens in
  the sequence, so an average pool would see them in training and not at inference.
  Reg tokens (and other prefix tokens) are always kept.
- The backbone is only read (see ``_vit_tokens``); blocks before the first stage run as timm's
  own ``Block.forward``, so the inference path at rho=1 is ``model(x)`` bit for bit.
  Gradient checkpointing is not applied by this forward.
- DynamicViT fine-tunes the backbone together with the predictors (``dynamicvit_trainable``),
  the backbone at 0.01 x the predictors' rate and fixed during warm-up, and distils from the
  dense model it starts from (``dynamicvit_loss`` with teacher outputs); dynatrain wires that
  recipe (trainer/methods/recipes.py). The predictors start as DynamicViT's do (trunc-normal 0.02
  weights, zero biases: every keep probability near 1/2).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.tokens import check_images, check_token_model, stem
from dynavit.trainer.methods.learned import (check_layers, check_rate, count_inference_macs, gather_tokens,
                                     match_rate, policy_block, resolve_block_layers,
                                     topk_sorted)
from dynavit.trainer.methods.sparse import unwrap_model

__all__ = [
    "PredictorLG",
    "DynamicViTHeads",
    "default_layers",
    "check_dynamicvit_model",
    "dynamicvit_keep_counts",
    "dynamicvit_forward",
    "ratio_loss",
    "distill_loss",
    "dynamicvit_loss",
    "dynamicvit_trainable",
    "count_dynamicvit_macs",
    "match_dynamicvit_rho",
    "match_dynamicvit_budget",
]

METHOD = "DynamicViT"
RHO_STEP = 0.001


def default_layers(depth: int) -> tuple[int, ...]:
    """DynamicViT's (3, 6, 9) for 12 blocks, scaled to ``depth`` (1-based block numbers)."""
    if depth < 4:
        raise ValueError(f"{METHOD}: the default stages need at least 4 blocks, the model has "
                         f"{depth}; pass layers=...")
    return tuple(int(round(depth * s / 4)) for s in (1, 2, 3))


class PredictorLG(nn.Module):
    """DynamicViT's local-global prediction MLP: [B, n, D] tokens → [B, n, 2] log-probs
    (channel 0: keep). ``policy`` [B, n, 1] weights the global mean (None: plain mean)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4:
            raise ValueError(f"{METHOD}: embed_dim must be >= 4, got {dim}")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for mod in self.modules():  # DynamicViT's _init_weights (applied to the whole model there)
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1)
        return self.out_conv(x)


class DynamicViTHeads(nn.Module):
    """The predictors of DynamicViT, one per stage, kept apart from the timm backbone.

    ``layers``: 1-based blocks after which each stage acts (validated against the model at
    every forward). Build with ``DynamicViTHeads.for_model(model)`` for the default stages.
    """

    def __init__(self, embed_dim: int, layers: Sequence[int]):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.layers = check_layers(layers, METHOD)
        self.predictors = nn.ModuleList(PredictorLG(self.embed_dim) for _ in self.layers)

    @classmethod
    def for_model(cls, model: nn.Module, layers: Optional[Sequence[int]] = None):
        m = check_dynamicvit_model(model)
        idx = resolve_block_layers(layers if layers is not None else default_layers(len(m.blocks)),
                                   len(m.blocks), (), METHOD)
        dev = m.pos_embed.device
        with torch.device(dev):
            heads = cls(m.embed_dim, [i + 1 for i in idx])
        return heads.to(dtype=m.pos_embed.dtype)

    def config(self) -> dict:
        return {"method": "dynamicvit", "embed_dim": self.embed_dim, "layers": list(self.layers)}

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


def check_dynamicvit_model(model: nn.Module) -> VisionTransformer:
    m = check_token_model(model, METHOD)
    if m.cls_token is None:
        raise ValueError(f"{METHOD}: model has no class token (class_token=False); the head "
                         f"must read the CLS token")
    if m.global_pool != "token":
        raise ValueError(f"{METHOD}: global_pool={m.global_pool!r} is not supported: dropped "
                         f"tokens stay in the training sequence, so only 'token' pooling sees "
                         f"the same tokens in training and at inference")
    return m


def _stages(m: VisionTransformer, heads: DynamicViTHeads) -> dict[int, int]:
    if not isinstance(heads, DynamicViTHeads):
        raise TypeError(f"{METHOD}: heads must be DynamicViTHeads, got {type(heads).__name__}")
    if heads.embed_dim != m.embed_dim:
        raise ValueError(f"{METHOD}: heads were built for embed_dim {heads.embed_dim}, the model "
                         f"has {m.embed_dim}")
    idx = resolve_block_layers(heads.layers, len(m.blocks), (), METHOD)
    return {i: s for s, i in enumerate(idx)}


def dynamicvit_keep_counts(num_patches: int, rho: float, stages: int) -> list[int]:
    """Patch tokens kept after each stage: int(N·rho^s), clipped to 1..(tokens left)."""
    rho = check_rate(rho, "rho", METHOD)
    out, n = [], num_patches
    for s in range(1, stages + 1):
        n = max(1, min(n, int(num_patches * rho ** s + 1e-9)))
        out.append(n)
    return out


def dynamicvit_forward(model: nn.Module, heads: DynamicViTHeads, images: torch.Tensor,
                       rho: float, training: bool = False, *, tau: float = 1.0):
    """DynamicViT over ``model`` with ``heads``: at inference logits [B, classes]; with
    ``training=True`` (logits, aux) where aux holds

    - ``decisions``: per stage [B, N] hard keep decisions (0/1, straight-through), already
      multiplied by the earlier stages' — the input of ``ratio_loss``;
    - ``mask``: the last stage's decisions [B, N] (detached), for token distillation;
    - ``tokens``: the final normed patch tokens [B, N, D] (dropped ones included).

    Dropout / drop-path follow the modules' own train/eval mode, as timm's do.
    """
    m = check_dynamicvit_model(model)
    check_images(m, images)
    rho = check_rate(rho, "rho", METHOD)
    stages = _stages(m, heads)
    P = m.num_prefix_tokens
    x = stem(m, images)
    B, N = x.shape[0], x.shape[1] - P
    counts = dynamicvit_keep_counts(N, rho, len(stages))

    if not training:
        for i, blk in enumerate(m.blocks):
            x = blk(x)
            if i in stages:
                s = stages[i]
                tokens = x[:, P:]
                keep = counts[s]
                if keep < tokens.shape[1]:
                    score = heads.predictors[s](tokens)[..., 0]
                    x = torch.cat([x[:, :P], gather_tokens(tokens, topk_sorted(score, keep))], 1)
        return m.forward_head(m.norm(x))

    policy = prev = None
    decisions = []
    for i, blk in enumerate(m.blocks):
        x = blk(x) if policy is None else policy_block(blk, x, policy)
        if i in stages:
            s = stages[i]
            if prev is None:
                prev = x.new_ones(B, N, 1)
            pred = heads.predictors[s](x[:, P:], prev)
            hard = F.gumbel_softmax(pred, tau=tau, hard=True)[..., :1] * prev
            decisions.append(hard.squeeze(-1))
            policy = torch.cat([x.new_ones(B, P, 1), hard], dim=1)
            prev = hard
    x = m.norm(x)
    logits = m.forward_head(x)
    aux = {"decisions": decisions, "mask": prev.squeeze(-1).detach(), "tokens": x[:, P:]}
    return logits, aux


def ratio_loss(aux, rho: float) -> torch.Tensor:
    """DynamicViT's keep-ratio loss: mean over stages s of mean_b (kept share_b − rho^s)²
    (``aux`` from the training forward, or its list of decisions)."""
    rho = check_rate(rho, "rho", METHOD)
    decisions = aux["decisions"] if isinstance(aux, dict) else aux
    if not decisions:
        raise ValueError(f"{METHOD}: no stage decisions to compute a ratio loss on")
    loss = 0.0
    for s, d in enumerate(decisions, start=1):
        loss = loss + ((d.mean(dim=1) - rho ** s) ** 2).mean()
    return loss / len(decisions)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, aux: Optional[dict] = None,
                 teacher_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher ‖ student) of the class distributions (batch mean, DynamicViT's choice), plus,
    with ``aux`` and ``teacher_tokens`` [B, N, D] (the dense teacher's final normed patch
    tokens), the mean squared error of the kept tokens to the teacher's (DynamicViT's token
    distillation; 0 if no token is kept)."""
    loss = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits.detach(), dim=-1),
                    reduction="batchmean", log_target=True)
    if aux is not None and teacher_tokens is not None:
        keep = aux["mask"] > 0.5
        if bool(keep.any()):
            loss = loss + (aux["tokens"][keep] - teacher_tokens.detach()[keep]).pow(2).mean()
    return loss


def dynamicvit_loss(logits: torch.Tensor, aux: dict, target: torch.Tensor, rho: float, *,
                    teacher_logits: Optional[torch.Tensor] = None,
                    teacher_tokens: Optional[torch.Tensor] = None,
                    criterion=F.cross_entropy, ratio_weight: float = 2.0,
                    distill_weight: float = 0.5) -> torch.Tensor:
    """DynamicViT's training objective: task loss + ratio_weight·ratio loss (+ distill_weight·
    distillation when a teacher is given). Weights default to DynamicViT's (2.0, 0.5)."""
    loss = criterion(logits, target) + ratio_weight * ratio_loss(aux, rho)
    if teacher_logits is not None:
        loss = loss + distill_weight * distill_loss(logits, teacher_logits, aux, teacher_tokens)
    return loss


def dynamicvit_trainable(model: nn.Module, heads: DynamicViTHeads) -> list[nn.Parameter]:
    """What DynamicViT trains: the backbone and the predictors."""
    return list(unwrap_model(model).parameters()) + list(heads.parameters())


# ---- exact MACs and budget matching ---------------------------------------------------------

def count_dynamicvit_macs(model: nn.Module, heads: DynamicViTHeads, rho: float,
                          batch: int = 1) -> int:
    """Exact MACs of one inference ``dynamicvit_forward`` (predictors included)."""
    m = check_dynamicvit_model(model)
    return count_inference_macs(m, [heads], lambda x: dynamicvit_forward(m, heads, x, rho), batch)


def match_dynamicvit_rho(model: nn.Module, heads: DynamicViTHeads, target_macs: float, *,
                         step: float = RHO_STEP) -> tuple[float, int]:
    """(rho, macs): rho on a grid of ``step`` in (0, 1] whose exact MACs are closest to the
    target (the smallest grid point with those MACs)."""
    m = check_dynamicvit_model(model)
    n_stages = len(_stages(m, heads))
    gh, gw = m.patch_embed.grid_size
    n = int(gh) * int(gw)
    return match_rate(step, lambda r: tuple(dynamicvit_keep_counts(n, r, n_stages)),
                      lambda r: count_dynamicvit_macs(m, heads, r), target_macs)


def match_dynamicvit_budget(model: nn.Module, k: int, heads: Optional[DynamicViTHeads] = None,
                            *, layers: Optional[Sequence[int]] = None,
                            step: float = RHO_STEP) -> dict:
    """rho whose exact DynamicViT MACs come closest to Dyna-ViT's at K on ``model`` (heads
    built for it on its device when not given: a meta model costs nothing). Returns
    {'K', 'dynavit': {S, macs}, 'rho', 'macs', 'rel', 'keep_counts'}."""
    from dynavit.trainer.methods.budget import count_dynavit_macs

    m = check_dynamicvit_model(model)
    if heads is None:
        heads = DynamicViTHeads.for_model(m, layers)
    dyna = count_dynavit_macs(m, k)
    rho, macs = match_dynamicvit_rho(m, heads, dyna["macs"], step=step)
    gh, gw = m.patch_embed.grid_size
    return {"K": int(k), "dynavit": dyna, "rho": rho, "macs": macs,
            "rel": (macs - dyna["macs"]) / dyna["macs"], "layers": list(heads.layers),
            "keep_counts": dynamicvit_keep_counts(int(gh) * int(gw), rho, len(heads.layers))}
