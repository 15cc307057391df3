"""Whether a method's matched budget sits at the limit of its parameter.

Each method has a cheapest setting (ToMe: the most merges a first block can make, r = N // 2;
EViT, DynamicViT, TNT: the smallest keep rate of their grid; Token Cropr: r = N − 1). On a
shallow model that setting can still cost more than Dyna-ViT at K (EViT keeps the blocks
before its first keep layer dense), and the matcher then returns it, above the target. Such a
row is not at equal compute, and `dynatrain flops` and `dynatrain compare` say so
("limit: cannot go lower") instead of letting it pass as matched.

A row above the target whose parameter is *not* at its limit is only the grid's granularity
(ToMe's integer r): the next cheaper setting lands further below the target.
"""
from __future__ import annotations

from torch import nn

LIMIT_NOTE = "limit: cannot go lower"


def cheapest_param(vit: nn.Module, method: str):
    """The method's cheapest parameter on ``vit`` (None for Dyna-ViT, whose K is exact)."""
    from dynavit.trainer.methods.budget import EVIT_STEP
    from dynavit.trainer.methods.dynamicvit import RHO_STEP
    from dynavit.trainer.methods.svit import RHO_STEP as SVIT_RHO_STEP
    from dynavit.trainer.methods.tnt import KEEP_STEP

    gh, gw = vit.patch_embed.grid_size
    n = int(gh) * int(gw)
    return {"tome": n // 2, "evit": EVIT_STEP, "dynamicvit": RHO_STEP, "svit": SVIT_RHO_STEP, "tnt": KEEP_STEP,
            "cropr": n - 1}.get(method)


def at_limit(vit: nn.Module, method: str, k: int, macs: int, target: int,
             heads: nn.Module | None = None) -> bool:
    """True when ``macs`` (the matched parameter's) is above ``target`` and the method's
    cheapest parameter costs no less: the budget cannot be reached on this model."""
    from dynavit.trainer.methods.counts import method_macs

    if method == "dynavit" or macs <= target:
        return False
    cheapest = cheapest_param(vit, method)
    if cheapest is None:  # a method added without its floor here: say so, not guess
        raise ValueError(f"budget_limit.cheapest_param does not know {method!r}")
    return method_macs(vit, method, k, cheapest, heads) >= macs
