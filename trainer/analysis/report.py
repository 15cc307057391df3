"""`dynatrain report`: the K-sweep table and figures of one or more training runs.

    dynatrain report runs/k100 runs/k70 runs/k50 runs/k25 --out reports/sweep

Reads each run directory written by `dynatrain` (config.json, metrics.jsonl, best.pt) and
writes into --out:

  sweep.md, sweep.csv     one row per run, K descending: K, S (train sequence length), best
                          val acc1 and the acc5 of that epoch, mean seconds per epoch, mean
                          images/s, speedup vs the first (highest-K) row — the paper's Table 5
  acc_vs_time.png         best acc1 against mean seconds per epoch, one point per run
  acc_vs_k.png            best acc1 against K (one line per model/scorer/selection)
  curves.png              train loss and val acc1 per epoch, one line per run
  confusion-<run>.png     confusion matrix of best.pt on the eval split (re-evaluated here
  per_class-<run>.csv     with the trainer's own model builder, loader and sparse forward),
                          and per-class precision, recall, F1, support

Numbers come from metrics.jsonl as written: "best" is the highest acc1 (earliest epoch on a
tie, as the trainer picks best.pt); seconds per epoch and images/s are plain means over all
epochs (the first epoch includes warm-up). matplotlib is the `viz` extra, imported lazily.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path
import statistics
from typing import Any

import numpy as np

from dynavit.manifests import atomic_path
from dynavit.pipeline.show import MissingExtra, require_matplotlib  # one matplotlib gate for both CLIs

TABLE_FIELDS = ("run", "k", "eval_k", "seq_len", "eval_seq_len", "best_acc1", "acc5_at_best", "best_epoch",
                "epochs", "sec_per_epoch", "sec_per_epoch_min", "sec_per_epoch_max", "epoch_spread", "images_per_s",
                "speedup", "final_acc1", "model", "scorer", "select",
                "eval_split", "cm_acc1", "macro_f1", "recipe", "path")
PER_CLASS_FIELDS = ("class_index", "class_name", "precision", "recall", "f1", "support", "predicted")


class ReportError(ValueError):
    """A run directory that cannot be reported on (one line naming the file)."""



# --- reading runs ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    path: Path
    name: str  # unique within the report; used in file names
    config: dict  # the training options (config.json's "config")
    meta: dict  # the whole config.json
    metrics: list[dict]
    skipped_lines: int = 0


def load_run(path) -> Run:
    path = Path(path)
    cfg_path, metrics_path = path / "config.json", path / "metrics.jsonl"
    if not cfg_path.is_file():
        raise ReportError(f"{path}: not a dynatrain run directory (no config.json)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise ReportError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise ReportError(f"{cfg_path}: not a JSON object")
    config = meta.get("config", meta)
    if not metrics_path.is_file():
        raise ReportError(f"{path}: no metrics.jsonl (the run has not finished an epoch)")
    metrics, skipped = [], 0
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            skipped += 1
            continue
        if isinstance(record, dict) and "epoch" in record and "acc1" in record:
            metrics.append(record)
        else:
            skipped += 1
    if not metrics:
        raise ReportError(f"{metrics_path}: no complete epoch records")
    metrics.sort(key=lambda m: m["epoch"])
    return Run(path=path, name=path.resolve().name, config=config, meta=meta, metrics=metrics,
               skipped_lines=skipped)


def _unique_names(runs: list[Run]) -> None:
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", r.name) or "run" for r in runs]
    dup = [safe.count(name) > 1 for name in safe]
    for i, r in enumerate(runs):
        if dup[i]:  # same basename in different folders: prefix the parent
            parent = re.sub(r"[^A-Za-z0-9._-]+", "_", r.path.resolve().parent.name)
            safe[i] = f"{parent}-{safe[i]}" if parent else safe[i]
    seen: dict[str, int] = {}
    for i, r in enumerate(runs):
        n = seen.get(safe[i], 0)
        seen[safe[i]] = n + 1
        r.name = safe[i] if n == 0 else f"{safe[i]}-{n + 1}"


def _median(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.median(values) if values else None


# Epoch times whose range exceeds this share of their median make a speed-up uncertain: one
# epoch slowed by other load on a shared machine moves a mean that much (a report once showed
# a 7.69x "speed-up" where the compute ideal was 4x).
SPREAD_WARNING = 0.25


def _spread(times: list) -> tuple[float | None, float | None, float | None]:
    """(min, max, (max - min) / median) of the epoch times."""
    times = [float(t) for t in times if t is not None]
    if not times:
        return None, None, None
    med = statistics.median(times)
    return min(times), max(times), (max(times) - min(times)) / med if med > 0 else None


def run_row(run: Run) -> dict[str, Any]:
    """The table row of one run, straight from its metrics."""
    ms = run.metrics
    best = max(ms, key=lambda m: (m["acc1"], -m["epoch"]))  # earliest epoch on a tie, like best.pt
    cfg = run.config
    k = ms[-1].get("k", cfg.get("k"))
    if k is None and cfg.get("select") == "dense":
        k = 100
    eval_k = ms[-1].get("eval_k", cfg.get("eval_k") if cfg.get("eval_k") is not None else k)
    run_meta = run.meta.get("run", {}) if isinstance(run.meta.get("run"), dict) else {}
    from dynavit.trainer.recipe import describe  # imports torch and timm: only when a row is built
    return {
        "run": run.name,
        "k": k,
        "eval_k": eval_k,
        "seq_len": ms[-1].get("seq_len", run_meta.get("seq_len")),
        "eval_seq_len": ms[-1].get("eval_seq_len", run_meta.get("eval_seq_len")),
        "best_acc1": float(best["acc1"]),
        "acc5_at_best": None if best.get("acc5") is None else float(best["acc5"]),
        "best_epoch": int(best["epoch"]),
        "epochs": len(ms),
        "sec_per_epoch": _median(m.get("epoch_seconds") for m in ms),
        **dict(zip(("sec_per_epoch_min", "sec_per_epoch_max", "epoch_spread"),
                   _spread([m.get("epoch_seconds") for m in ms]))),
        "images_per_s": _median(m.get("images_per_s") for m in ms),
        "speedup": None,
        "final_acc1": float(ms[-1]["acc1"]),
        "model": cfg.get("model"),
        "scorer": cfg.get("scorer"),
        "select": cfg.get("select"),
        "eval_split": run_meta.get("val_split") or cfg.get("val_split"),
        "cm_acc1": None,
        "macro_f1": None,
        "recipe": describe(cfg),  # flips, EMA, mixing, ... away from their defaults
        "path": str(run.path.resolve()),
    }


def sweep_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows sorted by K descending (then run name); speedup = the first row's median s/epoch over
    this row's (medians: one epoch slowed by other load does not move them)."""
    rows = sorted((run_row(r) for r in runs), key=lambda r: (-(r["k"] if r["k"] is not None else -1), r["run"]))
    top = rows[0]["sec_per_epoch"] if rows else None
    for r in rows:
        if top and r["sec_per_epoch"]:
            r["speedup"] = top / r["sec_per_epoch"]
    return rows


