"""dynatrain's training loop: read it top to bottom.

    config → dataset checks → model → loaders → optimizer/schedule → run dir (or resume)
    → for each epoch: train (sparse forward on the kept patches) → evaluate → log → checkpoint

Everything that can reject the arguments (dataset, K, scorer, model, weights, --out) runs
before the run directory is touched, so a bad command line leaves nothing behind.

Distributed: under `torchrun` (WORLD_SIZE > 1) every rank builds its own loader slice
(rank/world_size go into `build_loader`, which guarantees the same number of train steps on
every rank); gradients are averaged by DDP; eval counts and losses are summed with
all_reduce; only rank 0 writes files and prints.

Resume: a checkpoint holds model, optimizer, scheduler, scaler, epoch, best metric and the
RNG states of every rank; the loaders reseed from (seed, epoch) on `set_epoch`, so a resumed
run replays the same batches as an uninterrupted one and ends on the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import resample_abs_pos_embed
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from dynavit.manifests import atomic_path, k_count, write_json_atomic
from dynavit.trainer.data import SELECT_MODES, DataError, build_loader, normalize, open_dataset
from dynavit.trainer.sparse import check_model, sparse_forward

SCHEDULES = ("step", "cosine")
SELECTS = SELECT_MODES
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
DENSE_K = 100
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json")
CHECKPOINT_FORMAT = "dynavit-train-checkpoint"
CHECKPOINT_VERSION = 1
# Changing these on --resume does not change the numbers a run produces.
# Options a resume may change without changing the result. Not `workers`: shards are split
# per worker, so the batches depend on it.
RESUME_SAFE_FIELDS = {"epochs", "device", "shards", "out", "resume", "overwrite",
                      "compile", "skip_bad_samples"}


@dataclass
class TrainConfig:
    """Every `dynatrain train` option (the CLI builds one of these; `train` consumes it)."""

    shards: str = ""                     # dataset directory written by `dynaprep index`
    out: str = ""                        # run directory
    model: str = "vit_base_patch16_224"  # any timm ViT name (with or without a pretrained tag)
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False             # timm's own pretrained weights
    checkpoint: str | None = None        # local weights file
    k: int | None = None                 # percent of patches kept in training (100 = dense)
    eval_k: int | None = None            # percent kept in evaluation (default: k)
    scorer: str = "l2"
    select: str = "saliency"
    input_size: int | None = None        # default: the stored image size
    batch_size: int = 64
    workers: int = 4
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.05
    sched: str = "step"
    step_epochs: int = 3
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "auto"
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    seed: int = 42
    compile: bool = False
    device: str = "auto"
    skip_bad_samples: bool = False
    val_split: str | None = None
    resume: str | None = None
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ConfigError(ValueError):
    """A bad argument, detected before anything is written. `param` names the option."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# --- resume ---------------------------------------------------------------------------------

