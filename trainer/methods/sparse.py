"""Gather-based sparse forward of an unmodified timm VisionTransformer (DESIGN.md §1, §5).

embed all patches → gather the kept tokens → add the positional rows of exactly those
positions → prepend cls/reg tokens → the model's own blocks, norm and ``forward_head``.

The model is only *read*: nothing is patched, wrapped or re-registered, so its state_dict
stays a plain timm checkpoint. This is the only module that knows timm internals; it
mirrors ``VisionTransformer.forward_features`` / ``_pos_embed`` of timm 1.0.x step by
step, including the order of concat and add, so that keeping every token reproduces
``model(x)`` bit for bit.

Decisions:
- Patch embedding runs on all N patches, then tokens are gathered (the paper's recipe);
  gathering pixels before the conv would save N·D·P²·C MACs (<1 % of ViT-B) at the cost
  of re-implementing the embed layer.
- ``patch_drop`` (timm's PatchDropout, ``patch_drop_rate>0``) is run as timm runs it: in
  training it drops a random fraction of the *kept* tokens on top of the saliency pruning,
  in eval it is the identity. Refusing it would make such checkpoints unusable here.
- Attention-pool heads (``global_pool`` 'map'/'prr') are refused: they are not part of
  the method and have no tested equivalence here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from timm.models.vision_transformer import VisionTransformer

try:  # same helper forward_features uses for grad checkpointing
    from timm.models import checkpoint_seq
except ImportError:  # pragma: no cover - older layout
    from timm.models._manipulate import checkpoint_seq

__all__ = [
    "sparse_forward",
    "sparse_forward_features",
    "unwrap_model",
    "check_model",
    "num_patches",
    "dense_equivalent_mask",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = 0
    while seen < 8:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
        seen += 1
    return model


def check_model(model: nn.Module) -> VisionTransformer:
    """Return the unwrapped ViT, or raise a one-line TypeError/ValueError saying why not."""
    m = unwrap_model(model)
    if not isinstance(m, VisionTransformer):
        raise TypeError(
            f"sparse forward needs a timm VisionTransformer, got {type(m).__name__}")
    # Subclasses such as deit's VisionTransformerDistilled add tokens in their own
    # _pos_embed/forward_head; mirroring the base class would silently drop them.
    cls = type(m)
    for name in ("_pos_embed", "forward_features", "forward_head", "pool"):
        if getattr(cls, name) is not getattr(VisionTransformer, name):
            raise TypeError(
                f"{cls.__name__} overrides VisionTransformer.{name}; sparse forward "
                f"only mirrors the base class")
    if m.pos_embed is None:
        raise ValueError("model has no absolute pos_embed (e.g. rope / pos_embed='none'); "
                         "kept tokens would lose their positions")
    if m.dynamic_img_size:
        raise ValueError("dynamic_img_size=True is not supported: the kept indices refer "
                         "to the fixed grid of the model's img_size")
    if m.attn_pool is not None or m.global_pool in ("map", "prr"):
        raise ValueError(f"attention-pool head (global_pool={m.global_pool!r}) is not "
                         f"supported; use 'token', 'avg', 'avgmax', 'max' or ''")
    return m


def _grid(m: VisionTransformer) -> tuple[int, int]:
    gh, gw = m.patch_embed.grid_size
    return int(gh), int(gw)


def num_patches(model: nn.Module) -> int:
    """N: number of patches of the model's fixed grid."""
    gh, gw = _grid(check_model(model))
    return gh * gw


def _check_images(m: VisionTransformer, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B,C,H,W] tensor, got {shape}")
    img_size = getattr(m.patch_embed, "img_size", None)
    if img_size is not None and tuple(images.shape[-2:]) != tuple(img_size):
        raise ValueError(f"image size {tuple(images.shape[-2:])} does not match the model's "
                         f"img_size {tuple(img_size)}")
    if images.shape[1] != m.in_chans:
        raise ValueError(f"images have {images.shape[1]} channels, the model expects {m.in_chans}")


def _check_keep_idx(keep_idx, batch: int, n: int, validate: bool) -> torch.Tensor:
    if not isinstance(keep_idx, torch.Tensor):
        raise TypeError(f"keep_idx must be a torch integer tensor, got {type(keep_idx).__name__}")
    if keep_idx.is_floating_point() or keep_idx.is_complex() or keep_idx.dtype == torch.bool:
        raise TypeError(f"keep_idx must have an integer dtype, got {keep_idx.dtype}")
    if keep_idx.ndim != 2 or keep_idx.shape[0] != batch:
        raise ValueError(f"keep_idx must have shape [B={batch}, k], got {tuple(keep_idx.shape)}")
    k = keep_idx.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"keep_idx keeps {k} tokens per image; must be 1..N={n}")
    # Range and order checks read values (a device sync on CUDA); meta tensors have none.
    if validate and keep_idx.device.type != "meta" and keep_idx.numel():
        lo, hi = int(keep_idx.min()), int(keep_idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"keep_idx values must lie in 0..{n - 1}, got {lo}..{hi}")
        if k > 1 and not bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all()):
            raise ValueError("keep_idx rows must be strictly increasing (raster order, "
                             "no duplicates)")
    return keep_idx.long()


