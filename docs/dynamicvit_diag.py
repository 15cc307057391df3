"""Where a DynamicViT run loses accuracy: its predictors' ranking, or the budget itself.

    python docs/dynamicvit_diag.py RUN [RHO]

RUN is a `dynatrain --method dynamicvit` run (its best.pt: backbone and predictors) or a dense
run (its best.pt with freshly initialised predictors, the fine-tune's start; pass RHO). On the
run's validation split it reports top-1 of

- infer: DynamicViT's inference (top-k of the predictors' keep scores, int(N·rho^s) patches);
- random: the same inference with uniform random scores instead (the same kept counts);
- dense: the backbone with every patch;
- train-argmax / train-gumbel: the training path (masked attention, nothing removed) with the
  predictors' decisions taken by argmax or sampled as in training (Gumbel, tau 1);

and the share of patches each stage keeps on the training path (targets rho^s). Figures in
docs/BASELINES.md ("DynamicViT on the compare-demo model").
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.trainer.methods import dynamicvit as D
from dynavit.trainer.infer import evaluate as E
from dynavit.trainer.methods.tokens import stem
from dynavit.trainer.config import TrainConfig
from dynavit.trainer.methods.learned import policy_block
from dynavit.trainer.rundir import Checkpoint, RunInfo
from dynavit.trainer.runtime import to_device


def load(run: Path):
    meta = RunInfo.read(run)
    cfg = dataclasses.replace(TrainConfig.from_dict(meta.config), pretrained=False, checkpoint=None)
    dataset, info = E._open_run_dataset(run, meta, cfg, None)
    sel, _ = E._selection(info, cfg, dataset, 100, info.scorers[0], True)  # every patch
    ckpt = Checkpoint.load(run / "best.pt")
    vit, sel = E._rebuild_model(run, run / "best.pt", cfg, info, sel, ckpt, torch.device("cpu"))
    heads = D.DynamicViTHeads.for_model(vit)
    if ckpt.method_state:
        heads.load_state_dict(ckpt.method_state)
    loader = E._labelled_loader(dataset, "val", sel, info.scorers[0], info, cfg, 64, 0, run)
    budget = json.loads((run / "config.json").read_text())["run"].get("budget", {})
    return vit, heads.eval(), loader, info, budget.get("param") if budget.get("method") == "dynamicvit" else None


def train_path(vit, heads, images, decide):
    """(logits, kept share per stage) of the training forward with ``decide(log-probs)`` as
    the hard keep decisions."""
    P = vit.num_prefix_tokens
    x = stem(vit, images)
    B, N = x.shape[0], x.shape[1] - P
    stages = D._stages(vit, heads)
    policy = prev = None
    shares = []
    for i, blk in enumerate(vit.blocks):
        x = blk(x) if policy is None else policy_block(blk, x, policy)
        if i in stages:
            prev = x.new_ones(B, N, 1) if prev is None else prev
            hard = decide(heads.predictors[stages[i]](x[:, P:], prev)) * prev
            shares.append(hard.mean().item())
            policy, prev = torch.cat([x.new_ones(B, P, 1), hard], 1), hard
    return vit.forward_head(vit.norm(x)), shares


class RandomScores(nn.Module):
    """A predictor stand-in: uniform random keep scores (log-prob-like pair)."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.gen = gen

    def forward(self, x, policy=None):
        s = torch.rand(x.shape[:2] + (1,), generator=self.gen)
        return torch.cat([s, -s], -1)


def main(run: Path, rho: float | None) -> None:
    vit, heads, loader, info, recorded = load(run)
    rho = rho if rho is not None else recorded
    if rho is None:
        raise SystemExit("pass RHO for a run that is not a dynamicvit run")
    gen = torch.Generator().manual_seed(0)
    rand_heads = D.DynamicViTHeads.for_model(vit)
    rand_heads.predictors = nn.ModuleList(RandomScores(gen) for _ in heads.predictors)
    argmax = (lambda p: (p[..., :1] > p[..., 1:]).float())
    gumbel = (lambda p: F.gumbel_softmax(p, hard=True)[..., :1])
    hits = dict.fromkeys(("infer", "random", "dense", "train-argmax", "train-gumbel"), 0)
    shares: dict[str, list] = {"train-argmax": [], "train-gumbel": []}
    n = 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for batch in loader:
            images, _, labels = to_device(batch, torch.device("cpu"), info.mean, info.std)
            hits["infer"] += (D.dynamicvit_forward(vit, heads, images, rho).argmax(1) == labels).sum().item()
            hits["random"] += (D.dynamicvit_forward(vit, rand_heads, images, rho).argmax(1) == labels).sum().item()
            hits["dense"] += (vit(images).argmax(1) == labels).sum().item()
            for name, decide in (("train-argmax", argmax), ("train-gumbel", gumbel)):
                logits, s = train_path(vit, heads, images, decide)
                hits[name] += (logits.argmax(1) == labels).sum().item()
                shares[name].append(s)
            n += len(labels)
    gh, gw = vit.patch_embed.grid_size
    counts = D.dynamicvit_keep_counts(int(gh) * int(gw), rho, len(heads.layers))
    print(f"{run}: rho={rho}, stages after blocks {list(heads.layers)} keep {counts} of {gh * gw} patches "
          f"(targets {[round(rho ** s, 3) for s in range(1, len(counts) + 1)]}); {n} val images")
    for name, h in hits.items():
        print(f"  {name:13s} top-1 {100 * h / n:.1f} %")
    for name, rows in shares.items():
        print(f"  kept share per stage, {name}: {[round(sum(c) / len(c), 3) for c in zip(*rows)]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else None)
