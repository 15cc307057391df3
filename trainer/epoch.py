"""One epoch of training and one evaluation, as train.py's loop calls them: the sparse
forward on the kept patches, gradient accumulation, the non-finite-loss stop, and eval
counts summed over ranks."""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


from dynavit.trainer import recipe
from dynavit.trainer.augment import Augment, train_inputs
from dynavit.trainer.config import TrainConfig
from dynavit.trainer.data import Loader
from dynavit.trainer.mixing import Mixer
from dynavit.trainer.model import (method_forward, teacher_outputs)
from dynavit.trainer.runtime import Dist, autocast, to_device



# --- one epoch of training, one evaluation ------------------------------------------------------

NONFINITE_CHECK = 20  # steps between looks at the loss's finiteness


class NonFiniteLoss(RuntimeError):
    """Training diverged: one line, exit 1; no checkpoint of the diverged epoch is written."""


def train_one_epoch(model, loader: Loader, optimizer, scheduler, scaler, loss_fn, cfg: TrainConfig, ctx: Dist,
                    amp_dtype, epoch: int, ema=None, aug: Augment | None = None, raw=(None, None),
                    mixer: Mixer | None = None, teacher: nn.Module | None = None,
                    param_at: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """One epoch. --accum-steps A: the loss of each loader batch is divided by A and the
    gradients of A batches add up before one optimizer step (the mean over A·B samples, as
    one batch of A·B); the schedule and the EMA advance once per optimizer step.
    ``param_at(global step)``, if given, sets the method's parameter for each step (EViT's
    keep-rate warm-up); evaluation always uses the final one. ``teacher``: a frozen dense
    model whose outputs the method's loss distils from."""
    model.train()
    loader.set_epoch(epoch)  # reseeds the order and every per-sample draw
    device, mean, std = ctx.device, loader.info.mean, loader.info.std
    accum = cfg.accum_steps
    micro_total = recipe.optimizer_steps(cfg, loader.steps) * accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, skipped, steps, lr = 0, 0, 0, max(g["lr"] for g in optimizer.param_groups)
    bar = tqdm(total=micro_total, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
               disable=not ctx.main or not sys.stderr.isatty(), dynamic_ncols=True)
    start = time.perf_counter()
    # Non-finite losses are counted on the device and looked at every NONFINITE_CHECK steps
    # (a host sync per step would cost the GPU its lead); all ranks look at the same step.
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)
    method_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    method_model = getattr(method_model, "_orig_mod", method_model)  # under --compile
    for batch in recipe.epoch_batches(loader, micro_total):
        images, keep_idx, labels = train_inputs(batch, device, mean, std, aug, epoch)  # colour ops, if any
        if mixer is not None:  # labels become soft targets [B, C]
            images, keep_idx, labels = mixer(images, keep_idx, labels, batch.scores, batch.keys, epoch)
        if param_at is not None:
            method_model.param = param_at(epoch * loader.steps + steps)
        last = (steps + 1) % accum == 0
        # DDP all-reduces gradients on the last micro-batch of an accumulation only.
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp_dtype):
                # Index checks cost a device sync (and a graph break under --compile); the loader
                # has checked the stored indices, so one eager check per epoch is enough.
                out = model(images, keep_idx, validate=steps == 0 and not cfg.compile)
                loss = loss_fn(out, labels, teacher=teacher_outputs(teacher, images))  # the teacher sees every patch
            nonfinite += (~torch.isfinite(loss.detach())).double()
            if (steps + 1) % NONFINITE_CHECK == 0 or steps + 1 == micro_total:
                if ctx.all_reduce(nonfinite.clone()).item() > 0:
                    bar.close()
                    raise NonFiniteLoss(f"the training loss is not finite (NaN or inf) in epoch {epoch + 1}, by step "
                                        f"{steps + 1}; training stopped, and last.pt / best.pt are those of the last "
                                        f"finite epoch ({epoch}). Lower --lr, or set --clip-grad")
            if steps % accum == 0:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss / accum if accum > 1 else loss).backward()
        if last:
            lr = optimizer_step(model, optimizer, scheduler, scaler, cfg.clip_grad, ema, raw)
        loss_sum += loss.detach().double() * labels.shape[0]
        seen, skipped, steps = seen + labels.shape[0], skipped + batch.skipped, steps + 1
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen * ctx.world_size / (time.perf_counter() - start):.0f}")
            bar.update()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    return {**rank_totals(ctx, loss_sum, seen, skipped, steps, seconds), "lr": lr}


