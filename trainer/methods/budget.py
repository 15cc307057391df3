"""Exact MACs of the ToMe / EViT baselines and budget matching against Dyna-ViT.

Counting is the same as ``flops.count_macs`` for the sparse forward: one forward runs under
our ``macs.MacCounter`` (formulas from shapes, identical on every device and torch version),
on the meta device when the model lives there (no weights, no time). Counted: every matmul (qkv, proj, MLP, head), the
patch-embed conv, attention (SDPA, or its bmm's on meta) and the methods' own matmuls:
ToMe's matching similarities (A·Bᵀ on head_dim-wide keys per merging block), EViT's explicit
CLS attention row (T·D per keep block). Not counted, as in every MAC table: norms, softmax,
GELU, adds, sorting, gathers, the weighted merges (elementwise).

Budget matching: for a Dyna-ViT keep percentage K, ``match_budget`` picks the constant ToMe r
and the EViT keep rate (grid of step 0.001, EViT's keep layers) whose exact MACs are closest
to ``flops.count_macs(model, K)``. Both MAC curves are monotone in their parameter (fewer
tokens in every block), so each is found by bisection over exact counts.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch.nn as nn

from dynavit.trainer.methods.evit import (check_evit_model, evit_forward, evit_keep_count,
                                  evit_token_counts, resolve_layers)
from dynavit.trainer.methods.flops import build_meta_model, count_macs_breakdown
from dynavit.trainer.methods.macs import count_on_zero_images
from dynavit.trainer.methods.tome import check_tome_model, tome_forward, tome_token_counts

__all__ = [
    "count_tome_macs",
    "count_evit_macs",
    "count_dynavit_macs",
    "closed_form_tome_macs",
    "closed_form_evit_macs",
    "match_tome_r",
    "match_evit_keep_rate",
    "match_budget",
    "match_budgets",
    "budget_table",
]

EVIT_STEP = 0.001


def _count(m: nn.Module, run, batch: int = 1) -> int:
    """MACs of ``run(m, images)`` on zero images of the model's size, where the model lives,
    in eval mode (restored after), without grad."""
    return count_on_zero_images(m, lambda images: run(m, images), batch=batch).total


def count_tome_macs(model: nn.Module, r, *, prop_attn: bool = True, batch: int = 1) -> int:
    """Exact MACs of one ``tome_forward`` with ``r`` (int or per-block list)."""
    m = check_tome_model(model)
    return _count(m, lambda mm, x: tome_forward(mm, x, r, prop_attn=prop_attn), batch)


def count_evit_macs(model: nn.Module, keep_rate: float, *,
                    layers: Optional[Sequence[int]] = None, fuse: bool = True,
                    batch: int = 1) -> int:
    """Exact MACs of one ``evit_forward`` at ``keep_rate``."""
    m = check_evit_model(model)
    return _count(m, lambda mm, x: evit_forward(mm, x, keep_rate, layers=layers, fuse=fuse),
                  batch)


def count_dynavit_macs(model: nn.Module, k_percent: int) -> dict:
    """{'macs', 'S'} of Dyna-ViT's sparse forward at K (flops.count_macs_breakdown)."""
    b = count_macs_breakdown(model, k_percent)
    return {"macs": b["total"], "S": b["S"]}


def _num_patches(m) -> int:
    gh, gw = m.patch_embed.grid_size
    return int(gh) * int(gw)


def _closest(target: float, a, b):
    """Of two (param, macs) pairs, the one nearer target (ties: the cheaper one)."""
    da, db = abs(a[1] - target), abs(b[1] - target)
    if da != db:
        return a if da < db else b
    return a if a[1] <= b[1] else b


# ---- closed forms: only steer the search; every reported figure is an exact count ---------

def _block_dims(m) -> tuple[int, int, int]:
    """(per-token MACs of qkv+proj(+gate), per-token MACs of the MLP, key width hd)."""
    blk = m.blocks[0]
    attn = blk.attn
    d, a = m.embed_dim, attn.attn_dim
    proj = d * 3 * a + a * attn.proj.out_features
    if getattr(attn, "gate", None) is not None:
        proj += d * a
    mlp = sum(mod.in_features * mod.out_features for mod in blk.mlp.modules()
              if isinstance(mod, nn.Linear))
    return proj, mlp, attn.head_dim


def closed_form_tome_macs(m, r, const: int = 0) -> int:
    """Block MACs of ToMe from the token counts (+ ``const`` for stem and head)."""
    proj, mlp, hd = _block_dims(m)
    a = m.blocks[0].attn.attn_dim
    p, depth = m.num_prefix_tokens, len(m.blocks)
    counts = tome_token_counts(p + _num_patches(m), r, depth, p)
    a0 = p + (p % 2)
    b0 = p + 1 - (p % 2)
    total = const
    for t, t_next in zip(counts[:-1], counts[1:]):
        total += t * proj + 2 * t * t * a + t_next * mlp
        if t_next < t:  # this block matched: A·Bᵀ over head_dim-wide keys
            total += len(range(a0, t, 2)) * len(range(b0, t, 2)) * hd
    return total