def resume_config(run: str | os.PathLike, overrides: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The config of run `run` with `overrides` (options given again on the command line)
    applied; returns it with the names of overridden fields that change the result."""
    run = Path(run)
    path = run / "config.json"
    if not (run / "last.pt").is_file() or not path.is_file():
        raise ConfigError(f"{run}: not a resumable run directory (needs config.json and last.pt)", "--resume")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable run config ({e})", "--resume") from None
    out = overrides.get("out")
    if out and Path(out).resolve() != run.resolve():
        raise ConfigError(f"--out {out} differs from the resumed run {run}; a resumed run continues in place", "--out")
    changed = [k for k, v in overrides.items()
               if k not in RESUME_SAFE_FIELDS and getattr(saved, k) != v]
    cfg = dataclasses.replace(saved, **overrides)
    cfg.resume, cfg.out = str(run), str(run)
    return cfg, changed


# --- argument checks (no side effects) ------------------------------------------------------

def effective_k(cfg: TrainConfig) -> tuple[int, int]:
    """(train K, eval K) after defaults: --select dense means K=100."""
    k = DENSE_K if cfg.select == "dense" and cfg.k is None else cfg.k
    eval_k = k if cfg.eval_k is None else cfg.eval_k
    return k, eval_k


def _unlabeled(dataset_dir, split: str) -> bool:
    """True when no ok row of the split has a label (e.g. ImageNet-style flat test/)."""
    import pyarrow.compute as pc

    from dynavit.manifests import read_manifest

    m = read_manifest(dataset_dir)
    rows = m.filter(pc.and_(pc.equal(m["split"], split), pc.equal(m["status"], "ok")))
    return rows.num_rows > 0 and rows["label"].null_count == rows.num_rows


def pick_val_split(cfg: TrainConfig, info) -> str:
    if cfg.val_split:
        return cfg.val_split
    for name in ("val", "test"):
        if name in info.splits:
            return name
    raise ConfigError(f"{cfg.shards}: no 'val' or 'test' split (has {sorted(info.splits)}); "
                      f"name one with --val-split", "--val-split")


def check_config(cfg: TrainConfig):
    """Validate every argument that can be checked without building the model; returns the
    dataset info. Raises ConfigError with a one-line message."""
    if not cfg.shards:
        raise ConfigError("missing --shards (a dataset directory written by `dynaprep index`)", "--shards")
    try:
        info = open_dataset(cfg.shards)
    except (DataError, ValueError, OSError) as e:
        raise ConfigError(str(e), "--shards") from None

    if cfg.select not in SELECTS:
        raise ConfigError(f"unknown selection {cfg.select!r}; choose from {', '.join(SELECTS)}", "--select")
    k, eval_k = effective_k(cfg)
    if k is None:
        raise ConfigError(f"missing --k (the dataset has K = {info.k_values()}; 100 = dense)", "--k")
    if cfg.select == "dense" and k != DENSE_K:
        raise ConfigError(f"--select dense keeps every patch, so --k must be 100 (got {k})", "--k")
    # Stored index sets exist only for the indexed Ks; random/center selection and a crop
    # (which re-selects top-K from scores.npy) work for any K.
    cropped = cfg.input_size is not None and cfg.input_size < min(info.image_size)
    for name, value in (("--k", k), ("--eval-k", eval_k)):
        if not 1 <= value <= DENSE_K:
            raise ConfigError(f"K={value} must be a percentage in 1..100", name)
        if cfg.select == "saliency" and not cropped and value != DENSE_K and value not in info.k_values():
            raise ConfigError(f"K={value} is not in this dataset's ks {info.k_values()} (or 100 = dense)", name)
    if cfg.scorer not in info.scorers:
        raise ConfigError(f"scorer {cfg.scorer!r} is not in this dataset's scorers {info.scorers}", "--scorer")
    if "train" not in info.splits:
        raise ConfigError(f"{cfg.shards}: no 'train' split (has {sorted(info.splits)})", "--shards")
    val_split = pick_val_split(cfg, info)
    if val_split not in info.splits:
        raise ConfigError(f"split {val_split!r} not in {cfg.shards} (has {sorted(info.splits)})", "--val-split")
    if len(info.classes) < 2:
        raise ConfigError(f"{cfg.shards}: dataset.json lists {len(info.classes)} classes; training needs "
                          f"labels (for --data wds, index with -o classes_file=...)", "--shards")
    for split in ("train", val_split):
        if _unlabeled(cfg.shards, split):
            raise ConfigError(f"split {split!r} of {cfg.shards} has no labels; name a labelled split with "
                              f"--val-split", "--val-split")
    if cfg.input_size is not None:
        stored = tuple(info.image_size)
        if cfg.input_size % info.patch_size or cfg.input_size > min(stored):
            raise ConfigError(f"--input-size {cfg.input_size} must be a multiple of the patch size "
                              f"{info.patch_size} and at most the stored size {stored}", "--input-size")

    for name, value, ok in (("--batch-size", cfg.batch_size, cfg.batch_size >= 1),
                            ("--epochs", cfg.epochs, cfg.epochs >= 1),
                            ("--workers", cfg.workers, cfg.workers >= 0),
                            ("--lr", cfg.lr, cfg.lr > 0),
                            ("--step-epochs", cfg.step_epochs, cfg.step_epochs >= 1),
                            ("--warmup-epochs", cfg.warmup_epochs, cfg.warmup_epochs >= 0),
                            ("--label-smoothing", cfg.label_smoothing, 0 <= cfg.label_smoothing < 1)):
        if not ok:
            raise ConfigError(f"{name} {value} is out of range", name)
    if cfg.sched not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.sched!r}; choose from {', '.join(SCHEDULES)}", "--sched")
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"unknown --amp {cfg.amp!r}; choose from {', '.join(AMP_MODES)}", "--amp")
    if cfg.device not in DEVICES:
        raise ConfigError(f"unknown --device {cfg.device!r}; choose from {', '.join(DEVICES)}", "--device")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available", "--device")
    if resolve_device(cfg.device).type != "cuda" and cfg.amp == "fp16":
        raise ConfigError("--amp fp16 needs a CUDA device (fp16 autocast + GradScaler); "
                          "use --amp bf16 or --amp off on CPU", "--amp")
    if not timm.is_model(cfg.model):
        raise ConfigError(f"unknown timm model {cfg.model!r}", "--model")
    if not isinstance(cfg.model_kwargs, dict):
        raise ConfigError("--model-kwargs must be a JSON object", "--model-kwargs")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"{cfg.checkpoint}: no such file", "--checkpoint")

    if not cfg.resume:
        if not cfg.out:
            raise ConfigError("missing --out (the run directory)", "--out")
        out = Path(cfg.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} exists and is not a directory", "--out")
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise ConfigError(f"{out} is not empty; pass --overwrite to replace its run files, "
                              f"or --resume {out} to continue it", "--out")
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32. `auto` = bf16 on GPUs that have it, else off
    (CPU bf16 autocast is correct but rarely faster)."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


# --- model ----------------------------------------------------------------------------------

class SparseViT(nn.Module):
    """`forward(images, keep_idx)` = sparse_forward of the wrapped timm ViT.

    DDP only synchronises gradients of forwards that go through its own `forward`, so the
    sparse forward has to be a module's forward for DDP to wrap; `self.vit` stays a plain
    timm model whose state_dict is what checkpoints store.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None, validate: bool = True):
        return sparse_forward(self.vit, images, keep_idx, validate=validate)


