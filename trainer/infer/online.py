"""Online Dyna-ViT (docs/ONLINE.md): score, select and run the sparse forward in one module.

``DynaViT(model, k=70, scorer="l2")`` wraps an **unmodified** timm VisionTransformer and has
no parameters (and no persistent buffers) of its own. ``forward(x)`` takes the normalized
float batch [B,3,H,W] that timm expects, scores every patch on x's device with the §5
definitions (``dynavit.trainer.infer.scoring``), keeps the top-K % patches in raster order and
returns ``sparse_forward(vit, x, keep_idx)``. At K=100 it is ``vit(x)``.

Scores from the normalized input:

- ``l2`` is computed on x itself: x *is* z = (p/255 − mean)/std when the module's mean/std
  are the ones the images were normalized with (float rounding of the caller's
  normalization, ~1e-7 relative, is the only difference from scoring the uint8 pixels).
- ``sobel`` and ``entropy`` need pixels: x is un-normalized with the module's mean/std,
  p = round((x·std + mean)·255) clamped to 0..255. For float32 inputs made from uint8 images
  the error before rounding is ~1e-4, so the rounding recovers the uint8 pixels exactly and
  the scores equal the Numba kernels' (entropy bit for bit). Half-precision inputs cannot
  carry the pixels exactly, so their scores are approximate; pass mean/std that match the
  normalization you use (ImageNet by default, as ``dynaprep``'s default). The module's own
  constants (mean, std, the float64 c·log2(c) table) keep their dtypes under ``.half()`` /
  ``.to(dtype)``; entropy needs float64 on the device (not available on MPS).

State dict: the ViT is registered as ``self.vit`` (so ``.to()``, ``.eval()``, hooks and
``parameters()`` work as usual; named_parameters() show a ``vit.`` prefix), and two state-dict
hooks strip / re-add that prefix, so ``DynaViT(...).state_dict()`` has exactly the plain timm
keys and loads into a plain timm model with ``strict=True``, and a plain timm state_dict
(e.g. ``dynatrain``'s checkpoints) loads into a DynaViT with ``strict=True``. Keys that
already carry ``vit.`` load too. This also holds when the DynaViT sits inside a larger module
(its prefix is handled).

``round_to`` rounds the sequence length up to a multiple (see ``scoring.keep_count``).
``torch.compile`` and ``torch.export.export`` (fixed K, fixed image size) work: the selection
has static shapes and the online path skips the value checks of ``sparse_forward`` (its
indices are valid by construction). Explicit ``keep_idx`` are validated unless
``validate=False`` (validation reads values: a host sync, and a graph break under compile).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dynavit.trainer.infer.scoring import (IMAGENET_MEAN, IMAGENET_STD, SCORERS, clog_table, keep_count,
                                     l2_of_normalized, score, score_entropy, score_sobel, to_pixels,
                                     topk_indices)
from dynavit.trainer.methods.sparse import check_model, num_patches, sparse_forward
from dynavit.trainer.methods.packing import packed_forward

__all__ = ["DynaViT"]

_PREFIX = "vit."


def _strip_vit_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: '<prefix>vit.x' -> '<prefix>x' (order kept)."""
    full = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(full)]:
        state_dict[prefix + key[len(full):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == prefix + "vit" or k.startswith(full)]:
            value = meta.pop(key)
            new = prefix + key[len(full):] if key.startswith(full) else prefix[:-1]
            meta[new] = value


def _add_vit_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: '<prefix>x' -> '<prefix>vit.x' unless already prefixed."""
    full = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(full)]:
        state_dict[full + key[len(prefix):]] = state_dict.pop(key)


class DynaViT(nn.Module):
    """Saliency token pruning in front of an unmodified timm ViT, computed online."""

    def __init__(self, model: nn.Module, k: int = 70, scorer: str = "l2", mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, round_to: Optional[int] = None, validate: bool = True, k_rule=None):
        super().__init__()
        vit = check_model(model)  # unwraps DDP / torch.compile, refuses unsupported ViTs
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; valid scorers: {', '.join(SCORERS)}")
        ph, pw = (int(v) for v in vit.patch_embed.patch_size)
        if ph != pw:
            raise ValueError(f"scores need square patches, the model has {ph}x{pw}")
        n = num_patches(vit)
        self.keep = keep_count(k, n, round_to, int(vit.num_prefix_tokens))  # validates k, round_to
        self.vit = vit
        self.scorer = scorer
        self.k = int(k)
        self.patch = ph
        self.n = n
        self.num_prefix = int(vit.num_prefix_tokens)
        self.round_to = round_to
        self.validate = bool(validate)
        # Adaptive K (trainer/adaptive_k.py, a KRule with its τ known): each image keeps its
        # own count, the samples run packed (methods/packing.py); `k` is then unused.
        if k_rule is not None and getattr(k_rule, "tau", None) is None:
            raise ValueError("k_rule must be a KRule whose τ is known (mass:τ, or a calibrated budget)")
        self.k_rule = k_rule
        self.last_counts: Optional[torch.Tensor] = None  # kept counts of the last adaptive forward
        mean_t = torch.tensor([float(v) for v in torch.as_tensor(mean).reshape(-1)])
        std_t = torch.tensor([float(v) for v in torch.as_tensor(std).reshape(-1)])
        if mean_t.shape != (3,) or std_t.shape != (3,) or not torch.isfinite(mean_t).all() \
                or not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ValueError(f"mean/std must be 3 finite numbers each, std > 0; got {mean!r}, {std!r}")
        # Constants as non-persistent buffers (they follow .to(device); the state_dict stays
        # the plain timm one). _apply keeps their dtypes, so model.half() cannot round them.
        self._exact = {"mean": mean_t, "std": std_t, "clog": clog_table(ph * ph)}
        for name, value in self._exact.items():
            self.register_buffer(name, value.clone(), persistent=False)
        self.register_state_dict_post_hook(_strip_vit_prefix)
        self.register_load_state_dict_pre_hook(_add_vit_prefix)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name, exact in self._exact.items():
            buf = self._buffers[name]
            if buf.dtype != exact.dtype:
                self._buffers[name] = exact.to(buf.device)
        return self

    @property
    def seq_len(self) -> int:
        """Tokens per image in the encoder: prefix tokens + kept patches."""
        return self.num_prefix + self.keep

    def extra_repr(self) -> str:
        if self.k_rule is not None:
            return f"k_rule={self.k_rule.text!r}, tau={self.k_rule.tau:g}, scorer={self.scorer!r}, n={self.n}"
        return (f"k={self.k}, scorer={self.scorer!r}, keep={self.keep}/{self.n}, "
                f"seq_len={self.seq_len}, round_to={self.round_to}")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [B, Gh, Gw] patch scores of the normalized batch x."""
        if self.scorer == "l2":
            return l2_of_normalized(x, self.patch)
        pixels = to_pixels(x, self.mean, self.std)
        if self.scorer == "sobel":
            return score_sobel(pixels, self.patch)
        if self.scorer in ("contrast", "distinct"):
            return score(pixels, self.patch, self.scorer)
        return score_entropy(pixels, self.patch, self.clog)

    def keep_indices(self, x: torch.Tensor) -> torch.Tensor:
        """int64 [B, keep] kept raster indices, ascending."""
        return topk_indices(self.scores(x), self.k, self.round_to, self.num_prefix)

    def forward(self, x: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if keep_idx is not None:
            return sparse_forward(self.vit, x, keep_idx, validate=self.validate)
        if self.k_rule is not None:
            from dynavit.trainer.infer.adaptive import adaptive_keep
            keep, counts = adaptive_keep(self.scores(x), self.k_rule)
            self.last_counts = counts
            return packed_forward(self.vit, x, keep, counts)
        if self.keep >= self.n:
            return self.vit(x)
        return sparse_forward(self.vit, x, self.keep_indices(x), validate=False)
