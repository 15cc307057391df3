"""The click commands of dynatrain's tools: flops, bench, bench-step, bench-report, report,
predict, bench-infer, bench-compare.

Only option parsing, output and the mapping from errors to exit codes live here; the work
is in the library modules named by each command (flops.py, bench.py, bench_step.py,
bench_report.py, report.py). `dynatrain` registers these in cli.py.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import click
import torch

from dynavit.manifests import write_json_atomic
from dynavit.manifests.inputs import DEFAULT_MAX_FILE_BYTES
from dynavit.manifests.locations import TRUST_OPTION
from dynavit.pipeline.cli_types import MAX_IMAGE_SIZE, FiniteFloat, out_dir, out_file
from dynavit.manifests.options import parse_k_list, parse_triple

from .bench import format_bench, run_bench
from .bench_compare import compare as compare_methods
from .bench_compare import format_compare
from .bench_infer import format_table as format_infer_table
from .bench_infer import run_bench as run_infer_bench
from .bench_report import BenchmarkFailed, write_report
from .bench_step import AMP_DTYPES
from .bench_step import bench as bench_step
from .budget import budget_table, match_budgets
from .model import budget_record, make_heads
from .selection import LEARNED
from .compare import compare_runs, write_compare
from .flops import build_meta_model, closed_form_coeffs, flops_table, model_dims
from .predict import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, SCORERS, PredictError, list_images, load_model,
                      predict, write_rows)
from .report import MissingExtra, ReportError, build_report, load_run, require_matplotlib


def k_list(ctx, param, value: str) -> list[int]:
    """click callback around the one K-list parser: a bad --k is a usage error (exit 2)."""
    try:
        return parse_k_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def json_object(ctx, param, value):
    """click callback: a JSON object option (e.g. --model-kwargs)."""
    if value is None:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
    return obj


_out_dir, _out_file = out_dir, out_file  # click callbacks shared with dynaprep (pipeline/cli_types.py)


@click.command("flops")
@click.option("--model", "model_name", default="vit_base_patch16_224", show_default=True,
              help="timm VisionTransformer name; built with pretrained=False on the meta "
                   "device (no weights are downloaded or allocated).")
@click.option("--k", "ks", default="100,90,70,60,50,30,25", show_default=True,
              callback=k_list, help="Comma-separated keep percentages K (100 = dense).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_out_file,
              help="Also write the table, the fit and the closed form to this JSON file.")
@click.option("--method", type=click.Choice(["dynavit", "all"]), default="dynavit", show_default=True,
              help="all: also the parameter of ToMe, EViT, DynamicViT, TNT and Token Cropr whose exact "
                   "MACs match Dyna-ViT's at each K < 100 (what dynatrain --method picks).")
@click.option("--model-kwargs", default=None, callback=json_object,
              help="JSON keyword arguments for timm.create_model, as in training, e.g. "
                   "'{\"img_size\": 128, \"num_classes\": 10}' to match a run's model.")
@click.option("--device", type=click.Choice(["meta", "cpu", "cuda"]), default="meta", show_default=True,
              help="Where the counted forwards run: meta (shapes only, instant) or a real device with "
                   "random weights. The MACs are the same on each (a check, not a choice of figure).")
def flops_command(model_name: str, ks: list[int], json_path: Optional[str], method: str,
                  model_kwargs: dict, device: str) -> None:
    """Exact MACs of the sparse forward per K, the fitted alpha·S²+beta·S+gamma model, and
    what an fvcore-style count that skips attention (SDPA) would report. Counted by
    dynavit's own formulas from shapes: the same figures on every device and torch version."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    try:
        model = build_meta_model(model_name, **model_kwargs)
        if device != "meta":
            import timm

            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=False, **model_kwargs).to(device).eval()
        dims = model_dims(model)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise click.BadParameter(str(e).splitlines()[0] if str(e) else type(e).__name__,
                                 param_hint="--model/--model-kwargs")
    rows, fit = flops_table(model, ks)
    cf = closed_form_coeffs(**dims)

    click.echo(f"{model_name}: N={dims['N']} D={dims['dim']} depth={dims['depth']} "
               f"(1 GMAC = 1e9 multiply-adds = 2 GFLOPs)")
    head = f"{'K':>4} {'S':>5} {'GMACs':>9} {'fit':>9} {'rel.err':>9} {'no-attn':>9}"
    click.echo(head)
    for r in rows:
        fit_s = f"{r['fit_gmacs']:9.4f} {r['rel_err']:9.2e}" if fit else f"{'-':>9} {'-':>9}"
        click.echo(f"{r['K']:>4} {r['S']:>5} {r['gmacs']:9.4f} {fit_s} {r['gmacs_no_attn']:9.4f}")
    if fit:
        click.echo(f"fit: alpha={fit['alpha']:.6g} beta={fit['beta']:.6g} "
                   f"gamma={fit['gamma']:.6g} max rel err={fit['max_rel_err']:.2e}")
    else:
        click.echo("fit: needs at least 3 distinct S")
    click.echo(f"closed form: alpha={cf[0]} beta={cf[1]} gamma={cf[2]}")
    click.echo("no-attn = total minus SDPA (QKᵀ, AV), i.e. what fvcore reports")
    budgets = None
    if method == "all":
        budgets = match_budgets(model, [k for k in ks if k < 100])
        for b in budgets:
            b["model"] = model_name
        click.echo("\nmatched budgets (exact MACs of each method's own forward):")
        click.echo(budget_table(budgets))
        click.echo("\nlearned methods (their heads' MACs included):")
        learned = []
        for k in (k for k in ks if k < 100):
            for name in LEARNED:
                rec = budget_record(model, name, k, make_heads(model, name, model.num_classes))
                learned.append(rec)
                click.echo(f"{k:>4} {name:<11} {rec['described']}  {rec['macs'] / 1e9:.4f} GMACs")

    if json_path:
        doc = dict(model=model_name, dims={**dims, "patch": list(dims["patch"])}, rows=rows,
                   fit=fit, closed_form=dict(alpha=cf[0], beta=cf[1], gamma=cf[2]),
                   unit="MACs, counted by dynavit.trainer.macs (formulas from shapes; device- and version-independent)", budgets=budgets,
                   learned=learned if method == "all" else None, model_kwargs=model_kwargs,
                   device=device)
        write_json_atomic(json_path, doc)


