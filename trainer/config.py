"""`dynatrain train` options: the TrainConfig, its checks (no side effects), and --resume.

Everything that can reject the arguments runs here, before the run directory is touched,
so a bad command line leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import timm
import torch

from dynavit.manifests import DatasetInfo, read_manifest
from dynavit.manifests.io import LOADER_COLUMNS

from dynavit.trainer.data import DataError, open_dataset
from dynavit.trainer.errors import ConfigError  # noqa: F401 (raised here; imported from here by callers)
from dynavit.trainer.recipe import check_recipe
from dynavit.trainer.selection import METHODS
from dynavit.trainer.runtime import AMP_MODES, DEVICES, resolve_device
from dynavit.trainer.selection import MODES as SELECTS
from dynavit.trainer.selection import Selection, SelectionError, resolve_selection

SCHEDULES = ("step", "cosine")
# Options a resume may change without changing the result. `workers` is one of them: an
# epoch's batches are a function of seed, epoch and rank, whatever the number of workers.
RESUME_SAFE_FIELDS = {"epochs", "device", "shards", "out", "resume", "overwrite", "compile",
                      "skip_bad_samples", "workers", "images_root", "trust_dataset_urls"}


# Options that decide what the weights are (architecture, which tokens they see, the
# method's parameter): a resume that changed them would relabel the run's weights.
RESUME_FIXED_FIELDS = {"model", "model_kwargs", "k", "select", "scorer", "method", "input_size", "pretrained",
                       "checkpoint", "k_rule"}


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
    k_rule: str | None = None            # adaptive K per image (adaptive_k.py): mass:TAU | budget:K[,floor=,ceil=]
    scorer: str | None = None            # None: the dataset's first scorer (dynaprep's default)
    select: str = "saliency"
    method: str = "dynavit"              # dynavit (before the encoder) | tome | evit (inside it), at K's MACs
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
    teacher: str = "auto"                # auto (the method's recipe) | none | a weights file or run dir
    backbone_lr_scale: float | None = None  # × lr for the backbone (default: the method's recipe)
    ratio_weight: float = 2.0            # DynamicViT's keep-ratio loss weight (its --ratio_weight)
    seed: int = 42
    compile: bool = False
    device: str = "auto"
    skip_bad_samples: bool = False
    val_split: str | None = None
    images_root: str | None = None       # where a wds dataset's own tars are now (default: dataset.json's)
    trust_dataset_urls: bool = False     # dataset.json / shards.parquet may name URLs and pipe: commands
    stream: bool = False                 # read the tars front to back (trainer/stream.py), not by offset
    stream_buffer: int = 1000            # --stream: samples in each worker's shuffle buffer
    resume: str | None = None
    overwrite: bool = False
    # Recipe (recipe.py, augment.py): none of them invalidates the stored kept-patch indices.
    hflip: float = 0.5                   # per-sample probability of a horizontal flip (train)
    vflip: float = 0.0                   # ... of a vertical flip
    color_jitter: list | None = None     # brightness, contrast, saturation[, hue]
    trivial_color: bool = False          # TrivialAugmentWide's colour-only ops
    reprob: float = 0.0                  # random erasing probability (inside kept patches)
    remode: str = "pixel"                # random erasing fill: pixel (N(0,1) noise) | const (the mean)
    model_ema_decay: float | None = None # EMA of the weights, evaluated and saved beside them
    layer_decay: float | None = None     # layer-wise LR decay (timm's param_groups_layer_decay)
    accum_steps: int = 1                 # loader batches per optimizer step
    drop_path: float | None = None       # = --model-kwargs drop_path_rate
    mixup: float = 0.0                   # Mixup alpha (mixing.py: kept set = top-K of the blended scores)
    cutmix: float = 0.0                  # CutMix alpha (patch-aligned box; kept set re-selected)
    mixup_prob: float = 1.0              # probability of mixing a batch
    mixup_switch_prob: float = 0.5       # probability of CutMix when both are on
    task: str = "classify"               # classify | segment (trainer/segment/, a voc-seg dataset)
    preserve: bool = True                # segment + dynavit: pruned patches keep their embedding

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Checked:
    """What check_config resolved: the dataset, the val split and both selections."""

    info: DatasetInfo
    val_split: str
    train: Selection
    eval: Selection


def resume_config(run: str | os.PathLike, overrides: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The config of run `run` with `overrides` (options given again on the command line)
    applied; returns it with the names of overridden fields that change the result."""
    run = Path(run)
    path = run / "config.json"
    if path.is_file() and not (run / "last.pt").is_file():
        raise ConfigError(f"{run}: the run stopped before its first checkpoint (no last.pt), so there is nothing "
                          f"to resume; start it again with the same options and --out {run} --overwrite", "--resume")
    if not (run / "last.pt").is_file() or not path.is_file():
        raise ConfigError(f"{run}: not a resumable run directory (needs config.json and last.pt)", "--resume")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable run config ({e})", "--resume") from None
    out = overrides.get("out")
    if out and Path(out).resolve() != run.resolve():
        raise ConfigError(f"--out {out} differs from the resumed run {run}; a resumed run continues in place", "--out")
    changed = [k for k, v in overrides.items() if k not in RESUME_SAFE_FIELDS and getattr(saved, k) != v]
    for name in changed:
        if name in RESUME_FIXED_FIELDS:
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} {overrides[name]!r} differs from the run's {getattr(saved, name)!r}: it changes "
                              f"what the weights of {run} mean, so a resume cannot change it; start a new run "
                              f"(--checkpoint {run / 'last.pt'} starts from its weights)", option)
    cfg = dataclasses.replace(saved, **overrides)
    cfg.resume, cfg.out = str(run), str(run)
    return cfg, changed


