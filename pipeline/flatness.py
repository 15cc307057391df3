"""Is a scorer keeping flat patches? (issue 29; definitions in docs/FORMAT.md)

`l2`, the paper's score, is the energy of the ImageNet-normalised patch: a flat black or white
patch (background, letterbox bar, overexposed sky, a scan's margin) outranks a textured
mid-grey one, and top-K spends the budget on nothing. This module measures that, so that
`dynaprep index` and `dynaprep show` can say so:

- a patch is **flat** when its `contrast` score (the standard deviation of its pixel values
  over pixels and channels, per-channel means removed) is below FLAT_BELOW grey levels;
- for a scorer and K, the **kept share** is the fraction of the kept patches that are flat,
  summed over the measured images: Σ flat kept / Σ kept;
- the **random share** is what a uniformly random selection of the same size keeps on
  average: an image with f flat patches of N gives f/N per kept patch (exact expectation, no
  random draw), so the random share is Σ f / (images·N);
- a scorer **keeps flat patches** at K when kept share − random share ≥ MARGIN (the K where
  the excess is largest is reported); the better scorer named is, among the measured scorers
  that keep fewer flat patches at that K and stay under random share + MARGIN, an indexed one
  if there is one (the user can train with it at once), else the one with the lowest share.
  `contrast` keeps no flat patch by construction whenever an image has enough non-flat ones,
  so it is always a candidate; whether it trains better is what bench_scorers measures.

`dynaprep index` measures every scorer (also those not indexed, so that a better one can be
named) on a fixed sample of each split: the images whose content sha256 (the manifest's
`sha256`) read as a number is divisible by SAMPLE_EVERY, so the sample does not depend on
workers, pieces or resumes. The kept sets are the ones top-K writes (after `--pad-aware`).
"""
from __future__ import annotations

import numpy as np

FLAT_BELOW = 1.0      # grey levels (0..255): a patch's std below this is flat
MARGIN = 0.10         # kept share − random share that counts as "markedly more"
SAMPLE_EVERY = 8      # one image in 8 (by content hash) is measured

DEFINITION = {"flat_below": FLAT_BELOW, "margin": MARGIN, "sample": f"sha256 % {SAMPLE_EVERY} == 0",
              "random": "expected share of a uniform random selection of the same size"}


def sampled(sha256_hex: str) -> bool:
    return int(sha256_hex[:16], 16) % SAMPLE_EVERY == 0


def flat_mask(contrast: np.ndarray) -> np.ndarray:
    """bool [B, N] from contrast scores [B, Gh, Gw] (units of the 0..255 range)."""
    return (np.asarray(contrast, np.float64) * 255.0 < FLAT_BELOW).reshape(len(contrast), -1)


def empty_counts() -> dict:
    return {"images": 0, "patches": 0, "flat": 0, "kept": {}, "kept_flat": {}}


def add_counts(acc: dict, flat: np.ndarray, kept: dict) -> None:
    """Add a batch: flat bool [B, N]; kept {scorer: {K: int [B, k]}} (raster indices)."""
    b, n = flat.shape
    acc["images"] += int(b)
    acc["patches"] += int(b * n)
    acc["flat"] += int(flat.sum())
    rows = np.arange(b)[:, None]
    for scorer, by_k in kept.items():
        for k, idx in by_k.items():
            idx = np.asarray(idx, np.int64)
            key = str(int(k))
            acc["kept"].setdefault(scorer, {}).setdefault(key, 0)
            acc["kept_flat"].setdefault(scorer, {}).setdefault(key, 0)
            acc["kept"][scorer][key] += int(idx.size)
            acc["kept_flat"][scorer][key] += int(flat[rows, idx].sum())


def merge_counts(parts) -> dict:
    """Sum count dicts (pieces of a unit, units of a split)."""
    out = empty_counts()
    for p in parts:
        for name in ("images", "patches", "flat"):
            out[name] += int(p[name])
        for field in ("kept", "kept_flat"):
            for scorer, by_k in p[field].items():
                for k, v in by_k.items():
                    out[field].setdefault(scorer, {}).setdefault(k, 0)
                    out[field][scorer][k] += int(v)
    return out


def summarize(counts: dict, scorers) -> dict:
    """One split's figures for dataset.json: counts, shares and the warnings for `scorers`
    (the indexed ones)."""
    random = counts["flat"] / counts["patches"] if counts["patches"] else None
    shares = {s: {k: (counts["kept_flat"][s][k] / v if v else None) for k, v in by_k.items()}
              for s, by_k in counts["kept"].items()}
    return {**counts, "random": random, "kept_share": shares,
            "warnings": warnings_for(shares, random, scorers)}


def _order_k(keys):
    return sorted(keys, key=int, reverse=True)


def warnings_for(shares: dict, random, scorers) -> list[dict]:
    """The (scorer, K) pairs of `scorers` that keep markedly more flat patches than random,
    worst K per scorer, each with the better measured scorer (or None)."""
    if random is None:
        return []
    out = []
    for s in scorers:
        by_k = shares.get(s, {})
        excess = {k: v - random for k, v in by_k.items() if v is not None}
        bad = [k for k in _order_k(excess) if excess[k] >= MARGIN]
        if not bad:
            continue
        k = max(bad, key=lambda kk: excess[kk])
        # Scorers that keep fewer flat patches and no more than random + MARGIN; one already
        # indexed first (the user can train with it now), then the lowest share.
        candidates = {o: v[k] for o, v in shares.items() if o != s and v.get(k) is not None
                      and v[k] < shares[s][k] and v[k] - random < MARGIN}
        better = min(candidates, key=lambda o: (o not in scorers, candidates[o], o)) if candidates else None
        out.append({"scorer": s, "k": int(k), "kept": shares[s][k], "random": random, "better": better,
                    "better_kept": candidates[better] if better else None, "better_indexed": better in scorers})
    return out


def warning_lines(split: str, warnings: list[dict], where: str = "") -> list[str]:
    """Human sentences for the summary (one per warned scorer)."""
    lines = []
    for w in warnings:
        if w["better"]:
            how = "train with" if w.get("better_indexed") else "index with"
            advice = f"{w['better']} keeps {100 * w['better_kept']:.0f} %: {how} --scorer {w['better']}"
        else:
            advice = "no measured scorer does better; see --pad-aware and docs/FORMAT.md"
        lines.append(f"{split}: {w['scorer']} keeps {100 * w['kept']:.0f} % flat patches at K={w['k']} where a "
                     f"random selection keeps {100 * w['random']:.0f} %{where}; {advice}")
    return lines
