"""Shared by the golden tests and by the scripts that recorded their fixtures: a small timm
ViT with weights drawn from a seed, images drawn from a seed, and per-block token counts.

Weights are filled here, not by timm's initialisers, so that the same seed gives the same
model whatever timm version builds it (the authors' code and ours build different module
trees over the same parameter names). Norm weights are 1 + noise, every other tensor
noise scaled by 1/sqrt(fan_in): activations stay O(1), attention is far from uniform, and the
methods' choices (which tokens merge, drop, fuse) are not decided by float ties.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).parent


def seeded_(model: nn.Module, seed: int, names=None) -> nn.Module:
    """Fill ``model``'s parameters (sorted by name; ``names`` maps our names to the ones
    drawn, for a module tree that names them differently) from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    order = sorted(params) if names is None else sorted(names)
    with torch.no_grad():
        for key in order:
            p = params[key if names is None else names[key]]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in key) and key.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif key in ("cls_token", "pos_embed", "reg_token", "dist_token"):
                p.copy_(0.5 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
    return model


def images(seed: int, batch: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def count_tokens(blocks) -> tuple[list[int], callable]:
    """Record the sequence length entering each block (a pre-hook on its ``norm1``, which
    timm's, ours and the authors' blocks all call first). Returns (counts, remove)."""
    counts: list[int] = []
    hooks = [b.norm1.register_forward_pre_hook(lambda mod, args: counts.append(args[0].shape[1]))
             for b in blocks]

    def remove():
        for h in hooks:
            h.remove()
    return counts, remove


def load(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def save(name: str, record: dict) -> None:
    (HERE / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