def teacher_weights(teacher: str) -> Path | None:
    """The weights file a --teacher path names (a run directory means its best.pt)."""
    path = Path(teacher)
    if path.is_dir():
        path = path / "best.pt"
    return path if path.is_file() else None


def pick_val_split(cfg: TrainConfig, info: DatasetInfo) -> str:
    if cfg.val_split:
        return cfg.val_split
    for name in ("val", "test"):
        if name in info.splits:
            return name
    raise ConfigError(f"{cfg.shards}: no 'val' or 'test' split (has {sorted(info.splits)}); "
                      f"name one with --val-split", "--val-split")


def _unlabeled(dataset_dir, split: str) -> bool:
    """True when no ok row of the split has a label (e.g. ImageNet-style flat test/)."""
    m = read_manifest(dataset_dir, LOADER_COLUMNS)  # the loaders' columns: one cached read for all
    rows = m.filter(pc.and_(pc.equal(m["split"], split), pc.equal(m["status"], "ok")))
    return rows.num_rows > 0 and rows["label"].null_count == rows.num_rows


def check_config(cfg: TrainConfig) -> Checked:
    """Validate every argument that can be checked without building the model. Raises
    ConfigError with a one-line message."""
    info = _check_dataset(cfg)
    val_split = _check_splits(cfg, info)
    _check_numbers(cfg)
    check_recipe(cfg)
    _check_runtime(cfg)
    _check_out(cfg)
    if cfg.task not in ("classify", "segment"):
        raise ConfigError(f"unknown task {cfg.task!r}; choose classify or segment", "--task")
    return _selections(cfg, info, val_split)


def _selections(cfg: TrainConfig, info: DatasetInfo, val_split: str) -> Checked:
    try:  # the model's prefix tokens are known once it is built; seq_len is refined then
        if cfg.method != "dynavit":  # ToMe / EViT read every patch; K is their MAC budget
            if cfg.k is None or not 1 <= cfg.k <= 100:
                raise ConfigError(f"--method {cfg.method} needs --k (the budget: Dyna-ViT's MACs at K)", "--k")
            dense = resolve_selection(info, None, "dense")
            return Checked(info, val_split, dense, dense)
        if cfg.k_rule is not None:
            return _adaptive_selections(cfg, info, val_split)
        train = resolve_selection(info, cfg.k, cfg.select, cfg.input_size, param="--k")
        k = train.k if cfg.eval_k is None else cfg.eval_k
        evaluation = resolve_selection(info, k, "dense" if k == 100 else cfg.select, cfg.input_size,
                                       param="--eval-k")
    except SelectionError as e:
        raise ConfigError(str(e), e.param) from None
    return Checked(info, val_split, train, evaluation)


def _adaptive_selections(cfg: TrainConfig, info: DatasetInfo, val_split: str) -> Checked:
    """--k-rule: each image's kept set comes from its scores.npy under the rule (the loader
    applies it, evaluation records it); the selection is a nominal one (adaptive_loader)."""
    from dynavit.trainer.adaptive_k import parse_k_rule
    try:
        rule = parse_k_rule(cfg.k_rule)
    except ValueError as e:
        raise ConfigError(str(e), "--k-rule") from None
    if cfg.method != "dynavit" or cfg.select != "saliency":
        raise ConfigError("--k-rule is Dyna-ViT's saliency selection (--method dynavit, --select saliency)", "--k-rule")
    if cfg.eval_k is not None or cfg.k is not None:
        raise ConfigError("--k-rule decides each image's K; leave out --k and --eval-k", "--k-rule")
    if cfg.mixup or cfg.cutmix or cfg.reprob:
        raise ConfigError("--k-rule does not combine with --mixup/--cutmix/--reprob yet (they re-select or "
                          "erase fixed-size kept sets)", "--k-rule")
    from dynavit.trainer.adaptive_loader import nominal_selection
    sel = nominal_selection(info, rule, cfg.input_size)
    return Checked(info, val_split, sel, sel)


