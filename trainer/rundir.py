"""The run directory `dynatrain` writes, declared like dataset.json is:

    OUT/config.json    RunInfo       the options, the dataset, versions, what the run resolved
    OUT/metrics.jsonl  EpochRecord   one JSON line per finished epoch
    OUT/last.pt        Checkpoint    weights + optimizer/scheduler/scaler/RNG state (resume)
    OUT/best.pt        Checkpoint    weights of the best epoch (no optimizer state)
    OUT/summary.json                 the final summary (a plain dict)

Every file carries a version; a reader refuses one it does not know with a one-line
RunDirError instead of guessing with `.get()` fallbacks. Checkpoints are written with an
fsync before the rename (a crash never leaves a torn last.pt under its final name) and load
with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynavit.manifests import atomic_path, write_json_atomic
from dynavit.manifests.atomic import remove_stale_temp_files  # noqa: F401 (re-exported for resume)

RUN_VERSION = 1
CHECKPOINT_FORMAT = "dynavit-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a `version` field is checked on load (1 wrote it, never read it)
READABLE_CHECKPOINTS = (1, 2)
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json")


class RunDirError(Exception):
    """A run directory file that cannot be read as declared; one line naming the file."""


@dataclass
class RunInfo:
    """config.json."""

    config: dict[str, Any]       # TrainConfig as a dict: every option
    dataset: dict[str, Any]      # what the dataset was (path, classes, grid, ...)
    versions: dict[str, str]     # python, torch, timm, numpy, dynavit, ...
    run: dict[str, Any]          # resolved: world_size, device, amp, val_split, input_size, seq_len, ...
    version: int = RUN_VERSION

    def write(self, out: Path) -> None:
        write_json_atomic(out / "config.json", dataclasses.asdict(self))

    @classmethod
    def read(cls, out: Path) -> "RunInfo":
        path = Path(out) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{out}: not a dynatrain run directory (no config.json)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path}: unreadable ({e})") from None
        version = d.get("version", RUN_VERSION)  # turn-1 runs wrote no version: the same layout
        if version != RUN_VERSION:
            raise RunDirError(f"{path}: run format version {version!r} is not one this dynatrain reads ({RUN_VERSION})")
        try:
            return cls(config=d["config"], dataset=d.get("dataset", {}), versions=d.get("versions", {}),
                       run=d.get("run", {}), version=version)
        except (KeyError, TypeError) as e:
            raise RunDirError(f"{path}: malformed ({e})") from None


@dataclass
class EpochRecord:
    """One line of metrics.jsonl."""

    epoch: int
    train_loss: float
    val_loss: float
    acc1: float  # percent
    acc5: float
    epoch_seconds: float
    images_per_s: float
    seq_len: int
    eval_seq_len: int
    k: int
    eval_k: int
    lr: float
    skipped: int
    val_skipped: int
    steps: int
    steps_per_rank: list[int]
    train_images: int
    val_images: int
    method: str = "dynavit"   # where tokens are reduced (K is the MAC budget of tome / evit)
    method_param: str = ""    # e.g. "K=70", "r=10 (-1.5% MACs vs K=70)"
    ema_acc1: float | None = None  # --model-ema-decay: top-1 of the EMA weights
    # --k-rule (adaptive K): the evaluation split's mean kept patches and mean GMACs per image
    # (each image's own sparse-forward MACs), and how many images kept each count.
    eval_mean_kept: float | None = None
    eval_mean_gmacs: float | None = None
    eval_kept_hist: dict | None = None

    def line(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"


def read_metrics(out: Path, repair: bool = False) -> list[EpochRecord]:
    """The epoch records of a run. A torn last line (the process was killed mid-write) is
    dropped with a warning; with `repair` the file is rewritten without it. Any other bad
    line is a RunDirError."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    names = {f.name for f in dataclasses.fields(EpochRecord)}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            records.append(EpochRecord(**{k: v for k, v in d.items() if k in names}))
        except (json.JSONDecodeError, TypeError) as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line (the run was killed while writing it)")
                if repair:
                    path.write_text("".join(r.line() for r in records))
                break
            raise RunDirError(f"{path}: line {i + 1} is not an epoch record ({e})") from None
    return records


def load_error(e: BaseException) -> str:
    """One line for an exception of torch.load(weights_only=True). torch's own message for a
    refused pickle advises re-running with weights_only=False: for a file from elsewhere
    that advice runs its code, so it is never repeated."""
    text = str(e).strip()
    if "weights only load failed" in text.lower() or "weights_only" in text or type(e).__name__ == "UnpicklingError":
        return ("it holds Python objects other than tensors (a pickle); dynavit loads tensors only and will "
                "not unpickle it, since unpickling a file can run its code")
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@dataclass
class Checkpoint:
    """last.pt / best.pt: plain tensors and lists, loadable with weights_only=True."""

    epoch: int
    best_acc1: float
    best_epoch: int
    acc1: float
    model_name: str
    config: dict[str, Any]
    classes: list[str]
    model: dict[str, torch.Tensor]                 # the plain timm state_dict
    optimizer: dict | None = None                  # last.pt only
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: list[dict] = field(default_factory=list)  # one per rank
    method_state: dict | None = None               # a learned method's own heads (DynamicViT, TNT, Cropr)
    model_ema: dict | None = None                  # --model-ema-decay: the EMA weights (a timm state_dict)
    method_ema: dict | None = None                 # ... and the EMA of a learned method's heads
    format: str = CHECKPOINT_FORMAT
    version: int = CHECKPOINT_VERSION

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(dataclasses.asdict(self), f)
                f.flush()
                os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RunDirError(f"{path}: missing") from None
        except Exception as e:  # truncated zip, not a torch file, a pickle refused by weights_only
            raise RunDirError(f"{path}: unreadable checkpoint ({load_error(e)})") from None
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise RunDirError(f"{path}: not a dynatrain checkpoint")
        if d.get("version") not in READABLE_CHECKPOINTS:
            raise RunDirError(f"{path}: checkpoint version {d.get('version')!r} is not one this dynatrain reads "
                              f"{list(READABLE_CHECKPOINTS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise RunDirError(f"{path}: malformed checkpoint ({e})") from None