def build_model(cfg: TrainConfig, info, input_hw: tuple[int, int], log: Callable[[str], None]) -> nn.Module:
    kwargs = {"img_size": input_hw, **cfg.model_kwargs}
    if tuple(np.broadcast_to(kwargs["img_size"], 2)) != tuple(input_hw):
        raise ConfigError(f"--model-kwargs img_size={kwargs['img_size']} differs from the input size "
                          f"{tuple(input_hw)} (set by the dataset or --input-size)", "--model-kwargs")
    kwargs.pop("num_classes", None)
    try:
        vit = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=len(info.classes), **kwargs)
        check_model(vit)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"cannot build {cfg.model} for this dataset: {e}", "--model") from None
    patch = tuple(vit.patch_embed.patch_size)
    if patch != (info.patch_size, info.patch_size):
        raise ConfigError(f"{cfg.model} has patch size {patch[0]} but the dataset was indexed with patch "
                          f"{info.patch_size}; pick a matching model or pass "
                          f"--model-kwargs '{{\"patch_size\": {info.patch_size}}}'", "--model")
    if cfg.checkpoint:
        load_weights(vit, cfg.checkpoint, log)
    return vit


def load_weights(vit: nn.Module, path: str, log: Callable[[str], None]) -> None:
    """Load a timm/torch state_dict or a dynatrain checkpoint into `vit`. A classifier of a
    different shape (other class count) is dropped and left freshly initialised; a
    positional table of another grid is resampled the way timm does for pretrained weights."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, not a torch file, non-tensor payloads
        raise ConfigError(f"{path}: cannot load weights ({type(e).__name__}: {e})".splitlines()[0], "--checkpoint") from None
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: not a state_dict of tensors", "--checkpoint")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("vit."): v for k, v in sd.items()}

    own = vit.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(vit.patch_embed.grid_size),
                                                 num_prefix_tokens=prefix)
        log(f"note: {path}: resampled pos_embed to the {tuple(vit.patch_embed.grid_size)} grid")
    head = vit.pretrained_cfg.get("classifier", "head") if getattr(vit, "pretrained_cfg", None) else "head"
    dropped = [k for k in sd if k.startswith(head + ".") and k in own and sd[k].shape != own[k].shape]
    if dropped:
        log(f"note: {path}: classifier has another shape ({tuple(sd[dropped[0]].shape)} vs "
            f"{tuple(own[dropped[0]].shape)}); dropped {', '.join(dropped)} and kept the fresh head")
        for k in dropped:
            del sd[k]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise ConfigError(f"{path}: shapes differ from {type(vit).__name__} for {', '.join(bad[:4])}", "--checkpoint")
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ConfigError(f"{path}: does not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})",
                          "--checkpoint")


# --- schedule, RNG, distributed ---------------------------------------------------------------

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists: loadable with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name if device_name in DEVICES else "auto")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Dist(rank=rank, world_size=world_size, device=device)


# --- one epoch of training, one evaluation --------------------------------------------------

def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cfg, ctx: Dist, info,
                    amp_dtype, epoch: int) -> dict[str, Any]:
    model.train()
    loader.set_epoch(epoch)  # reseeds shard order, shuffle buffer and random selection
    device = ctx.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, skipped, steps, lr = 0, 0, 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(total=loader.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
               disable=not ctx.main or not sys.stderr.isatty(), dynamic_ncols=True)
    start = time.perf_counter()
    for batch in loader:
        images = normalize(batch.images.to(device, non_blocking=True), info.mean, info.std)
        keep_idx = None if batch.keep_idx is None else batch.keep_idx.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # Index checks cost a device sync (and a graph break under --compile); the loader
            # has checked the stored indices, so one eager check per epoch is enough.
            logits = model(images, keep_idx, validate=steps == 0 and not cfg.compile)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        loss_sum += loss.detach().double() * labels.shape[0]
        seen += labels.shape[0]
        skipped += batch.skipped
        steps += 1
        if not bar.disable:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen * ctx.world_size / elapsed:.0f}")
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
    return {
        "train_loss": totals[0].item() / max(1, images_total),
        "train_images": images_total,
        "images_per_s": images_total / seconds if seconds > 0 else 0.0,
        "skipped": int(totals[2].item()),
        "steps": steps,
        "steps_per_rank": [int(s) for s in steps_per_rank.tolist()],
        "lr": lr,
    }


@torch.no_grad()
def evaluate(vit, loader, ctx: Dist, info, amp_dtype, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-min(5, C) accuracy (percent), mean CE loss and per-class top-1 over the
    split, each sample counted once across ranks. Runs on the bare ViT, not through DDP:
    per-rank eval step counts may differ and DDP's forward would then wait on collectives."""
    vit.eval()
    device = ctx.device
    top = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits1 = torch.zeros((), dtype=torch.float64, device=device)
    hits5 = torch.zeros((), dtype=torch.float64, device=device)
    class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
    skipped = 0
    for batch in loader:
        images = normalize(batch.images.to(device, non_blocking=True), info.mean, info.std)
        keep_idx = None if batch.keep_idx is None else batch.keep_idx.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = sparse_forward(vit, images, keep_idx, validate=False)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.topk(top, dim=1).indices
        correct1 = (pred[:, 0] == labels).double()
        hits1 += correct1.sum()
        hits5 += (pred == labels[:, None]).any(dim=1).double().sum()
        class_total.index_add_(0, labels, torch.ones_like(correct1))
        class_hits.index_add_(0, labels, correct1)
        skipped += batch.skipped
    stats = torch.cat([torch.stack([loss_sum, hits1, hits5,
                                    torch.tensor(float(skipped), dtype=torch.float64, device=device)]),
                       class_total, class_hits])
    stats = ctx.all_reduce(stats).tolist()
    loss_sum, hits1, hits5, skipped = stats[:4]
    class_total, class_hits = stats[4:4 + num_classes], stats[4 + num_classes:]
    n = sum(class_total)
    return {
        "val_loss": loss_sum / n if n else float("nan"),
        "acc1": 100.0 * hits1 / n if n else 0.0,
        "acc5": 100.0 * hits5 / n if n else 0.0,
        "val_images": int(n),
        "val_skipped": int(skipped),
        "per_class_acc1": [100.0 * h / t if t else None for h, t in zip(class_hits, class_total)],
    }


