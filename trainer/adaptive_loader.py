"""Adaptive K in the shard loader: each sample's kept set from its stored scores.npy under a
--k-rule (adaptive_k.py), and a budget rule's τ* calibrated on the split being read.

Kept sets are chosen in the stored (unflipped) frame, on the sample's window of scores (the
whole grid, or the crop), then flipped with the image, like the fixed-K sets. Calibration
reads every sample's scores.npy once when the loader is built (one index-shard read per
sample, no image decode); scores are inputs, not labels, so calibrating on the evaluation
split is no peek at its answers, and it makes that split's mean kept count the budget's.
"""
from __future__ import annotations

import logging

import numpy as np

from dynavit.trainer.adaptive_k import KRule, adaptive_keep, calibrate_budget, parse_k_rule

log = logging.getLogger(__name__)

__all__ = ["nominal_selection", "resolve_rule", "sample_keep", "split_scores"]


def nominal_selection(info, rule: KRule, input_size=None, param: str = "--k-rule"):
    """The Selection of an adaptive run: saliency at a nominal K (the budget's K, else the
    rule's ceiling) that needs no indexed k{K}.npy: kept sets come from scores.npy. What
    each image keeps is the rule's; `kept`/`seq_len` of this selection are only nominal."""
    import dataclasses

    from dynavit.trainer.selection import resolve_selection
    nominal = int(rule.value) if rule.kind == "budget" else rule.ceil
    sel = resolve_selection(info, nominal, "random", input_size, param=param)  # random: any K resolves
    return dataclasses.replace(sel, mode="saliency")


def split_scores(reader, skip_bad: bool) -> np.ndarray:
    """[n, Wh, Ww] float64 scores of every readable sample's window (centred crop, as eval)."""
    t, sel = reader.table, reader.plan.selection
    (gh, gw), (wh, ww) = sel.grid, sel.window
    r0, c0 = (gh - wh) // 2, (gw - ww) // 2
    out = []
    for i in range(len(t)):
        try:
            s = reader._scores(i, t.shards[t.shard[i]], t.keys[i])
        except Exception:
            if not skip_bad:
                raise
            continue
        out.append(np.asarray(s, dtype=np.float64)[r0:r0 + wh, c0:c0 + ww])
    return np.stack(out) if out else np.zeros((0, wh, ww))


def resolve_rule(text_or_rule, reader, skip_bad: bool) -> tuple[KRule, float | None]:
    """(the rule with its τ known, the split's mean kept count when calibrated here)."""
    rule = parse_k_rule(text_or_rule) if isinstance(text_or_rule, str) else text_or_rule
    if rule.tau is not None:
        return rule, None
    scores = split_scores(reader, skip_bad)
    if not len(scores):
        raise ValueError("no readable scores.npy to calibrate the budget's τ on")
    rule, mean = calibrate_budget(rule, scores)
    log.info("k-rule %s: τ* = %.6f, mean kept %.3f over %d images", rule.text, rule.tau, mean, len(scores))
    return rule, mean


def sample_keep(reader, i: int, shard, key: str, r0: int, c0: int) -> np.ndarray:
    """One sample's kept raster indices (window frame, ascending) under the plan's rule."""
    sel = reader.plan.selection
    s = reader._scores(i, shard, key)[r0:r0 + sel.window[0], c0:c0 + sel.window[1]]
    return adaptive_keep(reader.plan.k_rule, s)


def eval_record(vit, loader) -> dict:
    """EpochRecord fields of an adaptive run's evaluation split (constant over epochs: the
    rule and its τ are fixed, eval has no random crop or flip): mean kept count, mean GMACs
    per image, histogram of counts. {} for a fixed-K loader."""
    rule = loader.plan.k_rule
    if rule is None:
        return {}
    from dynavit.trainer.adaptive_k import kept_summary, rule_counts
    s = kept_summary(vit, rule, rule_counts(rule, split_scores(loader.reader, loader.plan.skip_bad)))
    return {"eval_mean_kept": s["mean_kept"], "eval_mean_gmacs": s["mean_gmacs"], "eval_kept_hist": s["kept_hist"]}


def describe(train_loader, val_loader) -> str:
    """'mass:0.5,floor=1,ceil=100 τ=0.5' (a budget: τ* of the train and the eval split)."""
    t, v = train_loader.plan.k_rule, val_loader.plan.k_rule
    taus = f"τ={t.tau:.4g}" if t.tau == v.tau else f"τ*={t.tau:.4g} (train), {v.tau:.4g} (eval)"
    return f"{t.text} {taus}"