def optimizer_step(model, optimizer, scheduler, scaler, clip_grad: float | None, ema, raw) -> float:
    """One optimizer step after the gradients of an accumulation; returns the step's peak
    learning rate, read before the schedule moves."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    lr = max(g["lr"] for g in optimizer.param_groups)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if ema is not None:
        ema.update(*raw)
    return lr


def rank_totals(ctx: Dist, loss_sum: torch.Tensor, seen: int, skipped: int, steps: int, seconds: float) -> dict:
    """The epoch's figures summed over ranks, and every rank's step count: they must agree
    (a rank with extra steps would hang DDP)."""
    device = loss_sum.device
    steps_per_rank = torch.zeros(ctx.world_size, dtype=torch.float64, device=device)
    steps_per_rank[ctx.rank] = steps
    totals = ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64),
                                         torch.tensor(float(skipped), device=device, dtype=torch.float64)]))
    ctx.all_reduce(steps_per_rank)
    images_total = int(totals[1].item())
    return {"train_loss": totals[0].item() / max(1, images_total), "train_images": images_total,
            "images_per_s": images_total / seconds if seconds > 0 else 0.0, "skipped": int(totals[2].item()),
            "steps": steps, "steps_per_rank": [int(s) for s in steps_per_rank.tolist()]}


@torch.no_grad()
def evaluate(vit, loader: Loader, ctx: Dist, amp_dtype, num_classes: int, method: str = "dynavit",
             param=None, heads: nn.Module | None = None) -> dict[str, Any]:
    """Top-1 / top-min(5, C) accuracy (percent), mean CE loss and per-class top-1 over the
    split, each sample counted once across ranks. Runs on the bare ViT, not through DDP:
    per-rank eval step counts may differ and DDP's forward would then wait on collectives."""
    vit.eval()
    if heads is not None:
        heads.eval()
    device, top = ctx.device, min(5, num_classes)
    sums = torch.zeros(4 + 2 * num_classes, dtype=torch.float64, device=device)  # loss, top1, top5, skipped, per class
    for batch in loader:
        images, keep_idx, labels = to_device(batch, device, loader.info.mean, loader.info.std)
        with autocast(device, amp_dtype):
            logits = method_forward(vit, images, keep_idx, method, param, heads=heads)
        logits = logits.float()
        pred = logits.topk(top, dim=1).indices
        correct1 = (pred[:, 0] == labels).double()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += correct1.sum()
        sums[2] += (pred == labels[:, None]).any(dim=1).double().sum()
        sums[3] += batch.skipped
        sums[4:4 + num_classes].index_add_(0, labels, torch.ones_like(correct1))
        sums[4 + num_classes:].index_add_(0, labels, correct1)
    stats = ctx.all_reduce(sums).tolist()
    class_total, class_hits = stats[4:4 + num_classes], stats[4 + num_classes:]
    n = sum(class_total)
    return {"val_loss": stats[0] / n if n else float("nan"), "acc1": 100.0 * stats[1] / n if n else 0.0,
            "acc5": 100.0 * stats[2] / n if n else 0.0, "val_images": int(n), "val_skipped": int(stats[3]),
            "per_class_acc1": [100.0 * h / t if t else None for h, t in zip(class_hits, class_total)]}
