"""`dynatrain --task segment`: train a method's dense features + a linear head on the masks of
a `--data voc-seg` dataset, evaluate mIoU.

Each step: the batch's images (and Dyna-ViT's kept patches) → ``forward_dense`` of the run's
method (its parameter matched to Dyna-ViT's MACs at --k like classification's, the head's
1×1 conv not counted) → ``SegHead`` → per-pixel cross-entropy ignoring 255 (+ SViT's ratio
loss). The masks are read by key from the image shards (masks.py). Evaluation accumulates
one confusion matrix over the val split: IoU per class and mIoU (metrics.py).

A smaller loop than classification's on purpose: one process, AdamW at a constant --lr, no
flips or crops (a mask would have to follow them), no resume. Writes OUT/config.json,
metrics.jsonl (one line per epoch), summary.json (mIoU, per-class IoU, MACs) and best.pt
(the plain timm state_dict, the method's heads, the segmentation head).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynavit.manifests import write_json_atomic
from dynavit.trainer.config import ConfigError, TrainConfig, check_config
from dynavit.trainer.data import build_loader, normalize
from dynavit.trainer.methods.dense import forward_dense
from dynavit.trainer.methods.macs import MacCounter
from dynavit.trainer.model import budget_record, build_model, make_heads
from dynavit.trainer.runtime import resolve_device, seed_everything
from dynavit.trainer.segment.head import SegHead
from dynavit.trainer.segment.masks import MaskError, MaskReader
from dynavit.trainer.segment.metrics import IGNORE, confusion, iou_per_class, mean_iou

__all__ = ["SEG_METHODS", "train_segment", "evaluate_segment"]

SEG_METHODS = ("dynavit", "svit", "tome", "evit", "dynamicvit", "tnt", "cropr")


class _Masks:
    """Masks of a loader's batches, by key."""

    def __init__(self, loader, size_hw):
        self.reader, self.size = MaskReader(loader.table), tuple(size_hw)
        self.where = {k: i for i, k in enumerate(loader.table.keys)}

    def __call__(self, keys, device) -> torch.Tensor:
        arr = np.stack([self.reader.read(self.where[k], self.size) for k in keys])
        return torch.from_numpy(arr).long().to(device)


def _step_loss(cfg, vit, heads, seg, param, batch, masks, info, device):
    x = normalize(batch.images.to(device), info.mean, info.std)
    keep = batch.keep_idx.to(device) if cfg.method == "dynavit" and batch.keep_idx is not None else None
    grid, aux = forward_dense(vit, x, cfg.method, param, heads, keep, preserve=cfg.preserve, training=True)
    loss = F.cross_entropy(seg(grid, x.shape[-2:]), masks(batch.keys, device), ignore_index=IGNORE)
    if cfg.method == "svit":
        from dynavit.trainer.methods.svit import RATIO_LAMBDA, svit_ratio_loss
        loss = loss + RATIO_LAMBDA * svit_ratio_loss(aux, [param ** s for s in aux["stages"]])
    return loss


@torch.no_grad()
def evaluate_segment(cfg, vit, heads, seg, param, loader, masks, info, device) -> dict[str, Any]:
    """{'miou', 'iou' (per class, None where undefined), 'confusion', 'pixel_acc',
    'measured_macs' (mean MACs per image the forward really did, macs.MacCounter; the head's
    not counted), SViT: 'kept_share'} on ``loader``."""
    vit.eval(), seg.eval()
    if heads is not None:
        heads.eval()
    n = len(info.classes)
    conf = torch.zeros(n, n, dtype=torch.long)
    shares = _KeptShares(vit, heads) if cfg.method == "svit" else None
    macs = images = 0
    for batch in loader:
        x = normalize(batch.images.to(device), info.mean, info.std)
        keep = batch.keep_idx.to(device) if cfg.method == "dynavit" and batch.keep_idx is not None else None
        with MacCounter() as mc:  # the MACs this forward really did on these images (SViT's vary)
            grid = forward_dense(vit, x, cfg.method, param, heads, keep, preserve=cfg.preserve)
        macs, images = macs + mc.total, images + x.shape[0]
        if shares is not None:
            shares.add(x.shape[0] * (vit.patch_embed.num_patches + vit.num_prefix_tokens))
        pred = seg(grid, x.shape[-2:]).argmax(1)
        conf += confusion(pred, masks(batch.keys, device), n)
    iou = iou_per_class(conf.numpy())
    total = int(conf.sum())
    extra = {"measured_macs": macs / images if images else float("nan")}
    if shares is not None:
        extra["kept_share"] = shares.close()
    return {"miou": mean_iou(conf.numpy()), "iou": [None if math.isnan(v) else float(v) for v in iou],
            "confusion": conf.tolist(), "pixel_acc": float(conf.diag().sum()) / total if total else float("nan"),
            **extra}


