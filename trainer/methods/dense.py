"""Dense patch features [B, Gh, Gw, D] from every token-reduction method (dense tasks).

A pruning method ends with fewer tokens than the grid has positions; a segmentation or
detection head needs a value at every position. Each method fills the positions it did not
carry to the end by one rule (all maps are after the model's final norm):

- ``dynavit`` (``preserve=True``): a pruned patch keeps its *preserved* embedding, the patch
  embedding + its position row as the stem made it (SViT's "preserve" applied to pruning
  before the encoder); ``preserve=False``: pruned positions are 0 (the zero-padding SViT's
  paper compares against). Kept positions hold the encoder's output. One patch embedding
  serves both, so the MACs are the sparse forward's minus its classifier.
- ``svit``: nothing to do: its unselected tokens stay in the sequence (preserved).
- ``tome``: each merged token is copied back to every patch it contains, from ToMe's own
  ``source`` map (``trace_source=True``).
- ``evit``, ``dynamicvit``, ``tnt``, ``cropr``: a pruned position keeps its *last value*
  before pruning: the output of the last block it went through (EViT, which drops inside
  a block: its value after that block's attention). EViT's fused token belongs to no
  position and is left out. Their forwards are run unchanged; positions are followed with
  hooks (``_Tracker``) that recognise a kept token by exact value: these methods *copy*
  tokens (gather, concat), so a token entering block i+1 is bitwise the output of block i at
  its position. The map is that of their inference forward (the one with pruning).
- ``dense`` / K=100: the model's own ``forward_features`` patch tokens.

May import: torch, timm and the method modules of this package.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dynavit.trainer.methods.learned import gather_tokens
from dynavit.trainer.methods.sparse import _check_keep_idx as check_keep_idx
from dynavit.trainer.methods.sparse import check_model
from dynavit.trainer.methods.tokens import check_images, stem

__all__ = ["forward_dense", "DENSE_METHODS", "to_grid"]

DENSE_METHODS = ("dynavit", "svit", "tome", "evit", "dynamicvit", "tnt", "cropr")


def to_grid(m, patches: torch.Tensor) -> torch.Tensor:
    """[B, N, D] raster-order patch tokens → [B, Gh, Gw, D]."""
    gh, gw = (int(v) for v in m.patch_embed.grid_size)
    return patches.reshape(patches.shape[0], gh, gw, patches.shape[-1])


def _dynavit(m, images, keep_idx, preserve: bool) -> torch.Tensor:
    """One patch embedding for both: the stem's tokens are the preserved ones, and the kept
    ones gathered from them run through the blocks (the sparse forward's values: gathering
    commutes with the per-token add of the positions, norm_pre and eval-mode patch_drop)."""
    P = m.num_prefix_tokens
    x0 = stem(m, images)
    if keep_idx is None:
        return m.norm(m.blocks(x0))[:, P:]
    keep_idx = check_keep_idx(keep_idx, images.shape[0], x0.shape[1] - P, True).to(images.device)
    kept = m.blocks(torch.cat([x0[:, :P], gather_tokens(x0[:, P:], keep_idx)], dim=1))
    base = x0[:, P:] if preserve else torch.zeros_like(x0[:, P:])
    idx = keep_idx.unsqueeze(-1).expand(-1, -1, kept.shape[-1])
    patches = m.norm(base.scatter(1, idx, kept[:, P:]))
    if not preserve:  # the zero-padded map: pruned positions are 0 after the norm too
        on = torch.zeros(patches.shape[:2], dtype=patches.dtype, device=patches.device)
        patches = patches * on.scatter(1, keep_idx, 1.0).unsqueeze(-1)
    return patches


def _tome(m, images, r) -> torch.Tensor:
    from dynavit.trainer.methods.tome import tome_forward_features

    x, _, source = tome_forward_features(m, images, r, trace_source=True, return_state=True)
    if source is not None:  # source [B, T_out, T_in]: every input token is in one output
        owner = source.argmax(dim=1)
        x = x.gather(1, owner.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x[:, m.num_prefix_tokens:]


def _match(q: torch.Tensor, cands) -> torch.Tensor:
    """Position [B, T] of each row of q: that of a bitwise-equal row in ``cands`` (a list of
    (values [B, C, D], positions [B, C]); the first list entry wins); -1 where none is."""
    out = torch.full(q.shape[:2], -1, dtype=torch.long, device=q.device)
    for vals, pos in cands:
        for b in range(q.shape[0]):  # per image: [T, C, D] comparisons stay small
            eq = (q[b, :, None, :] == vals[b, None, :, :]).all(-1)
            hit = eq.any(-1) & (out[b] < 0)
            out[b] = torch.where(hit, pos[b][eq.to(torch.int8).argmax(-1)], out[b])
    return out


class _Tracker:
    """Follows the patch positions through a pruning forward of timm Blocks (see the module
    doc) and keeps ``last`` [B, N, D], each position's last pre-norm value."""

    def __init__(self, m, x0: torch.Tensor):
        P, B = m.num_prefix_tokens, x0.shape[0]
        n = x0.shape[1] - P
        self.m, self.P = m, P
        self.last = x0[:, P:].clone()
        self.grid_pos = torch.arange(n, device=x0.device).expand(B, n)
        self.prev = (x0, torch.cat([x0.new_full((B, P), -1, dtype=torch.long), self.grid_pos], 1))
        self.handles = []

    def _store(self, vals: torch.Tensor, pos: torch.Tensor) -> None:
        b, t = (pos >= 0).nonzero(as_tuple=True)
        self.last = self.last.index_put((b, pos[b, t]), vals[b, t])

    def _block_in(self, blk, x):
        self.cur = (x, _match(x, [self.prev, (self.last, self.grid_pos)]))

    def _post_attn(self, blk, out):
        x, pos = self.cur
        self.post = (x + blk.drop_path1(blk.ls1(blk.attn.proj_drop(out))), pos)
        self._store(*self.post)

    def _mid(self, blk, x):
        vals, pos = self.post
        same = x.shape == vals.shape and torch.equal(x, vals)
        self.mid = (x, pos if same else _match(x, [self.post]))

    def _block_out(self, blk, out):
        x, pos = self.mid
        self.prev = (x + blk.drop_path2(blk.ls2(out)), pos)
        self._store(*self.prev)

    def __enter__(self):
        for blk in self.m.blocks:
            self.handles += [
                blk.norm1.register_forward_pre_hook(lambda _m, a, b=blk: self._block_in(b, a[0])),
                blk.attn.proj.register_forward_hook(lambda _m, a, o, b=blk: self._post_attn(b, o)),
                blk.norm2.register_forward_pre_hook(lambda _m, a, b=blk: self._mid(b, a[0])),
                blk.mlp.register_forward_hook(lambda _m, a, o, b=blk: self._block_out(b, o)),
            ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _tracked(m, images, run) -> torch.Tensor:
    with _Tracker(m, stem(m, images)) as tr:
        run()
    return m.norm(tr.last)


def _pruning_run(m, images, method, param, heads):
    if method == "evit":
        from dynavit.trainer.methods.evit import evit_forward
        return lambda: evit_forward(m, images, param)
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import dynamicvit_forward
        return lambda: dynamicvit_forward(m, heads, images, param)
    if method == "tnt":
        from dynavit.trainer.methods.tnt import tnt_forward
        return lambda: tnt_forward(m, heads, images, param)
    from dynavit.trainer.methods.cropr import cropr_forward
    return lambda: cropr_forward(m, heads, images, param)


def forward_dense(model: nn.Module, images: torch.Tensor, method: str = "dynavit", param=None,
                  heads: Optional[nn.Module] = None, keep_idx: Optional[torch.Tensor] = None, *,
                  preserve: bool = True, training: bool = False):
    """Patch features [B, Gh, Gw, D] of ``method`` (rules in the module doc). ``keep_idx``:
    Dyna-ViT's kept patches (None: all); ``param``/``heads``: the method's parameter and
    learned module. ``training=True`` returns (features, aux): SViT's training forward and
    its aux for the ratio loss; the other methods run their inference forward (aux None)."""
    m = check_model(model)
    check_images(m, images)
    if method not in DENSE_METHODS:
        raise ValueError(f"forward_dense: unknown method {method!r}; choose from "
                         f"{', '.join(DENSE_METHODS)}")
    aux = None
    if method == "dynavit":
        patches = _dynavit(m, images, keep_idx, preserve)
    elif method == "svit":
        from dynavit.trainer.methods.svit import svit_forward
        out = svit_forward(m, heads, images, training=training, features=True)
        x, aux = out if training else (out, None)
        patches = x[:, m.num_prefix_tokens:]
    elif method == "tome":
        patches = _tome(m, images, param)
    else:
        patches = _tracked(m, images, _pruning_run(m, images, method, param, heads))
    grid = to_grid(m, patches)
    return (grid, aux) if training else grid
