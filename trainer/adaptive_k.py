"""Adaptive K: how many patches each image keeps, from its stored patch scores.

The paper fixes K at inference and names "adaptive K under accuracy/latency budgets" as
future work. Two rules, both computed from `{key}.scores.npy` (float16 [Gh, Gw], FORMAT.md),
so no re-indexing is needed:

- ``mass:τ``   (0 < τ ≤ 1): the fewest patches whose score mass reaches τ of the image's
               total; the patches are the top-ranked ones (score descending, ties to the
               lower raster index, as pipeline/topk.py ranks).
- ``budget:K`` (1 ≤ K ≤ 100): ``mass:τ*`` with the τ* whose mean kept count over a split's
               images is closest to the fixed-K count k_count(K, N) (the smaller τ on a tie),
               so an adaptive run and a fixed-K run keep the same mean number of tokens.
               τ* is calibrated on the split being read (scores are inputs, not labels) and
               recorded, so `predict` can apply the same τ* to new images.

Both take a floor and a ceiling in percent of the window's N patches:
``mass:0.9,floor=10,ceil=90``; defaults floor=1 (one patch: k_count's minimum), ceil=100.
A flat image (total score 0) keeps the floor.

Why mass and not a score threshold: the scorers' scales differ (l2 ≥ 0 unbounded, contrast
≤ 0.5), and a share of the image's own total means the same for each. Scores are read as
float64 from the stored float16, so the ranking can differ from the stored k{K}.npy (made
from float32 scores) where rounding makes two scores equal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dynavit.manifests import k_count

__all__ = ["KRule", "parse_k_rule", "mass_counts", "rule_counts", "keep_indices", "calibrate_budget",
           "bounds", "adaptive_keep"]

RULES = ("mass", "budget")
_PART = re.compile(r"^(floor|ceil)=(\d+)$")


@dataclass(frozen=True)
class KRule:
    kind: str                 # mass | budget
    value: float              # τ for mass, K (percent) for budget
    floor: int = 1            # percent of N, at least one patch (k_count)
    ceil: int = 100           # percent of N
    tau: float | None = None  # budget: the calibrated τ*; mass: value

    @property
    def text(self) -> str:
        """The rule as written on the command line (without the calibrated τ)."""
        v = f"{self.value:g}" if self.kind == "mass" else str(int(self.value))
        return f"{self.kind}:{v},floor={self.floor},ceil={self.ceil}"

    def with_tau(self, tau: float) -> "KRule":
        return KRule(self.kind, self.value, self.floor, self.ceil, float(tau))


def parse_k_rule(text: str) -> KRule:
    """`mass:τ[,floor=F][,ceil=C]` or `budget:K[,...]`; a one-line ValueError otherwise."""
    head, *parts = str(text).strip().split(",")
    kind, sep, value = head.partition(":")
    if kind not in RULES or not sep:
        raise ValueError(f"--k-rule {text!r}: expected mass:TAU or budget:K (e.g. mass:0.9, budget:25,floor=5)")
    opts = {"floor": 1, "ceil": 100}
    for p in parts:
        m = _PART.match(p.strip())
        if not m:
            raise ValueError(f"--k-rule {text!r}: unknown part {p!r} (floor=PERCENT, ceil=PERCENT)")
        opts[m.group(1)] = int(m.group(2))
    if not 1 <= opts["floor"] <= opts["ceil"] <= 100:
        raise ValueError(f"--k-rule {text!r}: need 1 <= floor <= ceil <= 100 (percent of the patches)")
    if kind == "mass":
        try:
            tau = float(value)
        except ValueError:
            tau = float("nan")
        if not 0 < tau <= 1:
            raise ValueError(f"--k-rule {text!r}: the mass share τ must be in (0, 1]")
        return KRule("mass", tau, opts["floor"], opts["ceil"], tau)
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise ValueError(f"--k-rule {text!r}: the budget K must be an integer percent in 1..100")
    k = int(value)
    if not opts["floor"] <= k <= opts["ceil"]:
        raise ValueError(f"--k-rule {text!r}: the budget K={k} must lie between floor and ceil")
    return KRule("budget", k, opts["floor"], opts["ceil"])


def bounds(rule: KRule, n: int) -> tuple[int, int]:
    """(fewest, most) patches an image of n patches may keep."""
    return k_count(rule.floor, n), k_count(rule.ceil, n)


def _flat(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 3:
        s = s.reshape(s.shape[0], -1)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape [B,Gh,Gw] or [B,N], got {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("scores must be finite and >= 0 for a mass rule")
    return s


def _mass_fractions(s: np.ndarray) -> np.ndarray:
    """[B, N]: cumulative share of the total mass of the j+1 top-ranked patches (0 where the
    total is 0). The last column is exactly 1 (the same sum)."""
    ranked = -np.sort(-s, axis=1, kind="stable")
    cum = np.cumsum(ranked, axis=1)
    total = cum[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, cum / np.where(total > 0, total, 1.0), 0.0)


def _counts_from_fractions(frac: np.ndarray, tau: float, lo: int, hi: int) -> np.ndarray:
    flat = frac[:, -1] == 0
    k = (frac < tau).sum(axis=1) + 1
    k = np.minimum(k, frac.shape[1])
    k[flat] = lo
    return np.clip(k, lo, hi).astype(np.int64)


def mass_counts(scores, tau: float, lo: int = 1, hi: int | None = None) -> np.ndarray:
    """Kept count per image [B]: fewest top-ranked patches with mass ≥ τ·total, in [lo, hi]."""
    s = _flat(scores)
    return _counts_from_fractions(_mass_fractions(s), float(tau), lo, s.shape[1] if hi is None else hi)


def rule_counts(rule: KRule, scores) -> np.ndarray:
    """Kept count per image for a rule whose τ is known (mass, or a calibrated budget)."""
    if rule.tau is None:
        raise ValueError(f"k-rule {rule.text}: the budget's τ is not calibrated yet (calibrate_budget)")
    s = _flat(scores)
    lo, hi = bounds(rule, s.shape[1])
    return mass_counts(s, rule.tau, lo, hi)


def keep_indices(scores_2d, k: int) -> np.ndarray:
    """The k top-ranked raster indices of one image's scores, ascending (int64)."""
    s = np.asarray(scores_2d, dtype=np.float64).reshape(-1)
    return np.sort(np.argsort(-s, kind="stable")[:int(k)]).astype(np.int64)