def _embed_tokens(m: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = m.patch_embed(images)
    if x.ndim == 4:  # embed layer without flatten: bring to [B, N, D] in raster order
        fmt = str(getattr(m.patch_embed, "output_fmt", "NCHW"))
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if fmt.endswith("NHWC") \
            else x.flatten(2).transpose(1, 2)
    return x


def _gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x[b, keep_idx[b]] in the memory layout x already has.

    An NCHW conv output flattened by PatchEmbed is a transposed view ([B,N,D] with the
    token axis innermost). timm's dense path keeps that layout all the way to the head
    when no prefix token is concatenated, and the 'avg' pool's reduction order depends on
    it; gathering in the same layout keeps keep-all equal to model(x) bit for bit.
    """
    b, n, d = x.shape
    if n > 1 and d > 1 and x.stride(1) == 1 and x.stride(2) == n:
        xt = x.transpose(1, 2)  # contiguous [B, D, N]
        return torch.gather(xt, 2, keep_idx.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)
    return torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, d))


def _pos_embed_sparse(m: VisionTransformer, x: torch.Tensor,
                      keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """timm's ``_pos_embed`` with the patch rows of pos_embed gathered at ``keep_idx``."""
    to_cat = []
    if m.cls_token is not None:
        to_cat.append(m.cls_token.expand(x.shape[0], -1, -1))
    if m.reg_token is not None:
        to_cat.append(m.reg_token.expand(x.shape[0], -1, -1))

    pos_embed = m.pos_embed
    if keep_idx is not None:
        d = x.shape[-1]
        x = _gather_tokens(x, keep_idx)
        # Patch rows start after the prefix rows only when the prefix tokens have rows.
        first = 0 if m.no_embed_class else m.num_prefix_tokens
        patch_pos = pos_embed[:, first:].expand(x.shape[0], -1, -1)
        pos = torch.gather(patch_pos, 1, keep_idx.unsqueeze(-1).expand(-1, -1, d))
        if not m.no_embed_class and first:
            pos = torch.cat([pos_embed[:, :first].expand(x.shape[0], -1, -1), pos], dim=1)
        pos_embed = pos

    # Same order of add and concat as timm: it decides which values get summed, and
    # keeping it makes the all-tokens case bitwise equal to model(x).
    if m.no_embed_class:
        x = x + pos_embed
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + pos_embed
    return m.pos_drop(x)


def sparse_forward_features(model: nn.Module, images: torch.Tensor,
                            keep_idx: Optional[torch.Tensor] = None, *,
                            validate: bool = True) -> torch.Tensor:
    """Pre-head tokens [B, num_prefix + k, D] of ``model`` run on the kept patches only.

    ``keep_idx`` [B, k]: integer raster indices into the model's patch grid, strictly
    increasing per row; ``None`` keeps every token (dense). ``validate=False`` skips the
    value checks (range, order), which cost a device sync on CUDA.
    """
    m = check_model(model)
    _check_images(m, images)
    gh, gw = _grid(m)
    if keep_idx is not None:
        keep_idx = _check_keep_idx(keep_idx, images.shape[0], gh * gw, validate)
        keep_idx = keep_idx.to(images.device)

    x = _embed_tokens(m, images)
    x = _pos_embed_sparse(m, x, keep_idx)
    x = m.patch_drop(x)
    x = m.norm_pre(x)
    if m.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(m.blocks, x)
    else:
        x = m.blocks(x)
    return m.norm(x)


def sparse_forward(model: nn.Module, images: torch.Tensor,
                   keep_idx: Optional[torch.Tensor] = None, *,
                   validate: bool = True) -> torch.Tensor:
    """Logits of ``model`` on the kept patches: forward_features on S tokens, then
    timm's own ``forward_head`` (so 'token', 'avg', 'avgmax', 'max' pooling behave as in
    timm; 'avg' pools exactly the kept tokens)."""
    x = sparse_forward_features(model, images, keep_idx, validate=validate)
    return unwrap_model(model).forward_head(x)


def dense_equivalent_mask(keep_idx: torch.Tensor, n: int, num_prefix: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, 1, num_prefix + n] (True = may be attended to) under
    which timm's dense ``forward_features(x, attn_mask=...)`` gives the prefix and kept
    tokens exactly the outputs of the sparse forward: dropped tokens are hidden as keys.

    SDPA semantics (timm passes it to ``F.scaled_dot_product_attention``; its non-fused
    path turns False into -inf). Dropped tokens still attend as queries (so no softmax row
    is empty), and their outputs must be ignored.
    """
    keep_idx = keep_idx.long()
    mask = torch.zeros(keep_idx.shape[0], num_prefix + n, dtype=torch.bool,
                       device=keep_idx.device)
    mask[:, :num_prefix] = True
    mask.scatter_(1, keep_idx + num_prefix, True)
    return mask[:, None, None, :]
