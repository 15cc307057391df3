"""Adaptive-K runs (--k-rule) in `dynatrain compare`: their parameter, their mean MACs per
image and a batch of kept sets shaped like their evaluation's, read from what the run
recorded in metrics.jsonl (eval_mean_gmacs, eval_kept_hist; trainer/rundir.py).

GMACs of an adaptive run: the mean over the evaluation images of each image's own
sparse-forward MACs (the closed form of methods/packing.py, equal to our counter's count),
i.e. what the images cost unpacked. A fixed-K run at the same mean kept count costs a little
less: MACs are convex in the sequence length (the attention term).
"""
from __future__ import annotations

import numpy as np
import torch

from dynavit.trainer.methods.packing import RaggedKeep, sample_macs

__all__ = ["adaptive_parameter", "adaptive_keep_batch", "mean_sample_macs"]


def mean_sample_macs(model, counts) -> float:
    """Mean over images of each image's own sparse-forward MACs (kept counts `counts`)."""
    counts = [int(c) for c in counts]
    return sample_macs(model, counts) / len(counts)


def adaptive_parameter(rule_text: str, record: dict) -> tuple[str, float]:
    """(parameter text, MACs per image) of an adaptive run from its last epoch record."""
    gmacs = record.get("eval_mean_gmacs")
    if gmacs is None:
        raise ValueError(f"adaptive run ({rule_text}) without eval_mean_gmacs in metrics.jsonl")
    return f"{rule_text} (mean kept {record.get('eval_mean_kept', float('nan')):.1f})", float(gmacs) * 1e9


def adaptive_keep_batch(record: dict, batch: int, n: int, device) -> RaggedKeep:
    """A batch whose kept counts are evenly spaced quantiles of the recorded histogram, each
    a random ascending set (timing depends on the counts, not on which patches)."""
    hist = {int(k): int(v) for k, v in (record.get("eval_kept_hist") or {}).items()}
    counts = np.repeat(list(hist), list(hist.values())) if hist else np.array([n])
    counts = np.sort(counts)[np.linspace(0, len(counts) - 1, batch).round().astype(int)]
    gen = torch.Generator().manual_seed(0)
    keeps = [torch.randperm(n, generator=gen)[:int(c)].sort().values for c in counts]
    return RaggedKeep.from_list(keeps).to(device)
