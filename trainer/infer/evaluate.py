"""`dynatrain evaluate`: top-1 / top-5 / loss of a run's best.pt on a split, with the stored
indices (the training path) or with online scoring (docs/ONLINE.md).

    dynatrain evaluate runs/k70                          # stored k70 indices of the val split
    dynatrain evaluate runs/k70 --online                 # same images, scored on the device
    dynatrain evaluate runs/k70 --online --k 50 --scorer sobel --json k50-sobel.json

Stored (default): the run's own model builder, loader, normalisation, sparse forward and
autocast setting at the run's eval K (or --k, if the dataset has it indexed), the same
computation the trainer's per-epoch evaluation runs, so at the run's eval K on its val split
it reproduces the acc1 logged for best.pt.

Online (`online=True`): the same stored images are read densely (the K=100 loader, no
kept-index arrays), normalised on the device, and ``DynaViT(vit, k, scorer, mean, std)``
scores every patch and keeps the top-K on the device. Any K in 1..100 and any scorer work;
they default to the run's eval K and scorer. With the run's scorer and K the online kept sets
equal the stored ones except where two patch scores tie within float rounding at the K
boundary (``trainer/infer/scoring.py``), so the accuracy matches the stored evaluation.

Errors: ``EvaluateError`` (one line, ``param`` names the option) for arguments that cannot be
used (run directory, dataset, split, K, scorer); ``DataError`` for shards that fail while
reading. The CLI maps them to exit codes 2 and 1.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dynavit.manifests import locations

from dynavit.trainer.config import ConfigError, TrainConfig, pick_val_split
from dynavit.trainer.data import DataError, build_loader, open_dataset
from dynavit.trainer.model import build_model
from dynavit.trainer.infer.online import DynaViT
from dynavit.trainer.rundir import Checkpoint, RunDirError, RunInfo
from dynavit.trainer.runtime import autocast, resolve_amp, to_device
from dynavit.trainer.infer.scoring import SCORERS
from dynavit.trainer.selection import SelectionError, resolve_selection
from dynavit.trainer.methods.sparse import sparse_forward
from dynavit.trainer.methods.packing import RaggedKeep
from dynavit.trainer.model import method_forward
from dynavit.trainer.adaptive_k import parse_k_rule
from dynavit.trainer.adaptive_loader import nominal_selection
from dynavit.trainer.infer.adaptive import kept_summary

__all__ = ["EvaluateError", "evaluate_run", "format_result"]


class EvaluateError(ValueError):
    """An argument the evaluation cannot use; one line, `param` names the option."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvaluateError(f"{name!r} is not a torch device (cpu, cuda, cuda:N, auto)", "--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"{name}: CUDA is not available on this machine", "--device")
    return dev


def _run_eval_k(cfg: TrainConfig) -> int:
    """The K the run evaluated at (its --eval-k, else its --k; 100 for a dense run)."""
    if cfg.eval_k is not None:
        return int(cfg.eval_k)
    if cfg.select == "dense" or cfg.k is None:
        return 100
    return int(cfg.k)


