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
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
from timm.optim import param_groups_weight_decay
import torch
import torch.distributed as dist
import torch.nn as nn

from dynavit.manifests import write_json_atomic
from dynavit.pipeline.cli_types import plural

from dynavit.trainer import recipe
from dynavit.trainer.augment import Augment
from dynavit.trainer.config import Checked, ConfigError, TrainConfig, check_config, teacher_weights
from dynavit.trainer.data import DataError, Loader, TooFewSamples, build_loader
from dynavit.trainer.mixing import Mixer
from dynavit.trainer.model import (SparseViT, budget_record, build_model, load_weights, make_heads, training_loss)
from dynavit.trainer.methods.recipes import FROM_SCRATCH, Recipe, keep_rate_at, recipe_for, with_recipe_schedule
from dynavit.trainer.rundir import RUN_FILES, Checkpoint, EpochRecord, RunDirError, RunInfo, read_metrics, remove_stale_temp_files
from dynavit.trainer.epoch import evaluate, train_one_epoch
from dynavit.trainer.adaptive_loader import describe, eval_record
from dynavit.trainer.runtime import Dist, init_distributed, resolve_amp, seed_everything, set_rng_state


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
    cfg, method_recipe, teacher = method_setup(cfg, vit, fresh, log)
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
    adaptive = eval_record(vit, val_loader)  # --k-rule: the eval split's kept counts and mean MACs
    if adaptive:
        described = describe(train_loader, val_loader)
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
        if getattr(train_loader, "class_mix_line", None) and train_loader.class_mix_line():
            log(train_loader.class_mix_line())  # --stream: how mixed its batches were
        val = evaluate(vit, val_loader, ctx, amp_dtype, len(info.classes), cfg.method, param, heads)
        ema_val = None if ema is None else evaluate(ema.vit, val_loader, ctx, amp_dtype, len(info.classes),
                                                    cfg.method, param, ema.heads)
        record = epoch_record(epoch, epoch_start, stats, val, ema_val, cfg, sel, eval_sel, budget_k, described)
        record = dataclasses.replace(record, **adaptive)
        history.append(record)
        is_best = record.acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = record.acc1, epoch + 1
        rngs = ctx.gather_rng()
        if ctx.main:
            _save_epoch(out, record, epoch, best_acc1, best_epoch, cfg, info, vit, optimizer, scheduler, scaler,
                        rngs, heads, is_best, ema)
            log(epoch_line(record, cfg.epochs))

    if not val:  # resumed a run that had already finished: report its last evaluation
        val = evaluate(vit, val_loader, ctx, amp_dtype, len(info.classes), cfg.method, param, heads)
    summary = run_summary(out, history, best_acc1, best_epoch, val, cfg, sel, eval_sel, budget_k, budget,
                          info.classes)
    summary.update(adaptive, **({"k_rule": described} if adaptive else {}))
    if ctx.main:
        write_json_atomic(out / "summary.json", summary)
        log(f"done: best acc1 {best_acc1:.2f}% (epoch {best_epoch}) · {plural(len(history), 'epoch')} · "
            f"{summary['images_per_s']:.0f} img/s · {cfg.method} {described} S={sel.seq_len} → {out}")
    return summary


def epoch_record(epoch: int, epoch_start: float, stats: dict, val: dict, ema_val: dict | None, cfg: TrainConfig,
                 sel, eval_sel, budget_k: int, described: str) -> EpochRecord:
    """One line of metrics.jsonl."""
    return EpochRecord(
        epoch=epoch + 1, train_loss=stats["train_loss"], val_loss=val["val_loss"], acc1=val["acc1"],
        acc5=val["acc5"], epoch_seconds=time.perf_counter() - epoch_start, images_per_s=stats["images_per_s"],
        seq_len=sel.seq_len, eval_seq_len=eval_sel.seq_len, k=budget_k,
        eval_k=eval_sel.k if cfg.method == "dynavit" else budget_k, lr=stats["lr"],
        skipped=stats["skipped"], val_skipped=val["val_skipped"], steps=stats["steps"],
        steps_per_rank=stats["steps_per_rank"], train_images=stats["train_images"],
        val_images=val["val_images"], method=cfg.method, method_param=described,
        ema_acc1=None if ema_val is None else ema_val["acc1"])


def epoch_line(record: EpochRecord, epochs: int) -> str:
    ema = "" if record.ema_acc1 is None else f"ema_acc1 {record.ema_acc1:.2f}%  "
    return (f"epoch {record.epoch}/{epochs}  train_loss {record.train_loss:.4f}  val_loss {record.val_loss:.4f}  "
            f"acc1 {record.acc1:.2f}%  acc5 {record.acc5:.2f}%  {ema}{record.images_per_s:.0f} img/s  "
            f"{record.epoch_seconds:.1f}s")


def run_summary(out: Path, history: list, best_acc1: float, best_epoch: int, val: dict, cfg: TrainConfig, sel,
                eval_sel, budget_k: int, budget: dict, classes: list) -> dict[str, Any]:
    """summary.json: the run's outcome in one object."""
    speeds = [m.images_per_s for m in history]
    return {"out": str(out), "epochs": len(history), "best_acc1": best_acc1, "best_epoch": best_epoch,
            "final_acc1": val["acc1"], "final_acc5": val["acc5"], "final_val_loss": val["val_loss"],
            "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0, "k": budget_k, "eval_k": eval_sel.k,
            "seq_len": sel.seq_len, "method": cfg.method, "method_param": budget["described"], "budget": budget,
            "per_class_acc1": dict(zip(classes, val["per_class_acc1"]))}


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
                            images_root=cfg.images_root, trust_urls=cfg.trust_dataset_urls,
                            stream=cfg.stream, stream_buffer=cfg.stream_buffer, k_rule=cfg.k_rule)
    try:
        return loader("train", sel, True), loader(checked.val_split, eval_sel, False)
    except TooFewSamples as e:
        raise ConfigError(str(e), "--batch-size") from None
    except DataError as e:  # e.g. every shard of a split unreadable
        raise ConfigError(str(e)) from None


def method_setup(cfg: TrainConfig, vit: nn.Module, fresh: list[str], log: Callable[[str], None]):
    """The method's authors' recipe (its schedule where the options leave it open) and the
    teacher it distils from, taken from the start weights (before any resume)."""
    method_recipe = recipe_for(cfg.method, bool(cfg.checkpoint or cfg.pretrained))
    cfg, taken = with_recipe_schedule(cfg, method_recipe)
    if taken:
        log(f"{cfg.method}'s fine-tuning recipe: " + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in taken.items()))
    return cfg, method_recipe, make_teacher(cfg, vit, method_recipe, fresh, log)


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
    any, beside the raw ones. A failed write (disk full, quota, a removed folder) is one line,
    exit 1."""
    try:
        _write_epoch(out, record, epoch, best_acc1, best_epoch, cfg, info, vit, optimizer, scheduler, scaler, rngs,
                     heads, is_best, ema)
    except OSError as e:
        raise RunWriteError(f"cannot write the checkpoint of epoch {epoch + 1} in {out}: "
                            f"{e.strerror or e}; last.pt holds the last epoch written, so free space and "
                            f"--resume {out}") from None


def _write_epoch(out: Path, record: EpochRecord, epoch: int, best_acc1: float, best_epoch: int, cfg: TrainConfig,
                 info, vit, optimizer, scheduler, scaler, rngs, heads, is_best: bool, ema=None) -> None:
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