def adaptive_keep(rule: KRule, scores_2d) -> np.ndarray:
    """One image's kept raster indices under `rule` (its τ known), ascending."""
    return keep_indices(scores_2d, int(rule_counts(rule, np.asarray(scores_2d)[None])[0]))


def calibrate_budget(rule: KRule, scores, iters: int = 60) -> tuple[KRule, float]:
    """(rule with τ*, the mean kept count at τ*) for a budget rule over a split's scores
    [n, Gh, Gw] or [n, N]: τ* makes the mean count closest to k_count(K, N); the mean count is
    a nondecreasing step function of τ, so a bisection finds the step that crosses the target."""
    if rule.kind != "budget":
        return rule, float(rule_counts(rule, scores).mean())
    s = _flat(scores)
    n = s.shape[1]
    lo, hi = bounds(rule, n)
    target = k_count(int(rule.value), n)
    frac = _mass_fractions(s)

    def mean_at(t: float) -> float:
        return float(_counts_from_fractions(frac, t, lo, hi).mean())

    a, b = 0.0, 1.0  # mean_at(a) <= target region grows with τ
    if mean_at(b) <= target:
        return rule.with_tau(b), mean_at(b)
    for _ in range(iters):  # invariant: mean_at(b) > target
        mid = (a + b) / 2
        if mean_at(mid) > target:
            b = mid
        else:
            a = mid
    best = min((abs(mean_at(t) - target), t) for t in (a, b))[1]
    return rule.with_tau(best), mean_at(best)


def kept_summary(vit, rule: KRule, kept, keys=None) -> dict:
    """What an evaluation records for an adaptive rule: the rule and its τ, the mean kept
    count, the mean GMACs per image (each image's own sparse-forward MACs, exact closed form
    of methods/packing.py), the histogram of counts and, with `keys`, each sample's count."""
    from dynavit.trainer.methods.packing import sample_macs
    kept = [int(c) for c in kept]
    if not kept:
        return {"k_rule": rule.text, "tau": rule.tau}
    values, freq = np.unique(kept, return_counts=True)
    out = {"k_rule": rule.text, "tau": rule.tau, "mean_kept": float(np.mean(kept)),
           "mean_gmacs": sample_macs(vit, kept) / len(kept) / 1e9,
           "kept_hist": {int(v): int(f) for v, f in zip(values, freq)}}
    if keys is not None:
        out["kept_per_sample"] = dict(zip(keys, kept))
    return out