def evaluate_run(run_dir, *, online: bool = False, k: Optional[int] = None, scorer: Optional[str] = None,
                 split: Optional[str] = None, shards: Optional[str] = None, device: str = "auto",
                 batch_size: Optional[int] = None, workers: Optional[int] = None,
                 round_to: Optional[int] = None, predictions: bool = False,
                 progress: bool = False, trust_urls: bool = False, k_rule: Optional[str] = None) -> dict[str, Any]:
    """Evaluate `run_dir`/best.pt on `split` (default: the run's validation split).

    Returns a JSON-ready dict: mode ("stored" | "online"), split, k, scorer, select, kept
    patches, seq_len, images, acc1 / acc5 (percent), loss (mean cross-entropy), seconds,
    images_per_s, device, amp, the checkpoint's epoch and the acc1 training logged for it
    (``trained_acc1``, measured on the run's val split at its eval K). With `predictions`,
    also ``keys``, ``y_true`` and ``y_pred`` per labelled sample, in file order.
    Unlabelled samples are left out. `workers` defaults to the run's loader workers.
    `k_rule` (default: the run's --k-rule, unless --k is given): adaptive K from the stored
    scores, run packed; the result adds k_rule, tau, mean_kept, mean_gmacs, kept_hist and
    kept_per_sample (key -> count)."""
    # Every argument is checked (in this order, so the first bad one is the one reported)
    # before the checkpoint is read or a model is built.
    run = Path(run_dir)
    meta, cfg = _read_run(run)
    dataset, info = _open_run_dataset(run, meta, cfg, shards)
    split = _resolve_split(meta, cfg, info, dataset, split)
    run_k = _run_eval_k(cfg)
    k_given = k is not None
    k, scorer = _check_k_scorer(cfg, run_k if k is None else k, scorer)
    _check_options(online, round_to, batch_size, workers)
    dev = _device(device)
    best = run / "best.pt"
    try:
        ckpt = Checkpoint.load(best)
    except RunDirError as e:
        raise EvaluateError(str(e), "RUN") from None

    rule = _k_rule(cfg, k_rule, k_given, online, info)
    sel, select = (nominal_selection(info, rule, cfg.input_size), "saliency") if rule else \
        _selection(info, cfg, dataset, k, scorer, online)
    vit, sel = _rebuild_model(run, best, cfg, info, sel, ckpt, dev)
    if rule is not None:
        kept, seq_len = sel.kept, sel.seq_len  # nominal; the per-sample counts are recorded below
        forward = (lambda images, keep_idx: method_forward(vit, images, keep_idx))
    elif online:
        net = _online_net(vit, k, scorer, info, round_to, dev)
        kept, seq_len = net.keep, net.seq_len
        forward = (lambda images, keep_idx: net(images))
    else:
        kept = sel.num_patches if sel.dense else sel.kept
        seq_len = sel.seq_len
        forward = (lambda images, keep_idx: sparse_forward(vit, images, keep_idx, validate=False))
    amp_dtype = _eval_amp(cfg, dev)
    loader = _labelled_loader(dataset, split, sel, scorer, info, cfg, batch_size, workers, run, trust_urls, rule)

    tally = _score(loader, forward, dev, amp_dtype, info, predictions, progress)
    loss, hits1, hits5, n = tally["sums"]
    n = int(n)
    seconds = tally["seconds"]
    result: dict[str, Any] = {
        "run": str(run), "checkpoint": str(best), "epoch": int(ckpt.epoch), "trained_acc1": float(ckpt.acc1),
        "model": cfg.model, "dataset": str(dataset), "split": split,
        "mode": "online" if online else "stored", "k": k, "run_eval_k": run_k,
        "scorer": scorer if select == "saliency" and k < 100 else None,
        "select": "dense" if (k == 100 or (not online and sel.dense)) else select,
        "round_to": round_to, "kept": int(kept), "num_patches": int(sel.num_patches), "seq_len": int(seq_len),
        "images": n, "acc1": 100.0 * hits1 / n if n else 0.0, "acc5": 100.0 * hits5 / n if n else 0.0,
        "loss": loss / n if n else float("nan"), "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
        "device": str(dev), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "batch_size": loader.batch_size,
    }
    if rule is not None:  # each image has its own K: no single k / kept / seq_len
        result.update(k=None, select="saliency", scorer=scorer, kept=None, seq_len=None)
        result.update(kept_summary(vit, loader.plan.k_rule, tally["kept"], tally["kept_keys"]))
    if predictions:
        cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64))
        result.update(keys=tally["keys"], y_true=cat(tally["y_true"]).tolist(),
                      y_pred=cat(tally["y_pred"]).tolist())
    return result


