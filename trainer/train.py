"""dynatrain's training loop: read it top to bottom.

    check the arguments → model → loaders → optimizer/schedule → run dir (or resume)
    → for each epoch: train (sparse forward on the kept patches) → evaluate → log → checkpoint

Everything that can reject the arguments (config.py) runs before the run directory is
touched, so a bad command line leaves nothing behind.

Distributed: under `torchrun` (WORLD_SIZE > 1) every rank builds its own loader slice (the
loader gives every rank the same number of steps); gradients are averaged by DDP; eval
counts and losses are summed with all_reduce; only rank 0 writes files and prints.

Resume: last.pt holds model, optimizer, scheduler, scaler, epoch, best metric and the RNG
states of every rank; the loaders reseed from (seed, epoch), so a resumed run replays the
same batches as an uninterrupted one and ends on the same weights.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import platform
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
from timm.optim import param_groups_weight_decay
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dynavit.manifests import write_json_atomic

from . import recipe
from .augment import Augment, train_inputs
from .config import Checked, ConfigError, TrainConfig, check_config, teacher_weights
from .data import DataError, Loader, build_loader
from .mixing import Mixer
from .model import (SparseViT, budget_record, build_model, load_weights, make_heads, method_forward, teacher_outputs,
                    training_loss)
from .method_recipes import FROM_SCRATCH, Recipe, keep_rate_at, recipe_for, with_recipe_schedule
from .rundir import RUN_FILES, Checkpoint, EpochRecord, RunDirError, RunInfo, read_metrics, remove_stale_temp_files
from .runtime import Dist, autocast, init_distributed, resolve_amp, seed_everything, set_rng_state, to_device


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary. Raises
    ConfigError, before writing anything, on a bad argument."""
    ctx = init_distributed(cfg.device)
    try:
        return run(cfg, ctx)
    finally:
        if ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: TrainConfig, ctx: Dist) -> dict[str, Any]:
    log = (lambda msg: print(msg, flush=True)) if ctx.main else (lambda msg: None)
    checked = check_config(cfg)
    info, device = checked.info, ctx.device
    amp_dtype = resolve_amp(cfg.amp, device)
    out = Path(cfg.resume or cfg.out)

    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    seed_everything(cfg.seed)
    fresh: list[str] = []  # classifier keys --checkpoint could not load
    vit = build_model(cfg, info, checked.train.input_size, log, fresh).to(device)
    method_recipe = recipe_for(cfg.method, bool(cfg.checkpoint or cfg.pretrained))
    cfg, taken = with_recipe_schedule(cfg, method_recipe)
    if taken:
        log(f"{cfg.method}'s fine-tuning recipe: " + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in taken.items()))
    teacher = make_teacher(cfg, vit, method_recipe, fresh, log)  # before resume: the start weights
    sel = dataclasses.replace(checked.train, num_prefix=vit.num_prefix_tokens)
    eval_sel = dataclasses.replace(checked.eval, num_prefix=vit.num_prefix_tokens)
    budget_k = sel.k if cfg.method == "dynavit" else cfg.k  # in-encoder methods read every patch, at K's MACs
    heads = make_heads(vit, cfg.method, len(info.classes))  # a learned method's own parameters
    heads = heads.to(device) if heads is not None else None
    # Matched once, on a meta copy (device- and weight-independent), and recorded: compare and
    # the reports read this record back; a resumed run keeps the parameter it was trained with.
    budget = recorded_budget(out, cfg, budget_k, log) if cfg.resume else None
    budget = budget or budget_record(vit, cfg.method, budget_k, heads)
    param, described = budget["param"], budget["described"]
    model = wrap_model(SparseViT(vit, cfg.method, param, heads), cfg, ctx)
    mixer = Mixer.from_config(cfg, len(info.classes), info.patch_size, None if sel.dense else sel.k)
    train_loader, val_loader = make_loaders(cfg, ctx, checked, sel, eval_sel, with_scores=mixer is not None)
    opt_steps = recipe.optimizer_steps(cfg, train_loader.steps)  # per epoch, with --accum-steps
    optimizer, scheduler, scaler = make_optimizer(cfg, vit, heads, amp_dtype, device, opt_steps,
                                                  method_recipe, fresh)
    ema = recipe.make_ema(vit, heads, cfg)
    aug = Augment.from_config(cfg, info.patch_size)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_fn = partial(training_loss, cfg.method, param, criterion=criterion, ratio_weight=cfg.ratio_weight)

    start_epoch, best_acc1, best_epoch, history = 0, -1.0, 0, []
    if cfg.resume:
        start_epoch, best_acc1, best_epoch, history = resume(out, vit, heads, optimizer, scheduler, scaler, ctx, ema)
        log(f"resuming {out} after epoch {start_epoch} (best acc1 {best_acc1:.2f}% at epoch {best_epoch})")
    ctx.barrier()  # every rank has checked --out before rank 0 writes into it
    if ctx.main:
        start_run_dir(out, cfg, checked, ctx, amp_dtype, sel, eval_sel, train_loader.steps, vit, start_epoch, history,
                      budget)
    log(f"dynatrain: {cfg.model} on {info.dataset} · {cfg.method} {described} (S={sel.seq_len}) · eval K={eval_sel.k if cfg.method == 'dynavit' else budget_k} · "
        f"{train_loader.steps} steps/epoch × {ctx.world_size} rank(s) · {device} · amp {cfg.amp} → {out}")

    val: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, cfg, ctx, amp_dtype, epoch,
                                ema=ema, aug=aug, raw=(vit, heads), mixer=mixer, teacher=teacher,
                                param_at=keep_rate_at(method_recipe, param, cfg.epochs, train_loader.steps))
        val = evaluate(vit, val_loader, ctx, amp_dtype, len(info.classes), cfg.method, param, heads)
        ema_val = None if ema is None else evaluate(ema.vit, val_loader, ctx, amp_dtype, len(info.classes),
                                                    cfg.method, param, ema.heads)
        record = EpochRecord(
            epoch=epoch + 1, train_loss=stats["train_loss"], val_loss=val["val_loss"], acc1=val["acc1"],
            acc5=val["acc5"], epoch_seconds=time.perf_counter() - epoch_start, images_per_s=stats["images_per_s"],
            seq_len=sel.seq_len, eval_seq_len=eval_sel.seq_len, k=budget_k,
            eval_k=eval_sel.k if cfg.method == "dynavit" else budget_k, lr=stats["lr"],
            skipped=stats["skipped"], val_skipped=val["val_skipped"], steps=stats["steps"],
            steps_per_rank=stats["steps_per_rank"], train_images=stats["train_images"],
            val_images=val["val_images"], method=cfg.method, method_param=described,
            ema_acc1=None if ema_val is None else ema_val["acc1"])
        history.append(record)
        is_best = record.acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = record.acc1, epoch + 1
        rngs = ctx.gather_rng()
        if ctx.main:
            try:
                _save_epoch(out, record, epoch, best_acc1, best_epoch, cfg, info, vit, optimizer, scheduler, scaler,
                            rngs, heads, is_best, ema)
            except OSError as e:  # disk full, quota, a removed folder: one line, exit 1
                raise RunWriteError(f"cannot write the checkpoint of epoch {epoch + 1} in {out}: "
                                    f"{e.strerror or e}; last.pt holds the last epoch written, so free space and "
                                    f"--resume {out}") from None
            log(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {record.train_loss:.4f}  val_loss "
                f"{record.val_loss:.4f}  acc1 {record.acc1:.2f}%  acc5 {record.acc5:.2f}%  "
                + ("" if ema_val is None else f"ema_acc1 {ema_val['acc1']:.2f}%  ") +
                f"{record.images_per_s:.0f} img/s  {record.epoch_seconds:.1f}s")

    if not val:  # resumed a run that had already finished: report its last evaluation
        val = evaluate(vit, val_loader, ctx, amp_dtype, len(info.classes), cfg.method, param, heads)
    speeds = [m.images_per_s for m in history]
    summary = {"out": str(out), "epochs": len(history), "best_acc1": best_acc1, "best_epoch": best_epoch,
               "final_acc1": val["acc1"], "final_acc5": val["acc5"], "final_val_loss": val["val_loss"],
               "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0, "k": budget_k, "eval_k": eval_sel.k,
               "seq_len": sel.seq_len, "method": cfg.method, "method_param": described, "budget": budget,
               "per_class_acc1": dict(zip(info.classes, val["per_class_acc1"]))}
    if ctx.main:
        write_json_atomic(out / "summary.json", summary)
        log(f"done: best acc1 {best_acc1:.2f}% (epoch {best_epoch}) · {len(history)} epochs · "
            f"{summary['images_per_s']:.0f} img/s · {cfg.method} {described} S={sel.seq_len} → {out}")
    return summary