class _KeptShares:
    """SViT's realised rate: the share of tokens (prefix included) each selected block really
    processed over an evaluation, from the sequence lengths entering it (its inference runs
    each image's kept tokens through the block, or the whole batch when all are kept)."""

    def __init__(self, vit, heads):
        self.seen = {layer: [0, 0] for layer in heads.layers}
        self.hooks = [vit.blocks[layer - 1].norm1.register_forward_pre_hook(self._hook(layer))
                      for layer in heads.layers]
        self.total = 0

    def _hook(self, layer):
        def hook(_mod, args):
            self.seen[layer][0] += args[0].shape[0] * args[0].shape[1]
        return hook

    def add(self, tokens: int) -> None:
        for v in self.seen.values():
            v[1] += tokens

    def close(self) -> list[float]:
        for h in self.hooks:
            h.remove()
        return [a / b if b else float("nan") for a, b in self.seen.values()]


def _loaders(cfg, checked, info):
    common = dict(scorer=cfg.scorer or info.scorers[0], batch_size=cfg.batch_size, workers=cfg.workers,
                  seed=cfg.seed, flip=False, skip_bad_samples=cfg.skip_bad_samples)
    train = build_loader(cfg.shards, "train", train=True, selection=checked.train, **common)
    val = build_loader(cfg.shards, checked.val_split, train=False, selection=checked.eval, **common)
    for loader in (train, val):
        if tuple(loader.input_size) != tuple(info.image_size):
            raise ConfigError(f"--task segment trains on the whole stored image ({info.image_size}); "
                              f"--input-size crops would have to crop the masks too", "--input-size")
    return train, val


def _check(cfg: TrainConfig, info, train_loader) -> None:
    if cfg.method not in SEG_METHODS:
        raise ConfigError(f"--task segment: no dense features for --method {cfg.method}", "--method")
    try:
        train_loader_mask = MaskReader(train_loader.table)
        train_loader_mask.read(0, info.image_size)
        train_loader_mask.close()
    except MaskError as e:
        raise ConfigError(f"--task segment needs masks: {e}", "--shards") from None


def _save(out: Path, name: str, vit, heads, seg) -> None:
    torch.save({"model": vit.state_dict(), "method_state": None if heads is None else heads.state_dict(),
                "seg_head": seg.state_dict()}, out / name)


def _svit_targets(cfg, heads, param) -> dict:
    if cfg.method != "svit":
        return {}
    from dynavit.trainer.methods.svit import svit_targets
    return {"kept_share_targets": svit_targets(heads, param)}


def train_segment(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train and evaluate; returns the summary (also written to OUT/summary.json)."""
    checked = check_config(cfg)
    info, device = checked.info, resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_loader, val_loader = _loaders(cfg, checked, info)
    _check(cfg, info, train_loader)
    vit = build_model(cfg, info, tuple(info.image_size), log).to(device)
    heads = make_heads(vit, cfg.method, len(info.classes))
    heads = heads.to(device) if heads is not None else None
    k = checked.train.k if cfg.method == "dynavit" else cfg.k
    budget = budget_record(vit, cfg.method, k, heads)
    param = budget["param"]
    seg = SegHead(vit.embed_dim, len(info.classes)).to(device)
    params = [*vit.parameters(), *seg.parameters(), *([] if heads is None else heads.parameters())]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {**cfg.to_dict(), "budget": budget})
    masks_tr, masks_val = _Masks(train_loader, info.image_size), _Masks(val_loader, info.image_size)
    log(f"dynatrain segment: {cfg.model} on {info.dataset} · {cfg.method} {budget['described']} · "
        f"{len(info.classes)} classes · {train_loader.steps} steps/epoch · {device} → {out}")
    best, history, t0 = -1.0, [], time.time()
    for epoch in range(cfg.epochs):
        vit.train(), seg.train()
        if heads is not None:
            heads.train()
        train_loader.set_epoch(epoch)
        losses = []
        for batch in train_loader:
            loss = _step_loss(cfg, vit, heads, seg, param, batch, masks_tr, info, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        val = evaluate_segment(cfg, vit, heads, seg, param, val_loader, masks_val, info, device)
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "step_losses": losses,
               "miou": val["miou"], "pixel_acc": val["pixel_acc"], "iou": val["iou"],
               "measured_macs": val["measured_macs"],
               **({"kept_share": val["kept_share"]} if "kept_share" in val else {})}
        history.append(rec)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f} mIoU {100 * val['miou']:.2f}%")
        if val["miou"] > best:
            best = val["miou"]
            _save(out, "best.pt", vit, heads, seg)
            best_val = val
    summary = {"task": "segment", "method": cfg.method, "k": k, "method_param": budget["described"],
               "macs": budget["macs"], "dynavit_macs": budget["dynavit_macs"], "preserve": cfg.preserve,
               "classes": list(info.classes), "best_miou": best, "best": best_val,
               "final_miou": history[-1]["miou"], **_svit_targets(cfg, heads, param), "train_loss": [h["train_loss"] for h in history],
               "seconds": time.time() - t0}
    write_json_atomic(out / "summary.json", summary)
    return summary
