"""The click commands of dynatrain's tools: flops, bench, bench-step, bench-report, report,
predict, bench-infer, bench-compare.

Only option parsing, output and the mapping from errors to exit codes live here; the work
is in the library modules named by each command (flops.py, bench.py, bench_step.py,
bench_report.py, report.py). `dynatrain` registers these in cli.py.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import click
import torch

from dynavit.manifests import write_json_atomic
from dynavit.manifests.inputs import DEFAULT_MAX_FILE_BYTES
from dynavit.manifests.locations import TRUST_OPTION
from dynavit.pipeline.cli_types import (MAX_IMAGE_SIZE, DeviceType, FiniteFloat, json_object, k_list, out_dir,
                                        out_file, plural, renamed)
from dynavit.manifests.options import parse_triple

from dynavit.trainer.methods.budget import budget_table, match_budgets
from dynavit.trainer.model import budget_record, make_heads
from dynavit.trainer.selection import LEARNED
from dynavit.trainer.analysis.compare import compare_runs, write_compare
from dynavit.trainer.methods.flops import build_meta_model, closed_form_coeffs, flops_table, model_dims
from dynavit.trainer.infer.predict import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, SCORERS, PredictError, list_images, load_model,
                      predict, write_rows)
from dynavit.trainer.analysis.report import MissingExtra, ReportError, build_report, load_run, require_matplotlib




_out_dir, _out_file = out_dir, out_file  # click callbacks shared with dynaprep (pipeline/cli_types.py)


@click.command("flops", short_help="Exact MACs per K and each method's parameter.")
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
@click.option("--device", type=DeviceType(meta=True), default="meta", show_default=True,
              help="Where the counted forwards run: meta (shapes only, instant) or a real device with "
                   "random weights. The MACs are the same on each (a check, not a choice of figure).")
def flops_command(model_name: str, ks: list[int], json_path: Optional[str], method: str,
                  model_kwargs: dict, device: str) -> None:
    """Exact MACs of the sparse forward per K, the fitted alpha·S²+beta·S+gamma model, and
    what an fvcore-style count that skips attention (SDPA) would report. Counted by
    dynavit's own formulas from shapes: the same figures on every device and torch version."""
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
                click.echo(f"{k:>4} {name:<11} {rec['described']}  {rec['macs'] / 1e9:.4f} GMACs"
                           + ("  (limit: cannot go lower)" if rec["at_limit"] else ""))

    if json_path:
        doc = dict(model=model_name, dims={**dims, "patch": list(dims["patch"])}, rows=rows,
                   fit=fit, closed_form=dict(alpha=cf[0], beta=cf[1], gamma=cf[2]),
                   unit="MACs, counted by dynavit.trainer.methods.macs (formulas from shapes; device- and version-independent)", budgets=budgets,
                   learned=learned if method == "all" else None, model_kwargs=model_kwargs,
                   device=device)
        write_json_atomic(json_path, doc)


@click.command("report", short_help="K-sweep table, plots and confusion matrices.", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_out_dir,
              help="Report directory (created): sweep.md, sweep.csv, acc_vs_time.png, acc_vs_k.png, curves.png, "
                   "confusion-<run>.png, per_class-<run>.csv.")
@click.option("--confusion/--no-confusion", default=True, show_default=True,
              help="Re-evaluate each run's best.pt for the confusion matrix and per-class metrics.")