# --- classification metrics -----------------------------------------------------------------

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    bad = (y_true < 0) | (y_true >= num_classes) | (y_pred < 0) | (y_pred >= num_classes)
    if bad.any():
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_metrics(cm) -> list[dict[str, float | int]]:
    """Precision, recall, F1, support (true count) and predicted count per class of a
    confusion matrix (rows true, columns predicted). 0/0 is reported as 0.0."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    out = []
    for c in range(cm.shape[0]):
        p = tp[c] / predicted[c] if predicted[c] else 0.0
        r = tp[c] / support[c] if support[c] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out.append({"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(support[c]),
                    "predicted": int(predicted[c])})
    return out


# --- predictions of best.pt -----------------------------------------------------------------

def predict(run_dir, split: str | None = None, *, device: str = "auto", batch_size: int | None = None,
            workers: int = 0, shards: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(y_true, y_pred, class_names) of the run's best.pt on `split` (default: the run's
    validation split), with the trainer's own model builder, loader, normalisation, sparse
    forward and autocast setting, at the run's eval K. Unlabeled samples are left out."""
    import torch

    from dynavit.trainer.config import ConfigError, TrainConfig, pick_val_split
    from dynavit.trainer.data import DataError, build_loader, open_dataset
    from dynavit.trainer.model import build_model
    from dynavit.trainer.rundir import Checkpoint, RunDirError
    from dynavit.trainer.runtime import autocast, resolve_amp, resolve_device, to_device
    from dynavit.trainer.selection import SelectionError, resolve_selection
    from dynavit.trainer.methods.sparse import sparse_forward

    run = load_run(run_dir) if not isinstance(run_dir, Run) else run_dir
    cfg = TrainConfig.from_dict(run.config)
    # The weights come from best.pt: never download timm's or read the starting checkpoint.
    cfg = dataclasses.replace(cfg, pretrained=False, checkpoint=None)
    candidates = [shards] if shards else [cfg.shards, run.meta.get("dataset", {}).get("path")]
    dataset = next((c for c in candidates if c and Path(c, "dataset.json").is_file()), None)
    if dataset is None:
        raise ReportError(f"{run.path}: dataset {candidates[0]!r} not found (moved? pass --shards)")
    best = run.path / "best.pt"
    if not best.is_file():
        raise ReportError(f"{run.path}: no best.pt")
    try:
        info = open_dataset(dataset)
        cfg.shards = dataset
        split = split or run.meta.get("run", {}).get("val_split") or pick_val_split(cfg, info)
        train_sel = resolve_selection(info, cfg.k, cfg.select, cfg.input_size)
        eval_k = train_sel.k if cfg.eval_k is None else cfg.eval_k
        sel = resolve_selection(info, eval_k, "dense" if eval_k == 100 else cfg.select, cfg.input_size)
        vit = build_model(cfg, info, sel.input_size, lambda msg: None)
        vit.load_state_dict(Checkpoint.load(best).model)
        dev = resolve_device(device)
        amp_dtype = resolve_amp(cfg.amp, dev)
        vit.to(dev).eval()
        loader = build_loader(dataset, split, selection=sel, scorer=cfg.scorer,
                              batch_size=batch_size or cfg.batch_size, workers=workers, train=False, seed=cfg.seed)
    except (ConfigError, SelectionError, DataError, RunDirError, RuntimeError, KeyError, OSError) as e:
        raise ReportError(f"{run.path}: cannot evaluate best.pt ({str(e).splitlines()[0]})") from None

    y_true, y_pred = [], []
    with torch.no_grad():
        for batch in loader:
            images, keep_idx, labels = to_device(batch, dev, info.mean, info.std)
            with autocast(dev, amp_dtype):
                logits = sparse_forward(vit, images, keep_idx, validate=False)
            keep = labels >= 0
            y_true.append(labels[keep].cpu().numpy())
            y_pred.append(logits.float().argmax(dim=1)[keep].cpu().numpy())
    cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64))
    return cat(y_true), cat(y_pred), list(info.classes)


