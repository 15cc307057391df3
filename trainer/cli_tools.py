"""The click commands of dynatrain's tools: flops, bench, bench-step, bench-report, report.

Only option parsing, output and the mapping from errors to exit codes live here; the work
is in the library modules named by each command (flops.py, bench.py, bench_step.py,
bench_report.py, report.py). `dynatrain` registers these in cli.py.
"""
from __future__ import annotations

import json
from typing import Optional

import click
import torch

from dynavit.manifests import write_json_atomic
from dynavit.manifests.options import parse_k_list

from .bench import format_bench, run_bench
from .bench_report import BenchmarkFailed, write_report
from .bench_step import AMP_DTYPES
from .bench_step import bench as bench_step
from .flops import build_meta_model, closed_form_coeffs, flops_table, model_dims
from .report import MissingExtra, ReportError, build_report, load_run, require_matplotlib


def k_list(ctx, param, value: str) -> list[int]:
    """click callback around the one K-list parser: a bad --k is a usage error (exit 2)."""
    try:
        return parse_k_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("flops")
@click.option("--model", "model_name", default="vit_base_patch16_224", show_default=True,
              help="timm VisionTransformer name; built with pretrained=False on the meta "
                   "device (no weights are downloaded or allocated).")
@click.option("--k", "ks", default="100,90,70,60,50,30,25", show_default=True,
              callback=k_list, help="Comma-separated keep percentages K (100 = dense).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table, the fit and the closed form to this JSON file.")
def flops_command(model_name: str, ks: list[int], json_path: Optional[str]) -> None:
    """Exact MACs of the sparse forward per K, the fitted alpha·S²+beta·S+gamma model, and
    what an fvcore-style count that skips attention (SDPA) would report."""
    try:
        model = build_meta_model(model_name)
        dims = model_dims(model)
    except (RuntimeError, TypeError, ValueError) as e:
        raise click.BadParameter(str(e).splitlines()[0], param_hint="--model")
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

    if json_path:
        doc = dict(model=model_name, dims={**dims, "patch": list(dims["patch"])}, rows=rows,
                   fit=fit, closed_form=dict(alpha=cf[0], beta=cf[1], gamma=cf[2]),
                   unit="MACs (FLOPs/2), counted by torch FlopCounterMode")
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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
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
@click.option("--scorer", default="l2", show_default=True, help="Index shard set the loader reads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
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
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
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
@click.option("--out", default="docs/BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
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