def closed_form_evit_macs(m, keep_rate: float, layers=None, fuse: bool = True,
                          const: int = 0) -> int:
    """Block MACs of EViT from the token counts (+ ``const`` for stem and head)."""
    proj, mlp, _ = _block_dims(m)
    a = m.blocks[0].attn.attn_dim
    p, depth, n = m.num_prefix_tokens, len(m.blocks), _num_patches(m)
    keep_at = set(resolve_layers(layers, depth))
    total, nb = const, n
    for i in range(depth):
        t = p + nb
        na = nb
        if i in keep_at and keep_rate < 1.0:
            keep = evit_keep_count(keep_rate, nb)
            if keep < nb:
                total += t * a  # the explicit CLS attention row
                na = keep + (1 if fuse else 0)
        total += t * proj + 2 * t * t * a + (p + na) * mlp
        nb = na
    return total


def _stem_head_macs(m, dense: Optional[int] = None) -> int:
    """Exact dense MACs minus the closed-form dense blocks: patch embed + head."""
    if dense is None:
        dense = count_dynavit_macs(m, 100)["macs"]
    return dense - closed_form_tome_macs(m, 0)


def _search(param_lo, param_hi, predict, exact, target, increasing: bool):
    """Closest exact MACs to target over integer params in [lo, hi], MACs monotone in the
    param: bisection on the closed form, then exact counts walk to the true bracket."""
    sign = 1 if increasing else -1

    def left(i, f):  # i lies before the crossing: f(i) on the parameter-low side of target
        return sign * (f(i) - target) < 0

    lo, hi = param_lo, param_hi
    if not left(lo, predict):
        hi = lo
    elif left(hi, predict):
        lo = hi
    else:
        while hi - lo > 1:  # invariant: left(lo), not left(hi)
            mid = (lo + hi) // 2
            if left(mid, predict):
                lo = mid
            else:
                hi = mid
    i = lo  # now walk with exact counts to the last parameter before the crossing
    while i > param_lo and not left(i, exact):
        i -= 1
    while i < param_hi and left(i + 1, exact):
        i += 1
    best = (i, exact(i))
    if i < param_hi:
        best = _closest(target, best, (i + 1, exact(i + 1)))
    return best