@click.command("bench-step")
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm VisionTransformer name (random weights, pretrained=False).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1),
              help="Images per step.")
@click.option("--k", "ks", default="100,70,50,25", show_default=True, callback=k_list,
              help="Comma-separated keep percentages; dense timm forward is always added.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1),
              help="Timed steps per configuration per repeat.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0),
              help="Untimed steps per configuration before timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Interleaved rounds over all configurations; the median is reported.")
@click.option("--amp", type=click.Choice(list(AMP_DTYPES)), default="off", show_default=True,
              help="Autocast dtype.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="Where to run.")
@click.option("--infer", is_flag=True, help="Time inference (forward only) instead of a "
              "train step (forward, backward, AdamW step).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_out_file,
              help="Also write the rows and the settings to this JSON file.")
def bench_step_command(model_name, batch, ks, steps, warmup, repeats, amp, device, infer, json_path):
    """Measured vs ideal speed-up of the sparse forward over dense timm, synthetic data."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    try:
        rows = bench_step(model_name, ks, batch, steps, warmup, repeats, amp, device, infer)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise click.BadParameter(str(e).splitlines()[0], param_hint="--model")
        raise
    what = "inference" if infer else "train step (fwd+bwd+AdamW)"
    click.echo(f"{model_name} batch={batch} amp={amp} device={device} "
               f"threads={torch.get_num_threads()} {what}")
    click.echo(f"{'K':>6} {'S':>5} {'img/s':>9} {'speedup':>8} {'ideal':>7} {'ratio':>6} "
               f"{'spread':>7}")
    for r in rows:
        click.echo(f"{r['K']!s:>6} {r['S']:>5} {r['imgs_per_s']:9.1f} {r['speedup']:8.3f} "
                   f"{r['ideal_speedup']:7.3f} {r['efficiency']:6.3f} {r['spread']:7.1%}")
    if json_path:
        doc = dict(model=model_name, batch=batch, amp=amp, device=device, infer=infer,
                   steps=steps, warmup=warmup, repeats=repeats,
                   threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)
        write_json_atomic(json_path, doc)
    return rows


@click.command("bench")
@click.option("--shards", type=click.Path(exists=True, file_okay=False), required=True,
              help="A dataset directory written by dynaprep (its image size sets the model's).")
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True, help="timm ViT name.")
@click.option("--model-kwargs", default="{}", show_default=True, help="Extra timm.create_model kwargs (JSON).")
@click.option("--k", "ks", default="100,50,25", show_default=True, callback=k_list,
              help="K values (100 = dense via sparse_forward).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1), help="Timed steps per repeat.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Interleaved repeats (median).")
@click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True, help="Autocast dtype.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--workers", default="1,2", show_default=True, help="Loader worker counts to measure.")
@click.option("--scorer", default=None, help="Index shard set the loader reads. [default: the dataset's first scorer]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_out_file, help="Also write the results here.")
def bench_command(shards, model_name, model_kwargs, ks, batch, steps, repeats, amp, device, workers, scorer, json_path):
    """Train-step / inference images/s per K with ideal speed-ups, and loader vs decode floor."""
    try:
        kwargs = json.loads(model_kwargs)
        worker_counts = [int(w) for w in workers.split(",")]
    except ValueError as e:
        raise click.UsageError(f"bad --model-kwargs or --workers: {e}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    result = run_bench(shards, model_name, kwargs, ks, batch, steps, repeats, amp, device, worker_counts, scorer)
    click.echo(format_bench(result))
    if json_path:
        write_json_atomic(json_path, result)


@click.command("report", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_out_dir,
              help="Report directory (created): sweep.md, sweep.csv, acc_vs_time.png, acc_vs_k.png, curves.png, "
                   "confusion-<run>.png, per_class-<run>.csv.")
@click.option("--confusion/--no-confusion", default=True, show_default=True,
              help="Re-evaluate each run's best.pt for the confusion matrix and per-class metrics.")
@click.option("--split", default=None, help="Split for the confusion matrices. [default: each run's val split]")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Dataset directory, if it moved since training. [default: the one in config.json]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device for the re-evaluation.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Eval batch size. [default: the run's]")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data loading workers.")
def report_command(runs, out_dir, confusion, split, shards, device, batch_size, workers):
    """Summarise training runs: K-sweep table (sweep.md/.csv), accuracy/time plots, learning
    curves, and per-run confusion matrices with per-class precision/recall/F1."""
    try:
        loaded = [load_run(r) for r in runs]
    except ReportError as e:
        raise click.BadParameter(str(e), param_hint="RUN") from None
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise click.BadParameter("no CUDA device is available", param_hint="'--device'")
    try:
        require_matplotlib()
        result = build_report(loaded, out_dir, confusion=confusion, split=split, device=device,
                              batch_size=batch_size, workers=workers, shards=shards, log=click.echo)
    except MissingExtra as e:
        raise click.ClickException(str(e)) from None
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    best = max(result["rows"], key=lambda r: r["best_acc1"])
    click.echo(f"dynatrain report: {len(result['rows'])} runs → {out_dir}/sweep.md "
               f"(best top-1 {best['best_acc1']:.2f}% at K={best['k']}); {len(result['files'])} files")


@click.command("bench-report")
@click.option("--out", default="docs/BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False),
              callback=_out_file)
@click.option("--work", default="out/bench", show_default=True, type=click.Path(file_okay=False),
              help="Where benchmark data is generated (kept between runs).")
@click.option("--quick", is_flag=True, help="Smaller sizes (a smoke run, not figures to publish).")
def bench_report_command(out, work, quick):
    """Run the kernel, dynaprep, FLOP and dynatrain benchmarks; write the Markdown report (`make bench`)."""
    try:
        write_report(out, work, quick, log=lambda m: click.echo(m, err=True))
    except BenchmarkFailed as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}")


# --- predict ----------------------------------------------------------------------------------

def _parse_triple(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_triple(value, positive="std" if param.name == "std" else None)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_device(ctx, param, value):
    if value in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise click.BadParameter(f"{value!r}: use cpu, cuda[:N] or auto")
    return str(dev)


def _check_predict_out(ctx, param, value):
    p = Path(value)
    if p.suffix.lower() not in (".csv", ".parquet"):
        raise click.BadParameter(f"{value}: must end in .csv or .parquet")
    if p.is_dir():
        raise click.BadParameter(f"{value} is a folder")
    _out_file(ctx, param, value)
    return p


@click.command("predict", context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, callback=_check_predict_out, metavar="FILE.csv|FILE.parquet",
              help="Output table, one row per input image (format from the extension).")
@click.option("--k", type=click.IntRange(1, 100), default=100, show_default=True,
              help="Percent of patches kept (100 = dense, no scoring).")
@click.option("--scorer", type=click.Choice(SCORERS), default=None,
              help="Patch saliency score (docs/FORMAT.md), computed online on the device. "
                   "[default: the scorer the checkpoint's run trained with, else l2]")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="Round the sequence length up to a multiple of this (e.g. 8); keeps a few more patches.")
@click.option("--device", default="auto", show_default=True, callback=_parse_device,
              help="cpu, cuda, cuda:N, or auto (cuda if available).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass.")
@click.option("--model", "model_name", default=None,
              help="timm model name; required for a plain state_dict, overrides a checkpoint's.")
@click.option("--model-kwargs", callback=json_object, default=None, metavar="JSON",
              help="Extra timm.create_model kwargs, e.g. '{\"depth\": 6}' (added to the checkpoint's).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classes of a plain state_dict (default: rows of head.weight).")
@click.option("--image-size", type=click.IntRange(1, MAX_IMAGE_SIZE), default=None,
              help="Input size (default: the checkpoint's input size / pos_embed grid).")
@click.option("--crop-pct", type=FiniteFloat(0, 1, min_open=True), default=0.875,
              show_default=True, help="Center-crop fraction (resize short side to size/crop_pct).")
@click.option("--mean", callback=_parse_triple, default=None, metavar="R,G,B",
              help="Normalization mean (default: the checkpoint's, else ImageNet).")
@click.option("--std", callback=_parse_triple, default=None, metavar="R,G,B",
              help="Normalization std (default: the checkpoint's, else ImageNet).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes reported per image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--max-file-bytes", default=DEFAULT_MAX_FILE_BYTES, show_default=True, type=click.IntRange(min=1),
              help="Images larger than this are failed rows, not read; only regular files are read "
                   "(a FIFO or a link to a device is a failed row).")
def predict_command(checkpoint, images, out, k, scorer, round_to, device, batch_size, model_name,
                    model_kwargs, num_classes, image_size, crop_pct, mean, std, top, overwrite, progress,
                    max_file_bytes):
    """Classify IMAGES (files or folders) with a trained ViT, pruning tokens online.

    CHECKPOINT is a dynatrain checkpoint (best.pt / last.pt) or a plain timm state_dict (then
    --model is needed). Unreadable images become rows with status 'failed' and the reason.
    """
    if out.exists() and not overwrite:
        raise click.BadParameter(f"{out} exists (pass --overwrite to replace it)", param_hint="--out")
    try:
        vit, classes, info = load_model(checkpoint, model_name, num_classes, image_size, model_kwargs)
    except PredictError as e:
        raise click.BadParameter(str(e), param_hint="CHECKPOINT") from None
    if image_size is not None and info["image_size"] != (image_size, image_size):
        raise click.BadParameter(f"model input is {info['image_size']}, not {image_size}",
                                 param_hint="--image-size")
    patch = int(vit.patch_embed.patch_size[0])
    if any(s % patch for s in info["image_size"]):
        raise click.BadParameter(f"{info['image_size']} is not a multiple of patch {patch}",
                                 param_hint="--image-size")
    try:
        files = list_images(images)
    except PredictError as e:
        raise click.BadParameter(str(e), param_hint="IMAGES") from None
    if not files:
        raise click.UsageError("no images found in the given IMAGES (extensions: "
                               + ", ".join(IMAGE_EXTENSIONS) + ")")
    scorer = scorer or (info.get("scorer") if info.get("scorer") in SCORERS else "l2")
    mean = mean or info.get("mean") or IMAGENET_MEAN
    std = std or info.get("std") or IMAGENET_STD
    if progress is None:
        progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        rows = predict(vit, files, k=k, scorer=scorer, device=device, batch_size=batch_size,
                       mean=mean, std=std, top=top, classes=classes, round_to=round_to,
                       crop_pct=crop_pct, progress=progress, max_file_bytes=max_file_bytes)
    except PredictError as e:
        raise click.UsageError(str(e)) from None
    write_rows(rows, out, top)
    ok = sum(r["status"] == "ok" for r in rows)
    dt = time.perf_counter() - t0
    click.echo(f"predict: {len(rows)} images, {ok} ok, {len(rows) - ok} failed, "
               f"{info['model_name']} K={k} {scorer} on {device}, {dt:.1f}s "
               f"({len(rows) / max(dt, 1e-9):.1f} img/s) -> {out}", err=True)


# --- bench-infer ---------------------------------------------------------------------------------

def _bench_infer_list(ctx, param, value):
    try:
        out = [v.strip() for v in value.split(",") if v.strip()]
    except AttributeError:
        raise click.BadParameter("expected a comma-separated list") from None
    if not out:
        raise click.BadParameter("expected a comma-separated list")
    if param.name == "k":
        try:
            ks = [int(v) for v in out]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a list of integers") from None
        if any(not 1 <= k <= 100 for k in ks):
            raise click.BadParameter("K must be in 1..100")
        return ks
    bad = [v for v in out if v not in SCORERS]
    if bad:
        raise click.BadParameter(f"unknown scorer(s) {', '.join(bad)}; valid: {', '.join(SCORERS)}")
    return out


@click.command("bench-infer", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", default="vit_tiny_patch16_224", show_default=True, help="timm ViT name.")
@click.option("--model-kwargs", default="{}", show_default=True, help="Extra timm.create_model kwargs (JSON).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size.")
@click.option("--k", default="100,70,50,25", show_default=True, callback=_bench_infer_list,
              help="Percents of patches kept.")
@click.option("--scorers", default=",".join(SCORERS), show_default=True, callback=_bench_infer_list,
              help="Online scorers to time.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--round-to", type=click.IntRange(min=0), default=8, show_default=True,
              help="Also time S rounded up to a multiple of this (0: off).")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--latency/--no-latency", default=True, show_default=True, help="Also time batch 1.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile every module first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, callback=_out_file, help="Also write raw timings.")
def bench_infer_command(model, model_kwargs, batch, k, scorers, device, precision, round_to, reps, iters, warmup,
                        latency, compile_, threads, json_out):
    """Images/s of dense vs sparse (precomputed indices) vs online Dyna-ViT per scorer and K."""
    try:
        kwargs = json.loads(model_kwargs)
        assert isinstance(kwargs, dict)
    except (json.JSONDecodeError, AssertionError):
        raise click.BadParameter("must be a JSON object", param_hint="--model-kwargs") from None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a torch device", param_hint="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    click.echo(f"bench_infer: {model} batch {batch} K={k} on {device} ...", err=True)
    res = run_infer_bench(model, batch, k, scorers, device, precision, round_to or None, reps, iters,
                    warmup, latency, model_kwargs=kwargs, compile=compile_,
                    log=lambda s: click.echo(s, err=True))
    click.echo(format_infer_table(res))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
    click.echo(f"bench_infer: done in {time.perf_counter() - t0:.0f}s", err=True)


# --- bench-compare -------------------------------------------------------------------------------

@click.command("bench-compare")
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm VisionTransformer to benchmark (random weights, nothing downloaded).")
@click.option("--k", "ks", default="70,50", show_default=True, callback=k_list,
              help="Comma-separated Dyna-ViT keep percentages K; ToMe and EViT are matched "
                   "to each K's exact MACs.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1),
              help="Images per forward.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1),
              help="Forwards per timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Timings per configuration (interleaved); median and fastest are reported.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Untimed forwards per configuration first.")
@click.option("--ref-model", default="vit_base_patch16_224", show_default=True,
              help="Model whose matched parameters and GMACs are printed alongside "
                   "(counted on the meta device); '' for none.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--threads", default=0, type=click.IntRange(0),
              help="torch intra-op threads (0: torch's default).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="wall: elapsed time; cpu: this process's CPU time (steadier on a machine "
                   "shared with other jobs; use with --threads 1).")
@click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True,
              help="Run every forward under bf16 autocast (as --amp bf16 trains and infers).")
@click.option("--model-kwargs", default="{}", show_default=True, help="Extra timm.create_model kwargs (JSON).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_out_file,
              help="Also write the results to this JSON file.")
def bench_compare_command(model_name, ks, batch, steps, repeats, warmup, ref_model, device, threads, clock,
                          amp, model_kwargs, json_path):
    """Dyna-ViT vs ToMe vs EViT at matched exact MACs: GMACs and inference img/s."""
    if threads:
        torch.set_num_threads(threads)
    try:
        kwargs = json.loads(model_kwargs)
    except ValueError as e:
        raise click.UsageError(f"bad --model-kwargs: {e}") from None
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available", param_hint="--device")
        res = compare_methods(model_name, ks, batch=batch, steps=steps, repeats=repeats,
                      warmup=warmup, ref_model=ref_model or None, device=device, clock=clock, amp=amp,
                      model_kwargs=kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise click.UsageError(str(e).splitlines()[0])
    click.echo(format_compare(res))
    if json_path:
        d = os.path.dirname(os.path.abspath(json_path))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, json_path)


# --- evaluate ------------------------------------------------------------------------------------

@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--online", is_flag=True,
              help="Read the stored images densely and score + select the patches on the device "
                   "(DynaViT); no stored indices are used, so any --k and --scorer work.")
@click.option("--k", type=click.IntRange(1, 100), default=None,
              help="Percent of patches kept (100 = dense). Without --online it must be indexed in the "
                   "dataset. [default: the run's eval K]")
@click.option("--scorer", type=click.Choice(SCORERS), default=None,
              help="Saliency scorer: online, computed on the device; otherwise the stored index shards "
                   "of that scorer. [default: the run's]")
@click.option("--split", default=None, help="Split to evaluate. [default: the run's val split]")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Dataset directory, if it moved since training. [default: the one in config.json]")
@click.option("--device", default="auto", show_default=True, callback=_parse_device,
              help="cpu, cuda, cuda:N, or auto (cuda if available).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Eval batch size. [default: the run's]")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Data loading worker processes. [default: the run's]")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="--online: round the sequence length up to a multiple of this (keeps a few more patches).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_out_file,
              help="Also write the result (the run, the settings, acc1, acc5, loss, timing) to this JSON file.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option(TRUST_OPTION, "trust_urls", is_flag=True,
              help="Let the run's config.json and the dataset's dataset.json / shards.parquet name remote URLs "
                   "and pipe: commands for the image tars (without it: local paths only).")
def evaluate_command(run, online, k, scorer, split, shards, device, batch_size, workers, round_to, json_path,
                     progress, trust_urls):
    """Top-1 / top-5 / loss of RUN's best.pt on a split, with the stored kept-patch indices
    (the training path) or, with --online, with the patches scored and selected on the fly.

    RUN is a dynatrain run directory (config.json, best.pt). Prints one line; bad arguments
    exit 2, unreadable shards exit 1.
    """
    from .data import DataError
    from .evaluate import EvaluateError, evaluate_run, format_result

    if progress is None:
        progress = sys.stderr.isatty()
    try:
        result = evaluate_run(run, online=online, k=k, scorer=scorer, split=split, shards=shards, device=device,
                              batch_size=batch_size, workers=workers, round_to=round_to, progress=progress,
                              trust_urls=trust_urls)
    except EvaluateError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.param}'" if e.param else None) from None
    except DataError as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else "data error") from None
    click.echo(format_result(result))
    if json_path:
        write_json_atomic(json_path, result)
    return result


# --- compare ---------------------------------------------------------------------------------------

@click.command("compare", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_out_dir,
              help="Folder for compare.md, compare.csv (per run), compare_groups.csv and acc_vs_gmacs.png (created).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1), help="Images per timed forward.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1), help="Forwards per timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Interleaved timings per run (median).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def compare_command(runs, out_dir, batch, steps, repeats, device):
    """The paper's Table 3 from finished runs (e.g. one per --method at the same --k): method,
    parameter, exact GMACs, train img/s, inference img/s measured side by side, best top-1.
    Each run's parameter is the one it recorded when it started (not matched again). Runs of
    one method at one parameter (several --seed) form one row: best top-1 mean ± std over
    them, n and seeds, inference img/s median and range over their timing repeats; the
    per-run rows follow (compare.csv)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    try:
        rows = compare_runs(runs, batch=batch, steps=steps, repeats=repeats, device=device)
    except ReportError as e:
        raise click.BadParameter(str(e), param_hint="RUN") from None
    files = write_compare(rows, out_dir)
    click.echo((Path(out_dir) / "compare.md").read_text().rstrip())
    click.echo(f"dynatrain compare: {len(rows)} runs → {', '.join(str(f) for f in files)}", err=True)