# --- writing --------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)  # str(float) round-trips exactly


def write_csv(path: Path, fields, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(fields)
            for row in rows:
                w.writerow([_cell(row.get(name)) for name in fields])


def _fmt(value, digits=2, suffix="") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def sweep_markdown(rows: list[dict]) -> str:
    lines = ["# K sweep", "",
             "Best validation top-1 over epochs (and top-5 at that epoch); time and throughput are medians "
             "over the epochs of each run, spread = (slowest − fastest epoch) / median. S = prefix tokens + "
             "kept patches; speedup = median seconds per epoch of the first row / this row's.", "",
             "| K | S | top-1 (%) | top-5 (%) | best epoch | s / epoch | spread | img / s | speedup | run |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        k = r["k"] if r["eval_k"] in (None, r["k"]) else f"{r['k']} (eval {r['eval_k']})"
        lines.append(f"| {k} | {r['seq_len'] if r['seq_len'] is not None else '–'} | {_fmt(r['best_acc1'])} | "
                     f"{_fmt(r['acc5_at_best'])} | {r['best_epoch']}/{r['epochs']} | {_fmt(r['sec_per_epoch'])} | "
                     f"{_fmt(None if r['epoch_spread'] is None else 100 * r['epoch_spread'], 0, '%')} | "
                     f"{_fmt(r['images_per_s'], 1)} | {_fmt(r['speedup'], 2, '×')} | {r['run']} |")
    details = sorted({(r["model"], r["scorer"], r["select"]) for r in rows}, key=str)
    lines += ["", "Runs: " + "; ".join(f"{m} · scorer {s} · select {sel}" for m, s, sel in details)]
    if any(r.get("recipe", "default") != "default" for r in rows):
        lines += ["", "Recipe (options away from their defaults): " + "; ".join(
            f"{r['run']}: {r['recipe']}" for r in rows)]
    if any(r["cm_acc1"] is not None for r in rows):
        lines += ["", "| run | split | top-1 of best.pt re-evaluated (%) | macro F1 |", "|:---|:---|---:|---:|"]
        for r in rows:
            if r["cm_acc1"] is not None:
                lines.append(f"| {r['run']} | {r['eval_split'] or '–'} | {_fmt(r['cm_acc1'])} | "
                             f"{_fmt(r['macro_f1'], 4)} |")
    return "\n".join(lines) + "\n"


def _save(fig, canvas, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def _label(row) -> str:
    # The selection matters as much as K (saliency vs random at the same K is the question).
    select = row.get("select")
    return f"K={row['k']}" if select in (None, "saliency", "dense") else f"K={row['k']} {select}"


def plot_acc_vs_time(rows, path: Path) -> None:
    Figure, Canvas = require_matplotlib()
    fig = Figure(figsize=(6, 4.5), dpi=100)
    canvas = Canvas(fig)
    ax = fig.add_subplot()
    xs = [r["sec_per_epoch"] for r in rows]
    ys = [r["best_acc1"] for r in rows]
    ax.scatter([x if x is not None else np.nan for x in xs], ys, zorder=3)
    for r, x, y in zip(rows, xs, ys):
        if x is not None:
            ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.margins(0.15)
    ax.set_xlabel("mean seconds / epoch")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title("accuracy vs training time")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, canvas, path)


def plot_acc_vs_k(rows, path: Path) -> None:
    Figure, Canvas = require_matplotlib()
    fig = Figure(figsize=(6, 4.5), dpi=100)
    canvas = Canvas(fig)
    ax = fig.add_subplot()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["scorer"], r["select"]), []).append(r)
    for (model, scorer, select), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["k"] if r["k"] is not None else -1)
        ax.plot([r["k"] for r in rs], [r["best_acc1"] for r in rs], marker="o",
                label=f"{model} · {scorer} · {select}" if len(groups) > 1 else None)
        for r in rs:
            if r["seq_len"] is not None:
                ax.annotate(f"S={r['seq_len']}", (r["k"], r["best_acc1"]), textcoords="offset points",
                            xytext=(4, -12), fontsize=8)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    ax.margins(0.12)
    ax.set_xlabel("K (% of patches kept)")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title("accuracy vs K")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, canvas, path)