# --- the steps of evaluate_run, in the order it takes them ------------------------------------

def _read_run(run: Path) -> tuple[RunInfo, TrainConfig]:
    """The run's config.json and its TrainConfig, set up to rebuild the model without any
    weights of its own (they come from best.pt)."""
    try:
        meta = RunInfo.read(run)
    except RunDirError as e:
        raise EvaluateError(str(e), "RUN") from None
    try:
        cfg = TrainConfig.from_dict(meta.config)
    except TypeError as e:
        raise EvaluateError(f"{run}/config.json: malformed config ({_first_line(e)})", "RUN") from None
    # The weights come from best.pt: never download timm's or read the starting checkpoint.
    cfg = dataclasses.replace(cfg, pretrained=False, checkpoint=None)
    method = getattr(cfg, "method", None) or meta.config.get("method") or "dynavit"
    if method != "dynavit":  # ToMe / EViT reduce tokens inside the encoder: no kept-patch sets
        raise EvaluateError(f"{run} was trained with --method {method}; evaluate runs Dyna-ViT's kept-patch "
                            f"forward (stored or online) only", "RUN")
    return meta, cfg


def _open_run_dataset(run: Path, meta: RunInfo, cfg: TrainConfig, shards: Optional[str]):
    """(dataset path, DatasetInfo): --shards, else where the run trained (its --shards, then
    the path config.json recorded). Points `cfg.shards` at it."""
    candidates = [shards] if shards else [cfg.shards, meta.dataset.get("path")]
    dataset = next((c for c in candidates if c and Path(c, "dataset.json").is_file()), None)
    if dataset is None:
        hint = "" if shards else " (moved? pass --shards)"
        raise EvaluateError(f"{candidates[0]}: not a dynaprep dataset (no dataset.json){hint}", "--shards")
    try:
        info = open_dataset(dataset)
    except DataError as e:
        raise EvaluateError(str(e), "--shards") from None
    cfg.shards = str(dataset)
    return dataset, info


def _resolve_split(meta: RunInfo, cfg: TrainConfig, info, dataset, split: Optional[str]) -> str:
    """`split`, defaulting to the split the run validated on."""
    if split is None:
        try:
            split = meta.run.get("val_split") or pick_val_split(cfg, info)
        except ConfigError as e:
            raise EvaluateError(str(e), "--split") from None
    if split not in info.splits:
        raise EvaluateError(f"{dataset}: no split {split!r} (available: {', '.join(info.splits)})", "--split")
    return split