def _check_dataset(cfg: TrainConfig) -> DatasetInfo:
    if not cfg.shards:
        raise ConfigError("missing --shards (a dataset directory written by `dynaprep index`)", "--shards")
    try:
        info = open_dataset(cfg.shards)
    except (DataError, ValueError, OSError) as e:
        raise ConfigError(str(e), "--shards") from None
    if cfg.scorer is None:  # the recorded config names the scorer actually used
        cfg.scorer = info.scorers[0]
    if cfg.scorer not in info.scorers:
        raise ConfigError(f"scorer {cfg.scorer!r} is not in this dataset's scorers {info.scorers}", "--scorer")
    if len(info.classes) < 2:
        raise ConfigError(f"{cfg.shards}: dataset.json lists {len(info.classes)} classes; training needs "
                          "labels (for --data wds, index again with -o label=json:FIELD or -o label=txt: "
                          "img2dataset keeps the class in KEY.json or KEY.txt, not in .cls)", "--shards")
    return info


def _check_splits(cfg: TrainConfig, info: DatasetInfo) -> str:
    if "train" not in info.splits:
        raise ConfigError(f"{cfg.shards}: no 'train' split (has {sorted(info.splits)})", "--shards")
    val_split = pick_val_split(cfg, info)
    if val_split not in info.splits:
        raise ConfigError(f"split {val_split!r} not in {cfg.shards} (has {sorted(info.splits)})", "--val-split")
    for split in ("train", val_split):
        if _unlabeled(cfg.shards, split):
            raise ConfigError(f"split {split!r} of {cfg.shards} has no labels; name a labelled split with "
                              f"--val-split", "--val-split")
    return val_split


def _number(value, integer: bool = False) -> bool:
    """A finite number (an int when `integer`): config.json is read back on --resume, and a
    NaN or a string there must be refused like one on the command line."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return integer or math.isfinite(value)


def _check_numbers(cfg: TrainConfig) -> None:
    checks = (("--batch-size", cfg.batch_size, True, lambda v: v >= 1),
              ("--epochs", cfg.epochs, True, lambda v: v >= 1),
              ("--workers", cfg.workers, True, lambda v: v >= 0),
              ("--step-epochs", cfg.step_epochs, True, lambda v: v >= 1),
              ("--lr", cfg.lr, False, lambda v: 0 < v <= 10),
              ("--weight-decay", cfg.weight_decay, False, lambda v: v >= 0),
              ("--gamma", cfg.gamma, False, lambda v: v > 0),
              ("--warmup-epochs", cfg.warmup_epochs, False, lambda v: 0 <= v <= 1_000_000),
              ("--label-smoothing", cfg.label_smoothing, False, lambda v: 0 <= v < 1),
              ("--clip-grad", 1.0 if cfg.clip_grad is None else cfg.clip_grad, False, lambda v: v > 0),
              ("--backbone-lr-scale", 1.0 if cfg.backbone_lr_scale is None else cfg.backbone_lr_scale, False,
               lambda v: v >= 0),
              ("--ratio-weight", cfg.ratio_weight, False, lambda v: 0 <= v <= 1e6))
    for name, value, integer, ok in checks:
        if not _number(value, integer) or not ok(value):
            raise ConfigError(f"{name} {value!r} is out of range", name)
    if cfg.teacher not in ("auto", "none") and teacher_weights(cfg.teacher) is None:
        raise ConfigError(f"--teacher {cfg.teacher}: not a weights file or a run directory with best.pt",
                          "--teacher")
    if cfg.sched not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.sched!r}; choose from {', '.join(SCHEDULES)}", "--sched")
    if cfg.select not in SELECTS:
        raise ConfigError(f"unknown selection {cfg.select!r}; choose from {', '.join(SELECTS)}", "--select")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}", "--method")
    if cfg.method != "dynavit" and (cfg.select != "saliency" or cfg.input_size is not None):
        raise ConfigError(f"--method {cfg.method} reduces tokens inside the encoder from every patch; "
                          f"--select and --image-size are Dyna-ViT's", "--method")
    if cfg.method != "dynavit" and cfg.eval_k not in (None, cfg.k):
        raise ConfigError(f"--method {cfg.method}: --eval-k must equal --k (the compute budget)", "--eval-k")


def _check_runtime(cfg: TrainConfig) -> None:
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


def _check_out(cfg: TrainConfig) -> None:
    if cfg.resume:
        return
    if not cfg.out:
        raise ConfigError("missing --out (the run directory)", "--out")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory", "--out")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ConfigError(f"--out {out} lies under a file", "--out")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        if (out / "config.json").is_file() and not (out / "last.pt").is_file():
            raise ConfigError(f"{out} holds a run that stopped before its first checkpoint (no last.pt); pass "
                              f"--overwrite to start it again", "--out")
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace its run files, "
                          f"or --resume {out} to continue it", "--out")