# --- files of a run ---------------------------------------------------------------------------

def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
            "splits": {name: dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c
                       for name, c in info.splits.items()},
            "ks": info.k_values(), "scorers": list(info.scorers),
            "mean": list(info.mean), "std": list(info.std)}


# --- the whole run ----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary. Raises
    ConfigError, before writing anything, on a bad argument."""
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        if ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: Dist) -> dict[str, Any]:
    log = (lambda msg: print(msg, flush=True)) if ctx.main else (lambda msg: None)
    info = check_config(cfg)
    device = ctx.device
    amp_dtype = resolve_amp(cfg.amp, device)
    k, eval_k = effective_k(cfg)
    val_split = pick_val_split(cfg, info)
    input_hw = (cfg.input_size, cfg.input_size) if cfg.input_size else tuple(info.image_size)
    num_classes = len(info.classes)
    out = Path(cfg.resume or cfg.out)

    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    seed_everything(cfg.seed)
    vit = build_model(cfg, info, input_hw, log).to(device)
    n_patches = (input_hw[0] // info.patch_size) * (input_hw[1] // info.patch_size)
    seq_len = vit.num_prefix_tokens + (n_patches if k == DENSE_K else k_count(k, n_patches))
    eval_seq_len = vit.num_prefix_tokens + (n_patches if eval_k == DENSE_K else k_count(eval_k, n_patches))

    model: nn.Module = SparseViT(vit)
    if cfg.compile:
        model = torch.compile(model)
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def loader(split: str, k_: int, is_train: bool):
        dense = k_ == DENSE_K
        return build_loader(cfg.shards, split, k=k_, scorer=cfg.scorer, select="dense" if dense else cfg.select,
                            batch_size=cfg.batch_size, workers=cfg.workers, train=is_train, seed=cfg.seed,
                            rank=ctx.rank, world_size=ctx.world_size, input_size=cfg.input_size,
                            skip_bad_samples=cfg.skip_bad_samples, pin_memory=device.type == "cuda")
    try:
        train_loader = loader("train", k, True)
        val_loader = loader(val_split, eval_k, False)
    except DataError as e:  # e.g. fewer samples than one step of world_size × batch_size
        raise ConfigError(str(e)) from None
    steps_per_epoch = train_loader.steps

    # timm's grouping: no weight decay on biases, norms, pos_embed and the cls/reg tokens.
    params = param_groups_weight_decay(vit, cfg.weight_decay, no_weight_decay_list=vit.no_weight_decay())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, best_acc1, best_epoch = 0, -1.0, 0
    history: list[dict[str, Any]] = []
    if cfg.resume:
        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        vit.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_acc1, best_epoch = ckpt["epoch"], ckpt["best_acc1"], ckpt["best_epoch"]
        rngs = ckpt["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        # Lines of epochs after the checkpoint (a crash between the two writes) are redone.
        history = [m for m in read_metrics(out / "metrics.jsonl") if m["epoch"] <= start_epoch]
        log(f"resuming {out} after epoch {start_epoch} (best acc1 {best_acc1:.2f}% at epoch {best_epoch})")
    ctx.barrier()  # every rank has checked --out before rank 0 writes into it
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            for name in RUN_FILES:  # --overwrite replaces our files, never the user's others
                (out / name).unlink(missing_ok=True)
        write_json_atomic(out / "config.json", {
            "config": cfg.to_dict(), "dataset": dataset_summary(info, cfg), "versions": versions(),
            "run": {"world_size": ctx.world_size, "device": str(device), "amp": str(amp_dtype),
                    "val_split": val_split, "input_size": list(input_hw), "seq_len": seq_len,
                    "eval_seq_len": eval_seq_len, "steps_per_epoch": steps_per_epoch,
                    "params": sum(p.numel() for p in vit.parameters()), "resumed_at_epoch": start_epoch}})
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    log(f"dynatrain: {cfg.model} on {info.dataset} · K={k} (S={seq_len}) · eval K={eval_k} · "
        f"{steps_per_epoch} steps/epoch × {ctx.world_size} rank(s) · {device} · amp {cfg.amp} → {out}")

    val = {}
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, cfg, ctx, info,
                                amp_dtype, epoch)
        val = evaluate(vit, val_loader, ctx, info, amp_dtype, num_classes)
        record = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_loss": val["val_loss"],
                  "acc1": val["acc1"], "acc5": val["acc5"], "epoch_seconds": time.perf_counter() - epoch_start,
                  "images_per_s": stats["images_per_s"], "seq_len": seq_len, "eval_seq_len": eval_seq_len,
                  "k": k, "eval_k": eval_k, "lr": stats["lr"], "skipped": stats["skipped"],
                  "val_skipped": val["val_skipped"], "steps": stats["steps"],
                  "steps_per_rank": stats["steps_per_rank"], "train_images": stats["train_images"],
                  "val_images": val["val_images"]}
        history.append(record)
        is_best = val["acc1"] > best_acc1
        if is_best:
            best_acc1, best_epoch = val["acc1"], epoch + 1

        rngs = [rng_state()]
        if ctx.world_size > 1:  # every rank's RNG, so each resumes its own stream
            rngs = [None] * ctx.world_size
            dist.all_gather_object(rngs, rng_state())
        if ctx.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
                    "best_acc1": best_acc1, "best_epoch": best_epoch, "acc1": val["acc1"],
                    "model_name": cfg.model, "config": cfg.to_dict(), "classes": list(info.classes)}
            # best.pt first: once last.pt names an epoch, everything of that epoch is on disk.
            if is_best:  # weights only: best.pt is for evaluation and fine-tuning
                save_checkpoint(out / "best.pt", {**meta, "model": vit.state_dict()})
            save_checkpoint(out / "last.pt", {**meta, "model": vit.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                              "rng": [{k_: _cpu(v) for k_, v in r.items()} for r in rngs]})
            log(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  val_loss "
                f"{record['val_loss']:.4f}  acc1 {record['acc1']:.2f}%  acc5 {record['acc5']:.2f}%  "
                f"{record['images_per_s']:.0f} img/s  {record['epoch_seconds']:.1f}s")

    if not val:  # resumed a run that had already finished: report its last evaluation
        val = evaluate(vit, val_loader, ctx, info, amp_dtype, num_classes)
    speeds = [m["images_per_s"] for m in history]
    summary = {"out": str(out), "epochs": len(history), "best_acc1": best_acc1, "best_epoch": best_epoch,
               "final_acc1": val["acc1"], "final_acc5": val["acc5"], "final_val_loss": val["val_loss"],
               "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0, "k": k, "eval_k": eval_k,
               "seq_len": seq_len, "per_class_acc1": dict(zip(info.classes, val["per_class_acc1"]))}
    if ctx.main:
        write_json_atomic(out / "summary.json", summary)
        log(f"done: best acc1 {best_acc1:.2f}% (epoch {best_epoch}) · {len(history)} epochs · "
            f"{summary['images_per_s']:.0f} img/s · K={k} S={seq_len} → {out}")
    return summary


def _cpu(value):
    """RNG states gathered from other ranks may sit on their devices; checkpoints keep CPU tensors."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value