def _check_k_scorer(cfg: TrainConfig, k, scorer: Optional[str]) -> tuple[int, str]:
    """(K as an int, scorer name), the scorer defaulting to the run's."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= 100:
        raise EvaluateError(f"K must be an integer in 1..100, got {k!r}", "--k")
    scorer = scorer or cfg.scorer
    if scorer not in SCORERS:
        raise EvaluateError(f"unknown scorer {scorer!r}; valid scorers: {', '.join(SCORERS)}", "--scorer")
    return int(k), scorer


def _k_rule(cfg: TrainConfig, k_rule: Optional[str], k_given: bool, online: bool, info):
    """The KRule to evaluate with (--k-rule, else the run's own unless --k is given), or None."""
    text = k_rule if k_rule is not None else (None if k_given else cfg.k_rule)
    if text is None:
        return None
    if k_rule is not None and k_given:
        raise EvaluateError("--k-rule decides each image's K; leave out --k", "--k-rule")
    if online:
        raise EvaluateError("--k-rule evaluates from the stored scores; online adaptive K is `predict --k-rule`",
                            "--k-rule")
    try:
        return parse_k_rule(text)
    except ValueError as e:
        raise EvaluateError(str(e), "--k-rule") from None


def _check_options(online: bool, round_to, batch_size, workers) -> None:
    if round_to is not None and not online:
        raise EvaluateError("--round-to changes the online selection; it needs --online", "--round-to")
    if batch_size is not None and batch_size < 1:
        raise EvaluateError(f"batch size must be at least 1, got {batch_size}", "--batch-size")
    if workers is not None and workers < 0:
        raise EvaluateError(f"workers must be >= 0, got {workers}", "--workers")


def _selection(info, cfg: TrainConfig, dataset, k: int, scorer: str, online: bool):
    """(Selection the loader reads, select mode reported). Online reads every stored patch
    and DynaViT selects on the device; stored reads the dataset's kept-index arrays."""
    try:
        if online:  # the stored images, every patch: DynaViT selects on the device
            return resolve_selection(info, 100, "dense", cfg.input_size), "saliency"
        select = "dense" if k == 100 else cfg.select
        if select == "saliency" and scorer not in info.scorers:
            raise EvaluateError(f"{dataset} has no stored indices for scorer {scorer!r} (has "
                                f"{', '.join(info.scorers)}); use --online to score it on the fly",
                                "--scorer")
        return resolve_selection(info, k, select, cfg.input_size), select
    except SelectionError as e:
        if e.param in (None, "--k") and not online and k not in info.k_values():
            raise EvaluateError(f"K={k} is not indexed in {dataset} (stored K: "
                                f"{', '.join(str(v) for v in info.k_values())}; 100 = dense); --online "
                                f"selects any K on the fly", "--k") from None
        raise EvaluateError(str(e), e.param or "--k") from None


def _rebuild_model(run: Path, best: Path, cfg: TrainConfig, info, sel, ckpt: Checkpoint, dev):
    """(the run's ViT with best.pt's weights, in eval mode on `dev`; `sel` with the model's
    prefix-token count). best.pt must fit exactly (a strict load, unlike load_weights)."""
    try:
        vit = build_model(cfg, info, sel.input_size, lambda msg: None)
    except ConfigError as e:
        raise EvaluateError(f"{run}: cannot rebuild the model ({e})", "RUN") from None
    try:
        vit.load_state_dict(ckpt.model)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise EvaluateError(f"{best}: does not fit {cfg.model} ({(lines[1:] or lines)[0][:300]})", "RUN") from None
    sel = dataclasses.replace(sel, num_prefix=int(vit.num_prefix_tokens))
    vit.to(dev).eval()
    return vit, sel


def _online_net(vit, k: int, scorer: str, info, round_to, dev) -> DynaViT:
    try:
        return DynaViT(vit, k=k, scorer=scorer, mean=info.mean, std=info.std, round_to=round_to).to(dev).eval()
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"online selection: {_first_line(e)}", "--k") from None


def _eval_amp(cfg: TrainConfig, dev: torch.device) -> Optional[torch.dtype]:
    amp_dtype = resolve_amp(cfg.amp, dev)
    if amp_dtype == torch.float16 and dev.type != "cuda":
        amp_dtype = None  # fp16 autocast is a CUDA mode (training refuses it elsewhere)
    return amp_dtype


def _labelled_loader(dataset, split: str, sel, scorer: str, info, cfg: TrainConfig, batch_size, workers,
                     run=None, trust_urls: bool = False, rule=None):
    """The eval loader of `split`; a split whose samples are all unlabelled is refused.
    The run's config.json is data like a dataset folder: an images_root URL or command in
    it is used only with --trust-dataset-urls."""
    own = str(dataset) == str(cfg.shards)
    images_root = cfg.images_root if own else None
    try:
        locations.check_root(images_root, f"{run or 'the run'}/config.json", trust_urls)
    except locations.UnsafeLocationError as e:
        raise EvaluateError(str(e), locations.TRUST_OPTION) from None
    # The loader needs an index shard set to exist; online reads only its image members.
    loader_scorer = scorer if scorer in info.scorers else info.scorers[0]
    loader = build_loader(dataset, split, selection=sel, scorer=loader_scorer,
                          batch_size=batch_size or cfg.batch_size,
                          workers=cfg.workers if workers is None else workers, train=False, seed=cfg.seed,
                          images_root=images_root, trust_urls=trust_urls, k_rule=rule,
                          stream=own and cfg.stream)  # a --stream run's images may exist only as a stream
    stored_labels = getattr(getattr(loader, "table", None), "label", None)  # -1 = unlabelled
    if stored_labels is not None and len(stored_labels) and bool((np.asarray(stored_labels) < 0).all()):
        raise EvaluateError(f"split {split!r} of {dataset} has no labels; name a labelled split", "--split")
    return loader