# --- set-up pieces, in the order run() uses them ------------------------------------------------

def wrap_model(model: nn.Module, cfg: TrainConfig, ctx: Dist) -> nn.Module:
    if cfg.compile:
        model = torch.compile(model)
    if ctx.world_size > 1:
        device = ctx.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def make_loaders(cfg: TrainConfig, ctx: Dist, checked: Checked, sel, eval_sel,
                 with_scores: bool = False) -> tuple[Loader, Loader]:
    def loader(split: str, selection, is_train: bool) -> Loader:
        return build_loader(cfg.shards, split, selection=selection, scorer=cfg.scorer, batch_size=cfg.batch_size,
                            workers=cfg.workers, train=is_train, seed=cfg.seed, rank=ctx.rank,
                            world_size=ctx.world_size, skip_bad_samples=cfg.skip_bad_samples,
                            hflip=cfg.hflip, vflip=cfg.vflip, with_scores=with_scores and is_train,
                            pin_memory=ctx.device.type == "cuda", recycle_buffers=True,
                            images_root=cfg.images_root, trust_urls=cfg.trust_dataset_urls)
    try:
        return loader("train", sel, True), loader(checked.val_split, eval_sel, False)
    except DataError as e:  # e.g. fewer samples than one step of world_size × batch_size
        raise ConfigError(str(e)) from None


