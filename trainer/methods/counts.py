"""Exact MACs of one inference forward of any method at its parameter, its own heads
included (``macs.MacCounter``): the one dispatch over the methods that budget matching,
the at-limit check and compare count with."""
from __future__ import annotations

from torch import nn


def method_macs(model: nn.Module, method: str, k: int, param, heads: nn.Module | None = None) -> int:
    """Exact MACs (``macs.MacCounter``) of one inference forward of `method` at its parameter,
    its own heads included; Dyna-ViT: the sparse forward at K."""
    if method == "tome":
        from dynavit.trainer.methods.budget import count_tome_macs
        return count_tome_macs(model, param)
    if method == "evit":
        from dynavit.trainer.methods.budget import count_evit_macs
        return count_evit_macs(model, param)
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import count_dynamicvit_macs
        return count_dynamicvit_macs(model, heads, param)
    if method == "tnt":
        from dynavit.trainer.methods.tnt import count_tnt_macs
        return count_tnt_macs(model, heads, param)
    if method == "svit":  # expected MACs: every image at its targets
        from dynavit.trainer.methods.svit import count_svit_macs
        return count_svit_macs(model, heads, param)
    if method == "cropr":
        from dynavit.trainer.methods.cropr import count_cropr_macs
        return count_cropr_macs(model, heads, param)
    from dynavit.trainer.methods.flops import count_macs
    return count_macs(model, k)
