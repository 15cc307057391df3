"""Adaptive K rules (trainer/adaptive_k.py) against a plain-Python reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dynavit.manifests import k_count
from dynavit.trainer.adaptive_k import (adaptive_keep, calibrate_budget, keep_indices, mass_counts,
                                        parse_k_rule, rule_counts)


def ref_mass_count(scores, tau, lo, hi):
    """One image, written as the definition reads: walk the patches from the highest score
    (ties: lower raster index first) until the running mass reaches tau of the total."""
    s = [float(v) for v in np.asarray(scores, dtype=np.float64).reshape(-1)]
    order = sorted(range(len(s)), key=lambda j: (-s[j], j))
    total = math.fsum(s)
    if total == 0:
        return lo
    run, k = 0.0, 0
    for j in order:
        run += s[j]
        k += 1
        if run >= tau * total * (1 - 1e-12):
            break
    return min(max(k, lo), hi)


def test_mass_counts_match_reference():
    rng = np.random.default_rng(0)
    s = rng.gamma(0.5, size=(200, 7, 7)).astype(np.float16)  # stored dtype, skewed mass
    s[3] = 0  # a flat image keeps the floor
    s[4, 2:, :] = 0
    for tau in (0.1, 0.5, 0.9, 1.0):
        got = mass_counts(s, tau, 3, 40)
        want = [ref_mass_count(x, tau, 3, 40) for x in s]
        assert got.tolist() == want, tau
    assert mass_counts(s, 0.5, 3, 40)[3] == 3


def test_keep_indices_rank_ties_to_lower_index():
    s = np.array([[1, 3, 3], [0, 3, 2]], dtype=np.float16)
    assert keep_indices(s, 3).tolist() == [1, 2, 4]  # the three 3s
    assert keep_indices(s, 4).tolist() == [1, 2, 4, 5]


def test_adaptive_keep_is_the_top_of_the_mass_count():
    rng = np.random.default_rng(1)
    s = rng.random((5, 5))
    rule = parse_k_rule("mass:0.5,floor=8,ceil=60")
    keep = adaptive_keep(rule, s)
    k = ref_mass_count(s, 0.5, k_count(8, 25), k_count(60, 25))
    assert len(keep) == k
    assert set(keep.tolist()) == set(np.argsort(-s.reshape(-1), kind="stable")[:k].tolist())


def test_budget_mean_is_closest_to_fixed_k():
    rng = np.random.default_rng(2)
    s = rng.gamma(0.7, size=(120, 6, 6))
    rule, mean = calibrate_budget(parse_k_rule("budget:25,floor=5,ceil=75"), s)
    target = k_count(25, 36)
    counts = rule_counts(rule, s)
    assert abs(counts.mean() - mean) < 1e-12
    # Closest achievable: brute force over every threshold where any image's count changes.
    frac = np.cumsum(-np.sort(-s.reshape(120, -1), axis=1), axis=1)
    frac = frac / frac[:, -1:]
    cand = np.unique(np.concatenate([frac.reshape(-1), frac.reshape(-1) + 1e-12]))
    best = min(abs(mass_counts(s, t, k_count(5, 36), k_count(75, 36)).mean() - target) for t in cand[cand <= 1])
    assert abs(mean - target) <= best + 1e-12
    assert abs(mean - target) < 0.05  # 120 images: steps of 1/120
    assert counts.min() >= k_count(5, 36) and counts.max() <= k_count(75, 36)
    assert counts.std() > 1  # adaptive: not all equal


@pytest.mark.parametrize("text", ["mass:0", "mass:1.5", "mass:x", "budget:0", "budget:25.5", "foo:1",
                                  "mass:0.5,floor=50,ceil=10", "budget:5,floor=10", "mass:0.5,top=3", "mass"])
def test_bad_rules_are_one_line_errors(text):
    with pytest.raises(ValueError) as e:
        parse_k_rule(text)
    assert "\n" not in str(e.value) and "--k-rule" in str(e.value)


def test_rule_text_round_trips():
    r = parse_k_rule("mass:0.85,ceil=90")
    assert parse_k_rule(r.text) == r
    b = parse_k_rule("budget:25")
    assert (b.floor, b.ceil, b.tau) == (1, 100, None)
    with pytest.raises(ValueError, match="not calibrated"):
        rule_counts(b, np.ones((1, 4, 4)))