def match_tome_r(model: nn.Module, target_macs: float, *, prop_attn: bool = True,
                 _const: Optional[int] = None) -> tuple:
    """(r, macs): the constant per-block r whose exact ToMe MACs are closest to target."""
    m = check_tome_model(model)
    depth, p = len(m.blocks), m.num_prefix_tokens
    t0 = p + _num_patches(m)
    const = _stem_head_macs(m) if _const is None else _const
    cache: dict = {}

    def exact(r: int) -> int:
        key = tuple(tome_token_counts(t0, r, depth, p))  # MACs depend on the counts only
        if key not in cache:
            cache[key] = count_tome_macs(m, r, prop_attn=prop_attn)
        return cache[key]

    def predict(r: int) -> int:
        return closed_form_tome_macs(m, r, const)

    # MACs non-increasing in r; (t0 - p) // 2 merges the most a first block can.
    return _search(0, (t0 - p) // 2, predict, exact, target_macs, increasing=False)


def match_evit_keep_rate(model: nn.Module, target_macs: float, *,
                         layers: Optional[Sequence[int]] = None, fuse: bool = True,
                         step: float = EVIT_STEP, _const: Optional[int] = None) -> tuple:
    """(keep_rate, macs): the keep rate on a grid of ``step`` in (0, 1] whose exact EViT
    MACs are closest to target (the smallest grid point with those MACs)."""
    m = check_evit_model(model)
    depth, n = len(m.blocks), _num_patches(m)
    resolve_layers(layers, depth)  # validate once, with its own message
    steps = int(round(1.0 / step))
    if steps < 1 or not math.isclose(steps * step, 1.0):
        raise ValueError(f"step must divide 1, got {step}")
    const = _stem_head_macs(m) if _const is None else _const
    cache: dict = {}

    def rate(i: int) -> float:
        return round(i / steps, 9)

    def exact(i: int) -> int:
        key = tuple(evit_token_counts(n, rate(i), depth, layers, fuse))
        if key not in cache:
            cache[key] = count_evit_macs(m, rate(i), layers=layers, fuse=fuse)
        return cache[key]

    def predict(i: int) -> int:
        return closed_form_evit_macs(m, rate(i), layers, fuse, const)

    i, macs = _search(1, steps, predict, exact, target_macs, increasing=True)
    while i > 1 and tuple(evit_token_counts(n, rate(i - 1), depth, layers, fuse)) == \
            tuple(evit_token_counts(n, rate(i), depth, layers, fuse)):
        i -= 1  # same schedule, same MACs: report the smallest such keep rate
    return rate(i), macs


def match_budgets(model_name: Union[str, nn.Module], ks: Iterable[int],
                  model_kwargs: Optional[dict] = None, *, evit_layers=None,
                  evit_fuse: bool = True, prop_attn: bool = True) -> list[dict]:
    """``match_budget`` for several K on one model (built and counted dense once)."""
    if isinstance(model_name, str):
        model = build_meta_model(model_name, **(model_kwargs or {}))
        name = model_name
    else:
        if model_kwargs:
            raise ValueError("model_kwargs only apply when model_name is a timm name")
        model, name = model_name, type(model_name).__name__
    m = check_tome_model(model)
    layers = [i + 1 for i in resolve_layers(evit_layers, len(m.blocks))]
    dense = count_dynavit_macs(m, 100)["macs"]
    const = _stem_head_macs(m, dense)
    out = []
    for k in ks:
        dyna = count_dynavit_macs(m, k)
        target = dyna["macs"]
        r, tome_macs = match_tome_r(m, target, prop_attn=prop_attn, _const=const)
        kr, evit_macs = match_evit_keep_rate(m, target, layers=evit_layers, fuse=evit_fuse,
                                             _const=const)
        # at_limit: the method cannot get that cheap (ToMe: r merges the most a first block
        # can; EViT: the blocks before its first keep layer stay dense)
        r_max = _num_patches(m) // 2
        out.append({
            "model": name, "K": int(k),
            "dense": {"macs": dense},
            "dynavit": {"K": int(k), "S": dyna["S"], "macs": target},
            "tome": {"r": r, "macs": tome_macs, "rel": (tome_macs - target) / target,
                     "at_limit": r == r_max and tome_macs > target},
            "evit": {"keep_rate": kr, "layers": layers, "fuse": evit_fuse, "macs": evit_macs,
                     "rel": (evit_macs - target) / target,
                     "at_limit": kr <= EVIT_STEP and evit_macs > target},
        })
    return out


def match_budget(model_name: Union[str, nn.Module], k: int,
                 model_kwargs: Optional[dict] = None, *, evit_layers=None,
                 evit_fuse: bool = True, prop_attn: bool = True) -> dict:
    """ToMe r and EViT keep rate whose exact MACs are closest to Dyna-ViT's at K.

    ``model_name``: a timm name (built on the meta device with ``model_kwargs``; no weights)
    or a model. Returns {'model', 'K', 'dense': {macs}, 'dynavit': {K, S, macs},
    'tome': {r, macs, rel, at_limit}, 'evit': {keep_rate, layers, fuse, macs, rel, at_limit}}
    with rel the relative MAC difference to Dyna-ViT ((method − dynavit) / dynavit) and
    at_limit True when the method cannot get as cheap as Dyna-ViT at K. The MACs are exact
    counts of each method's forward (macs.MacCounter), batch 1.
    """
    return match_budgets(model_name, [k], model_kwargs, evit_layers=evit_layers,
                         evit_fuse=evit_fuse, prop_attn=prop_attn)[0]


def budget_table(results: Iterable[dict]) -> str:
    """Printable table of ``match_budget`` results (one block of rows per K)."""
    lines = [f"{'model':<24} {'K':>4} {'method':<8} {'parameter':<22} {'GMACs':>8} "
             f"{'vs dense':>9} {'vs dynavit':>11}"]
    for res in results:
        dense, target = res["dense"]["macs"], res["dynavit"]["macs"]
        ev = res["evit"]
        rows = [
            ("dense", "K=100", dense, False),
            ("dynavit", f"K={res['K']} (S={res['dynavit']['S']})", target, False),
            ("tome", f"r={res['tome']['r']}", res["tome"]["macs"], res["tome"]["at_limit"]),
            ("evit", f"keep={ev['keep_rate']:g} @{','.join(map(str, ev['layers']))}"
             + ("" if ev["fuse"] else " drop"), ev["macs"], ev["at_limit"]),
        ]
        for method, param, macs, limit in rows:
            lines.append(f"{res['model']:<24} {res['K']:>4} {method:<8} {param:<22} "
                         f"{macs / 1e9:8.3f} {macs / dense:8.1%} {(macs - target) / target:+10.2%}"
                         + ("  (limit: cannot go lower)" if limit else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dynavit.trainer.methods.budget [model] [K,K,...]
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
    ks = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "70,50").split(",")]
    print(budget_table(match_budgets(name, ks)))