@click.option("--split", default=None, help="Split for the confusion matrices. [default: each run's val split]")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Dataset directory, if it moved since training. [default: the one in config.json]")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="Device for the re-evaluation (auto: cuda if available).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Eval batch size. [default: the run's]")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data loading workers.")
def report_command(runs, out_dir, confusion, split, shards, device, batch_size, workers):
    """Summarise training runs: K-sweep table (sweep.md/.csv), accuracy/time plots, learning
    curves, and per-run confusion matrices with per-class precision/recall/F1. Runs of
    `--task segment`: segment.md/.csv with mIoU overall and per class."""
    from dynavit.trainer.analysis.seg_report import SegReportError, is_segment_run, segment_report

    if all(is_segment_run(r) for r in runs):
        try:
            result = segment_report(runs, out_dir)
        except SegReportError as e:
            raise click.BadParameter(str(e), param_hint="RUN") from None
        best = max(result["rows"], key=lambda r: r["best_miou"])
        click.echo(f"dynatrain report: {len(result['rows'])} segmentation runs → {out_dir}/segment.md "
                   f"(best mIoU {100 * best['best_miou']:.1f}% by {best['run']})")
        return
    try:
        loaded = [load_run(r) for r in runs]
    except ReportError as e:
        raise click.BadParameter(str(e), param_hint="RUN") from None
    try:
        require_matplotlib()
        result = build_report(loaded, out_dir, confusion=confusion, split=split, device=device,
                              batch_size=batch_size, workers=workers, shards=shards, log=click.echo)
    except MissingExtra as e:
        raise click.ClickException(str(e)) from None
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    best = max(result["rows"], key=lambda r: r["best_acc1"])
    click.echo(f"dynatrain report: {plural(len(result['rows']), 'run')} → {out_dir}/sweep.md "
               f"(best top-1 {best['best_acc1']:.2f}% at K={best['k']}); {len(result['files'])} files")


# --- predict ----------------------------------------------------------------------------------

def _parse_triple(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_triple(value, positive="std" if param.name == "std" else None)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _checkpoint_of(ctx, param, value):
    """RUN (a dynatrain run folder: its best.pt) or a checkpoint file."""
    p = Path(value)
    if p.is_dir():
        if not (p / "best.pt").is_file():
            raise click.BadParameter(f"{value} is a folder without best.pt: give a dynatrain run folder or a "
                                     "checkpoint file")
        return p / "best.pt"
    return p


def _check_predict_out(ctx, param, value):
    p = Path(value)
    if p.suffix.lower() not in (".csv", ".parquet"):
        raise click.BadParameter(f"{value}: must end in .csv or .parquet")
    if p.is_dir():
        raise click.BadParameter(f"{value} is a folder")
    _out_file(ctx, param, value)
    return p


def _online_rule(text):
    """The KRule of --k-rule for online use: mass:τ only (a budget's τ* comes from a data set)."""
    if text is None:
        return None
    from dynavit.trainer.adaptive_k import parse_k_rule
    try:
        rule = parse_k_rule(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--k-rule") from None
    if rule.tau is None:
        raise click.BadParameter("budget:K needs a data set to calibrate its τ; online, give mass:TAU "
                                 "(the τ* a budget run recorded in its eval output works)", param_hint="--k-rule")
    return rule


@click.command("predict", short_help="Classify image files with a run's model.", context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.argument("checkpoint", metavar="RUN|CHECKPOINT", type=click.Path(exists=True), callback=_checkpoint_of)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, callback=_check_predict_out, metavar="FILE.csv|FILE.parquet",
              help="Output table, one row per input image (format from the extension).")
@click.option("--k", type=click.IntRange(1, 100), default=None,
              help="Percent of patches kept (100 = dense, no scoring). [default: the K a Dyna-ViT run evaluated at, else 100]")
@click.option("--k-rule", default=None, metavar="mass:TAU[,floor=F,ceil=C]",
              help="Adaptive K instead of --k: each image keeps the fewest top patches holding TAU of its "
                   "score mass (floor/ceil in percent); images run packed; the table gets a 'kept' column.")
@click.option("--scorer", type=click.Choice(SCORERS), default=None,
              help="Patch saliency score (docs/FORMAT.md), computed online on the device. "
                   "[default: the scorer the checkpoint's run trained with, else l2]")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="Round the sequence length up to a multiple of this (e.g. 8); keeps a few more patches.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="Where to run (auto: cuda if available).")
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
def predict_command(checkpoint, images, out, k, k_rule, scorer, round_to, device, batch_size, model_name,
                    model_kwargs, num_classes, image_size, crop_pct, mean, std, top, overwrite, progress,
                    max_file_bytes):
    """Classify IMAGES (files or folders) with a trained ViT, pruning tokens online.

    RUN is a dynatrain run folder (its best.pt is used, with the run's K and normalisation);
    CHECKPOINT a dynatrain checkpoint file (best.pt / last.pt) or a plain timm state_dict (then
    --model is needed). Unreadable images become rows with status 'failed' and the reason.
    """
    if out.exists() and not overwrite:
        raise click.BadParameter(f"{out} exists (pass --overwrite to replace it)", param_hint="--out")
    rule = _online_rule(k_rule)
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
    k = k or info.get("run_k") or 100
    mean = mean or info.get("mean") or IMAGENET_MEAN
    std = std or info.get("std") or IMAGENET_STD
    if progress is None:
        progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        rows = predict(vit, files, k=k, scorer=scorer, device=device, batch_size=batch_size,
                       mean=mean, std=std, top=top, classes=classes, round_to=round_to,
                       crop_pct=crop_pct, progress=progress, max_file_bytes=max_file_bytes, k_rule=rule)
    except PredictError as e:
        raise click.UsageError(str(e)) from None
    write_rows(rows, out, top)
    ok = sum(r["status"] == "ok" for r in rows)
    dt = time.perf_counter() - t0
    click.echo(f"predict: {len(rows)} images, {ok} ok, {len(rows) - ok} failed, "
               f"{info['model_name']} {'k-rule ' + rule.text if rule else f'K={k}'} {scorer} on {device}, {dt:.1f}s "
               f"({len(rows) / max(dt, 1e-9):.1f} img/s) -> {out}", err=True)


# --- evaluate ------------------------------------------------------------------------------------

@click.command("evaluate", short_help="Top-1/top-5 of a run on a split.", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--online", is_flag=True,
              help="Read the stored images densely and score + select the patches on the device "
                   "(DynaViT); no stored indices are used, so any --k and --scorer work.")
@click.option("--k", type=click.IntRange(1, 100), default=None,
              help="Percent of patches kept (100 = dense). Without --online it must be indexed in the "
                   "dataset. [default: the run's eval K]")
@click.option("--k-rule", default=None, metavar="mass:TAU|budget:K[,floor=F,ceil=C]",
              help="Adaptive K from the stored scores (each image its own count, run packed); the JSON records "
                   "every sample's count and the mean GMACs. [default: the run's --k-rule, unless --k]")
@click.option("--scorer", type=click.Choice(SCORERS), default=None,
              help="Saliency scorer: online, computed on the device; otherwise the stored index shards "
                   "of that scorer. [default: the run's]")
@click.option("--split", default=None, help="Split to evaluate. [default: the run's val split]")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Dataset directory, if it moved since training. [default: the one in config.json]")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="Where to run (auto: cuda if available).")
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
def evaluate_command(run, online, k, k_rule, scorer, split, shards, device, batch_size, workers, round_to, json_path,
                     progress, trust_urls):
    """Top-1 / top-5 / loss of RUN's best.pt on a split, with the stored kept-patch indices
    (the training path) or, with --online, with the patches scored and selected on the fly.

    RUN is a dynatrain run directory (config.json, best.pt). Prints one line; bad arguments
    exit 2, unreadable shards exit 1.
    """
    from dynavit.trainer.data import DataError
    from dynavit.trainer.infer.evaluate import EvaluateError, evaluate_run, format_result

    if progress is None:
        progress = sys.stderr.isatty()
    try:
        result = evaluate_run(run, online=online, k=k, scorer=scorer, split=split, shards=shards, device=device,
                              batch_size=batch_size, workers=workers, round_to=round_to, progress=progress,
                              trust_urls=trust_urls, k_rule=k_rule)
    except EvaluateError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.param}'" if e.param else None) from None
    except DataError as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else "data error") from None
    click.echo(format_result(result))
    if json_path:
        write_json_atomic(json_path, result)
    return result


# --- compare ---------------------------------------------------------------------------------------

@click.command("compare", short_help="Methods side by side from finished runs.", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@renamed("--batch", "--batch-size", "batch_size", type=click.IntRange(1))
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_out_dir,
              help="Folder for compare.md, compare.csv (per run), compare_groups.csv and acc_vs_gmacs.png (created).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per timed forward.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1), help="Forwards per timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Interleaved timings per run (median).")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="Where the timed forwards run (auto: cuda if available).")
def compare_command(runs, out_dir, batch_size, steps, repeats, device):
    """The paper's Table 3 from finished runs (e.g. one per --method at the same --k): method,
    parameter, exact GMACs, train img/s, inference img/s measured side by side, best top-1.
    Each run's parameter is the one it recorded when it started (not matched again). Runs of
    one method at one parameter (several --seed) form one row: best top-1 mean ± std over
    them, n and seeds, inference img/s median and range over their timing repeats; the
    per-run rows follow (compare.csv)."""
    try:
        rows = compare_runs(runs, batch=batch_size, steps=steps, repeats=repeats, device=device)
    except ReportError as e:
        raise click.BadParameter(str(e), param_hint="RUN") from None
    files = write_compare(rows, out_dir)
    click.echo((Path(out_dir) / "compare.md").read_text().rstrip())
    click.echo(f"dynatrain compare: {plural(len(rows), 'run')} → {', '.join(str(f) for f in files)}", err=True)