def make_teacher(cfg: TrainConfig, vit: nn.Module, method_recipe: Recipe, fresh: list[str],
                 log: Callable[[str], None]) -> nn.Module | None:
    """The frozen dense teacher: --teacher PATH (same model, same classes), or with
    --teacher auto the start weights when the method's recipe distils and the classifier was
    loaded (a fresh classifier would teach noise). None otherwise."""
    if cfg.teacher == "none" or (cfg.teacher == "auto" and not method_recipe.teacher):
        return None
    teacher = copy.deepcopy(vit)
    if cfg.teacher == "auto":
        if fresh:
            log(f"note: {cfg.method}: no distillation (the start weights' classifier is fresh); "
                f"pass --teacher RUN|CKPT for a teacher trained on these classes")
            return None
    else:
        try:
            lost = load_weights(teacher, str(teacher_weights(cfg.teacher)), log)
        except ConfigError as e:
            raise ConfigError(str(e), "--teacher") from None
        if lost:
            raise ConfigError(f"--teacher {cfg.teacher}: its classifier does not fit this dataset's "
                              f"{len(vit.head.weight) if hasattr(vit.head, 'weight') else '?'} classes", "--teacher")
    return teacher.eval().requires_grad_(False)


def make_optimizer(cfg: TrainConfig, vit: nn.Module, heads: nn.Module | None, amp_dtype, device: torch.device,
                   steps_per_epoch: int, method_recipe: Recipe = FROM_SCRATCH, fresh: list[str] | tuple = ()):
    """AdamW with timm's grouping (no weight decay on biases, norms, pos_embed and the cls/reg
    tokens; a learned method's heads grouped alike), the per-step LR schedule, and a GradScaler
    that only fp16 enables. The method's recipe (method_recipes.py) may scale the backbone's rate
    (0: frozen), hold it during warm-up and leave parameters out; a fresh classifier always
    trains at --lr."""
    scale = method_recipe.backbone_lr_scale if cfg.backbone_lr_scale is None else cfg.backbone_lr_scale
    factor = lr_factor(cfg, steps_per_epoch)
    if scale == 1.0 and not method_recipe.untrained and not method_recipe.backbone_frozen_in_warmup:
        params = recipe.param_groups(vit, heads, cfg)  # with --layer-decay, each group's lr scaled
        lambdas = factor
    elif cfg.layer_decay is not None:
        raise ConfigError(f"--layer-decay and {cfg.method}'s fine-tuning recipe (backbone at {scale} x --lr"
                          f"{', fixed in warm-up' if method_recipe.backbone_frozen_in_warmup else ''}) both set the "
                          f"backbone's rates; pass --backbone-lr-scale 1 to use --layer-decay", "--layer-decay")
    else:
        params = param_groups_weight_decay(heads, cfg.weight_decay) if heads is not None else []
        for g in params:
            g["backbone"] = False
        nwd = vit.no_weight_decay()
        groups: dict[tuple[bool, bool], dict] = {}
        for name, p in vit.named_parameters():
            is_fresh = any(name.startswith(k.rsplit(".", 1)[0] + ".") or name == k for k in fresh)
            if name in method_recipe.untrained or (scale == 0 and not is_fresh):
                p.requires_grad_(False)  # no weight gradients to compute
                continue
            decay = not (p.ndim <= 1 or name.endswith(".bias") or name in nwd)
            g = groups.setdefault((is_fresh, decay), {
                "params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.lr * (1.0 if is_fresh else scale), "backbone": not is_fresh})
            g["params"].append(p)
        params += list(groups.values())
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if method_recipe.backbone_frozen_in_warmup else 0

        def held(step: int) -> float:  # the backbone stays fixed during warm-up (DynamicViT's fix_step)
            return 0.0 if step < warmup else factor(step)

        lambdas = [held if g["backbone"] else factor for g in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of --lr at optimizer step `step` (the schedule advances every step):
    linear warmup over --warmup-epochs, then `step` (×gamma every --step-epochs, as in the
    paper) or `cosine` (to 0 at the last step)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    step_size = cfg.step_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.sched == "step":
            return cfg.gamma ** (step // step_size)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def load_resume_checkpoint(out: Path) -> Checkpoint:
    """last.pt of the run being resumed; temp files of killed checkpoint writes go first."""
    remove_stale_temp_files(out, recursive=False)
    try:
        read_metrics(out, repair=True)  # a torn last line (killed mid-write) is dropped with a warning
        return Checkpoint.load(out / "last.pt")
    except RunDirError as e:
        raise ConfigError(str(e), "--resume") from None


def resume(out: Path, vit, heads, optimizer, scheduler, scaler, ctx: Dist, ema=None) -> tuple[int, float, int, list]:
    """Load last.pt into the model and optimizer state; (epoch, best acc1, best epoch, history)."""
    ckpt = load_resume_checkpoint(out)
    vit.load_state_dict(ckpt.model)
    if heads is not None:
        heads.load_state_dict(ckpt.method_state)
    if ema is not None:  # a run that had no EMA yet starts it from the resumed weights
        ema.load(ckpt.model_ema or ckpt.model, ckpt.method_ema or ckpt.method_state)
    try:
        optimizer.load_state_dict(ckpt.optimizer)
    except ValueError as e:  # other parameter groups: e.g. --layer-decay turned on or off
        raise ConfigError(f"{out / 'last.pt'}: its optimizer state does not fit these options' parameter groups "
                          f"({e}); resume with the run's own --layer-decay", "--resume") from None
    scheduler.load_state_dict(ckpt.scheduler)
    if ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)
    set_rng_state(ckpt.rng[ctx.rank] if len(ckpt.rng) == ctx.world_size else ckpt.rng[0])
    # Lines of epochs after the checkpoint (a crash between the two writes) are redone.
    history = [m for m in read_metrics(out) if m.epoch <= ckpt.epoch]
    return ckpt.epoch, ckpt.best_acc1, ckpt.best_epoch, history


def recorded_budget(out: Path, cfg: TrainConfig, k: int, log: Callable[[str], None]) -> dict | None:
    """The budget a run being resumed recorded at its start (None for a run that predates the
    record: it is matched again)."""
    try:
        budget = RunInfo.read(out).run.get("budget")
    except RunDirError:
        return None
    if not isinstance(budget, dict) or budget.get("method") != cfg.method or budget.get("k") != k:
        return None
    log(f"resume: {cfg.method} {budget.get('described')} as recorded in {out / 'config.json'}")
    return budget


class RunWriteError(RuntimeError):
    """The run folder cannot be written (disk full, ...): one line, exit 1."""


def _save_epoch(out: Path, record: EpochRecord, epoch: int, best_acc1: float, best_epoch: int, cfg: TrainConfig,
                info, vit, optimizer, scheduler, scaler, rngs, heads, is_best: bool, ema=None) -> None:
    """metrics.jsonl's line of the epoch, then its checkpoints (rank 0); the EMA weights, if
    any, beside the raw ones."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(record.line())
    ckpt = Checkpoint(epoch=epoch + 1, best_acc1=best_acc1, best_epoch=best_epoch, acc1=record.acc1,
                      model_name=cfg.model, config=cfg.to_dict(), classes=list(info.classes),
                      model=vit.state_dict(), optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                      method_state=None if heads is None else heads.state_dict(),
                      model_ema=None if ema is None else ema.state()[0],
                      method_ema=None if ema is None else ema.state()[1])
    write_checkpoints(out, ckpt, is_best)


def write_checkpoints(out: Path, ckpt: Checkpoint, is_best: bool) -> None:
    # best.pt first: once last.pt names an epoch, everything of that epoch is on disk.
    if is_best:  # weights only: best.pt is for evaluation and fine-tuning
        save_checkpoint(out / "best.pt", dataclasses.replace(ckpt, optimizer=None, scheduler=None, scaler=None,
                                                             rng=[]))
    save_checkpoint(out / "last.pt", ckpt)


def start_run_dir(out: Path, cfg: TrainConfig, checked: Checked, ctx: Dist, amp_dtype, sel, eval_sel,
                  steps: int, vit: nn.Module, start_epoch: int, history: list[EpochRecord],
                  budget: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for name in RUN_FILES:  # --overwrite replaces our files, never the user's others
            (out / name).unlink(missing_ok=True)
    info = checked.info
    RunInfo(config=cfg.to_dict(), dataset=dataset_summary(info, cfg), versions=versions(), run={
        "world_size": ctx.world_size, "device": str(ctx.device), "amp": str(amp_dtype),
        "val_split": checked.val_split, "input_size": list(sel.input_size), "seq_len": sel.seq_len,
        "eval_seq_len": eval_sel.seq_len, "steps_per_epoch": steps,
        "params": sum(p.numel() for p in vit.parameters()), "resumed_at_epoch": start_epoch,
        "budget": budget}).write(out)
    (out / "metrics.jsonl").write_text("".join(m.line() for m in history))


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    ckpt.save(path)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "numpy": np.__version__}
    for dist_name in ("dynavit", "webdataset"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            out[dist_name] = "unknown"
    return out


def dataset_summary(info, cfg: TrainConfig) -> dict[str, Any]:
    return {"path": str(Path(cfg.shards).resolve()), "dataset": info.dataset,
            "image_size": list(info.image_size), "patch_size": info.patch_size, "grid": list(info.grid),
            "num_classes": len(info.classes), "classes": list(info.classes),
            "splits": {name: dataclasses.asdict(c) for name, c in info.splits.items()},
            "ks": info.k_values(), "scorers": list(info.scorers),
            "mean": list(info.mean), "std": list(info.std)}


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
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            lr = max(g["lr"] for g in optimizer.param_groups)  # this step's peak rate, before the schedule moves
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(*raw)


        loss_sum += loss.detach().double() * labels.shape[0]
        seen, skipped, steps = seen + labels.shape[0], skipped + batch.skipped, steps + 1
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen * ctx.world_size / (time.perf_counter() - start):.0f}")
            bar.update()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    # Step counts of every rank: they must agree (a rank with extra steps would hang DDP).
    steps_per_rank = torch.zeros(ctx.world_size, dtype=torch.float64, device=device)
    steps_per_rank[ctx.rank] = steps
    totals = ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64),
                                         torch.tensor(float(skipped), device=device, dtype=torch.float64)]))
    ctx.all_reduce(steps_per_rank)
    images_total = int(totals[1].item())
    return {"train_loss": totals[0].item() / max(1, images_total), "train_images": images_total,
            "images_per_s": images_total / seconds if seconds > 0 else 0.0, "skipped": int(totals[2].item()),
            "steps": steps, "steps_per_rank": [int(s) for s in steps_per_rank.tolist()], "lr": lr}


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