def _score(loader, forward, dev: torch.device, amp_dtype, info, predictions: bool,
           progress: bool) -> dict[str, Any]:
    """One pass over `loader`: {'sums': [loss, top-1 hits, top-5 hits, count], 'seconds',
    and with `predictions` the 'keys', 'y_true', 'y_pred' of the labelled samples}."""
    from tqdm.auto import tqdm

    top = min(5, len(info.classes))
    # Summed on the device, read back once at the end (no per-batch host sync).
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, top-1 hits, top-5 hits, count
    keys: list[str] = []
    kept: list[int] = []  # adaptive K: every sample's count, with its key
    kept_keys: list[str] = []
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    bar = tqdm(total=loader.steps, unit="batch", desc="evaluate", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            images, keep_idx, labels = to_device(batch, dev, info.mean, info.std)
            with autocast(dev, amp_dtype):
                logits = forward(images, keep_idx)
            mask, labels, pred = _add_batch(sums, logits.float(), labels, top)
            if isinstance(keep_idx, RaggedKeep):
                kept.extend(keep_idx.counts.tolist())
                kept_keys.extend(batch.keys)
            if predictions:
                m = mask.cpu().numpy()
                keys.extend(key for key, ok in zip(batch.keys, m) if ok)
                y_true.append(labels.cpu().numpy())
                y_pred.append(pred[:, 0].cpu().numpy())
            bar.update()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    bar.close()
    return {"sums": sums.tolist(), "seconds": seconds, "keys": keys, "y_true": y_true, "y_pred": y_pred,
            "kept": kept, "kept_keys": kept_keys}


def _add_batch(sums: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, top: int):
    """Add one batch's loss and hits to `sums`; (labelled mask, their labels, their top
    predictions)."""
    mask = labels >= 0  # unlabelled samples carry -1
    if not bool(mask.all()):
        logits, labels = logits[mask], labels[mask]
    pred = logits.topk(top, dim=1).indices
    sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
    sums[1] += (pred[:, 0] == labels).double().sum()
    sums[2] += (pred == labels[:, None]).any(dim=1).double().sum()
    sums[3] += labels.shape[0]
    return mask, labels, pred


def format_result(r: dict[str, Any]) -> str:
    """The one-line summary the CLI prints."""
    if r["select"] == "dense":
        how = "dense"
    elif r["select"] == "saliency":
        how = f"{r['scorer']}"
    else:
        how = r["select"]
    rounding = f" round-to {r['round_to']}" if r.get("round_to") else ""
    size = f"K={r['k']}{rounding} (S={r['seq_len']})"
    if r.get("k_rule"):
        size = f"k-rule {r['k_rule']} (τ={r['tau']:.4g}, mean kept {r.get('mean_kept', 0):.1f}, " \
               f"{r.get('mean_gmacs', 0):.4f} GMACs/image)"
    return (f"evaluate: {r['run']} best.pt (epoch {r['epoch']}) on {r['split']} · {r['mode']} {how} "
            f"{size} · {r['images']} images · top-1 {r['acc1']:.2f}% · "
            f"top-5 {r['acc5']:.2f}% · loss {r['loss']:.4f} · {r['device']} {r['seconds']:.1f}s "
            f"({r['images_per_s']:.0f} img/s)")