def plot_curves(runs: list[Run], rows, path: Path) -> None:
    Figure, Canvas = require_matplotlib()
    fig = Figure(figsize=(11, 4.2), dpi=100)
    canvas = Canvas(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    by_name = {r.name: r for r in runs}
    for row in rows:
        run = by_name[row["run"]]
        epochs = [m["epoch"] for m in run.metrics]
        label = f"{_label(row)} · {run.name}"
        ax_loss.plot(epochs, [m.get("train_loss", np.nan) for m in run.metrics], marker=".", label=label)
        ax_acc.plot(epochs, [m["acc1"] for m in run.metrics], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, canvas, path)


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    Figure, Canvas = require_matplotlib()
    c = cm.shape[0]
    side = min(20.0, max(4.5, 0.45 * c + 2.5))
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    canvas = Canvas(fig)
    ax = fig.add_subplot()
    support = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)
    im = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rate[i, j] > 0.5 else "black")
    if c <= 50:
        ax.set_xticks(range(c), labels=classes, rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, canvas, path)


def build_report(runs, out_dir, *, confusion: bool = True, split: str | None = None, device: str = "auto",
                 batch_size: int | None = None, workers: int = 0, shards: str | None = None,
                 log=lambda msg: None) -> dict[str, Any]:
    """Write the sweep table, plots and (with `confusion`) per-run confusion matrices into
    `out_dir`; returns {"rows", "files", "confusion": {run: cm}, "per_class": {run: [..]},
    "warnings"}. Raises ReportError for an unreadable run (before writing anything)."""
    loaded = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not loaded:
        raise ReportError("no runs given")
    require_matplotlib()
    _unique_names(loaded)
    rows = sweep_rows(loaded)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, warnings, cms, per_class = [], [], {}, {}
    for run in loaded:
        if run.skipped_lines:
            warnings.append(f"{run.path}: skipped {run.skipped_lines} unreadable metrics.jsonl line(s)")

    if confusion:
        by_name = {r.name: r for r in loaded}
        for row in rows:
            run = by_name[row["run"]]
            try:
                y_true, y_pred, classes = predict(run, split, device=device, batch_size=batch_size,
                                                  workers=workers, shards=shards)
            except ReportError as e:
                warnings.append(f"no confusion matrix for {run.name}: {e}")
                continue
            if y_true.size == 0:
                warnings.append(f"no confusion matrix for {run.name}: the split has no labeled samples")
                continue
            cm = confusion_matrix(y_true, y_pred, len(classes))
            metrics = per_class_metrics(cm)
            row["cm_acc1"] = 100.0 * float(np.trace(cm)) / float(cm.sum())
            row["macro_f1"] = float(np.mean([m["f1"] for m in metrics]))
            used_split = split or row["eval_split"]
            row["eval_split"] = used_split
            cms[run.name], per_class[run.name] = cm, metrics
            csv_path = out / f"per_class-{run.name}.csv"
            write_csv(csv_path, PER_CLASS_FIELDS,
                      [{"class_index": i, "class_name": classes[i], **m} for i, m in enumerate(metrics)])
            png_path = out / f"confusion-{run.name}.png"
            plot_confusion(cm, classes, f"{run.name} · K={row['eval_k']} · {used_split or 'val'} · "
                                        f"top-1 {row['cm_acc1']:.2f}% (n={int(cm.sum())})", png_path)
            files += [csv_path, png_path]
            log(f"  {run.name}: best.pt top-1 {row['cm_acc1']:.2f}% on {used_split} ({int(cm.sum())} images)")

    for row in rows:
        if row["epoch_spread"] is not None and row["epoch_spread"] > SPREAD_WARNING:
            warnings.append(f"{row['run']}: epoch times range {row['sec_per_epoch_min']:.1f}–"
                            f"{row['sec_per_epoch_max']:.1f} s ({100 * row['epoch_spread']:.0f}% of the median); "
                            f"its speed-up is uncertain (other load on the machine?)")
    write_csv(out / "sweep.csv", TABLE_FIELDS, rows)
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(rows))
    plot_acc_vs_time(rows, out / "acc_vs_time.png")
    plot_acc_vs_k(rows, out / "acc_vs_k.png")
    plot_curves(loaded, rows, out / "curves.png")
    files = [out / "sweep.md", out / "sweep.csv", out / "acc_vs_time.png", out / "acc_vs_k.png",
             out / "curves.png", *files]
    return {"rows": rows, "files": [str(f) for f in files], "confusion": cms, "per_class": per_class,
            "warnings": warnings}
