"""`dynaprep`: the offline stage. Every argument is checked before anything is written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dynavit.manifests import DEFAULT_SCORER, FormatError, validate_dataset
from dynavit.manifests.inputs import DEFAULT_MAX_FILE_BYTES
from dynavit.manifests.locations import TRUST_OPTION
from dynavit.manifests.options import parse_k_list, parse_list, parse_triple

from dynavit.pipeline.bench.index import bench_index_command
from dynavit.pipeline.cli_types import MAX_IMAGE_SIZE, FiniteFloat, out_dir, out_file
from dynavit.pipeline.show import DPI, PANEL_INCHES, MissingExtra, ShowError, plan_show, render_show, require_matplotlib
from dynavit.pipeline.sources import SOURCES, SourceError, open_source

DEFAULT_WORKERS = os.cpu_count() or 1
TRUST_HELP = ("Let dataset.json / shards.parquet name remote URLs and pipe: commands for the image tars. "
              "Without it a dataset folder may only name local paths under itself or its images root "
              "(a downloaded folder could otherwise run commands).")


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return sorted(set(parse_k_list(value)), reverse=True)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _k_list_or_none(ctx, param, value: str | None) -> list[int] | None:
    return None if value is None else _int_list(ctx, param, value)


def _names(value: str | None) -> list[str] | None:
    return None if value is None else parse_list(value)


def _scorers(ctx, param, value: str) -> list[str]:
    from dynavit.pipeline.saliency import SCORERS

    names = [v.strip() for v in value.split(",") if v.strip()]  # empty is reported below
    bad = [n for n in names if n not in SCORERS]
    if bad or not names:
        raise click.BadParameter(f"unknown scorer {', '.join(bad) or value!r}; valid: {', '.join(SCORERS)}")
    return list(dict.fromkeys(names))


def _triple(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return parse_triple(value, positive="std" if param.name == "std" else None)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _check_out(out: str) -> None:
    """--out must be (or be creatable as) a folder: found now, not as a traceback after
    the first files are written."""
    path = Path(out).absolute()
    for p in (path, *path.parents):
        try:
            if not p.exists():
                continue
        except OSError as e:
            raise click.BadParameter(f"cannot access {p}: {e.strerror or e}", param_hint="--out") from None
        if not p.is_dir():
            raise click.BadParameter(f"{p} is not a directory", param_hint="--out")
        if not os.access(p, os.W_OK | os.X_OK):
            raise click.BadParameter(f"{p} is not writable", param_hint="--out")
        return


def _options(ctx, param, values) -> dict:
    out = {}
    for item in values:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class OneLineErrors(click.Group):
    """A bad argument is one `Error:` line on stderr and exit 2 (click's standalone mode
    prints a usage block first), as in dynatrain."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # bare `dynaprep`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynavit")
def main():
    """Offline saliency indexing for Dyna-ViT: datasets -> WebDataset shards + top-K patch indices."""


@main.command()
@click.option("--data", type=click.Choice(sorted(SOURCES)), required=True,
              help="Dataset layout of --src: imagenet/imagefolder (SRC/{train,val}/<class>/*), cifar100 "
                   "(official python pickles), tinyimagenet, voc5 (VOC2012, 5-class subset), wds (an existing "
                   "WebDataset: only index shards are written), demo (generated, no --src).")
@click.option("--src", "srcs", type=str, multiple=True,
              help="Dataset root. wds: a tar, a {000..099} brace pattern, a glob, a folder, or a URL "
                   "(http(s)://, s3://, gs://, pipe:CMD, file://); prefix NAME= to name its split and repeat "
                   "--src for several splits (--src train=A --src val=B).")
@click.option("--out", type=click.Path(file_okay=False), required=True, callback=out_dir, help="Output dataset directory.")
@click.option("--k", "ks", default="70,50,25", show_default=True, callback=_int_list,
              help="Percent of patches to keep, comma-separated; all K come from one ranking (nested sets).")
@click.option("--scorer", "scorers", default=DEFAULT_SCORER, show_default=True, callback=_scorers,
              help="Saliency scorers, comma-separated: l2 (the paper's), sobel, entropy, contrast, distinct "
                   "(docs/FORMAT.md); one index shard set each; the first is what dynatrain uses by default. "
                   "The default is entropy, not the paper's l2: l2 keeps flat dark/white background "
                   "(docs/BENCHMARKS.md, scorers on real data).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(1, MAX_IMAGE_SIZE),
              help="Side of the stored square image (a multiple of --patch-size). wds: images are scored "
                   "after --resize to this size (the trainer applies the same resize); images already this "
                   "size are kept as they are.")
@click.option("--patch-size", default=16, show_default=True, type=click.IntRange(1, MAX_IMAGE_SIZE), help="ViT patch size.")
@click.option("--resize", type=click.Choice(["center-crop", "squash"]), default="center-crop", show_default=True,
              help="center-crop: short side to image_size/crop_pct, then centre crop; squash: resize to a square.")
@click.option("--crop-pct", default=0.875, show_default=True, type=FiniteFloat(0.05, 1.0),
              help="Crop fraction for --resize center-crop (timm's eval default).")
@click.option("--format", "image_format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True,
              help="Stored image format; png is lossless (scores then equal score_patches of the decoded shard).")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG quality.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Input samples per shard (failed samples leave gaps; a shard is also the unit of work).")
@click.option("--order", type=click.Choice(["shuffle", "source"]), default="shuffle", show_default=True,
              help="Order samples are written in: a seeded random order of each split, or the source's own "
                   "(class by class for folder layouts; a stream over such shards cannot mix classes). Keys are "
                   "the source ordinal either way; manifest.parquet maps them back to the source path. "
                   "--data wds is indexed in place, in the tars' order.")
@click.option("--order-seed", default=0, show_default=True, type=int, help="Seed of --order shuffle.")
@click.option("--workers", default=DEFAULT_WORKERS, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (one shard at a time each); with --executor ray and no --ray-address, "
                   "the CPUs of the local Ray.")
@click.option("--executor", type=click.Choice(["processes", "ray"]), default="processes", show_default=True,
              help="processes: a local process pool; ray: one Ray task per shard, on a local Ray or the "
                   "cluster at --ray-address (needs: pip install \"dynavit[ray]\"). Same output bytes.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Ray cluster to join (e.g. auto, ray://head:10001) [--executor ray; default: start a local Ray].")
@click.option("--max-retries", default=None, type=click.IntRange(min=0),
              help="Retries of a shard whose task raises or whose worker dies, before the run fails "
                   "[--executor ray; default: 2].")
@click.option("--rank", default=0, show_default=True, type=click.IntRange(min=0),
              help="This machine's index for multi-machine runs: takes shards rank, rank+W, ...")
@click.option("--world-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Number of machines sharing the work; join them with `dynaprep merge-manifests OUT`.")
@click.option("--resume", is_flag=True, help="Continue a run in --out: keep committed shards, redo partial ones.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier dynaprep output in --out.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any input failed.")
@click.option("--pad-aware/--no-pad-aware", "pad_aware", default=None,
              help="Never keep constant letterbox borders (img2dataset's border mode, scanner margins in pairs) in "
                   "the top-K while real content is left out; any --data: borders from KEY.json's sizes (wds), else "
                   "a constant-border detector. --no-pad-aware: the paper's plain scores. "
                   "[default: on for wds, off otherwise]")
@click.option("--mean", default=None, callback=_triple, help="Normalisation mean R,G,B for the l2 score [ImageNet].")
@click.option("--std", default=None, callback=_triple, help="Normalisation std R,G,B for the l2 score [ImageNet].")
@click.option("-o", "--option", "options", multiple=True, callback=_options,
              help="Source option KEY=VALUE, repeatable; values that read as numbers are passed as numbers "
                   "(demo: n_train, n_val, seed, image_size [--image-size]; wds: split, classes_file, "
                   "label=auto|cls|txt|json:FIELD|none: where the class is; img2dataset keeps it in KEY.json "
                   "or KEY.txt, see the README).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--max-file-bytes", default=DEFAULT_MAX_FILE_BYTES, show_default=True, type=click.IntRange(min=1),
              help="Input files (and tar members) larger than this are failed rows, not read; only regular "
                   "files are read (a FIFO or a symlink to a device is a failed row).")
def index(data, srcs, out, ks, scorers, image_size, patch_size, resize, crop_pct, image_format, quality, shard_size,
          order, order_seed, workers, executor, ray_address, max_retries, rank, world_size, resume, overwrite, strict,
          pad_aware, mean, std, options, progress, max_file_bytes):
    """Decode, resize, score and index every split of a dataset into shards + manifests."""
    from dynavit.pipeline.index import IndexConfig, LabelError, RunError, UnitError, run_index

    src = _index_source_arg(data, srcs)
    _check_index_args(image_size, patch_size, rank, world_size, overwrite, executor, ray_address, max_retries)
    if pad_aware is None:
        pad_aware = data == "wds"
    if data == "demo":
        options.setdefault("image_size", image_size)
    elif not src:
        raise click.UsageError(f"--src is required for --data {data}")
    _check_out(out)
    try:
        source = open_source(data, src, **options)
        for split in source.splits():  # enumerate now: a broken layout is an argument error
            source.units(split, shard_size)
    except (SourceError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    except OSError as e:  # a folder or annotation file that cannot be read, in any layout
        raise click.UsageError(f"cannot read the dataset: {_os_error(e)}") from None
    if isinstance(src, str) and data != "wds" and Path(src).exists():
        src = str(Path(src).resolve())
    cfg = IndexConfig(data=data, src=src, out=out, ks=ks, pad_aware=pad_aware,
                      scorers=scorers, image_size=image_size, patch_size=patch_size, resize=resize, crop_pct=crop_pct,
                      image_format=image_format, quality=quality, shard_size=shard_size,
                      order=order, order_seed=order_seed, mean=mean or IndexConfig.mean, std=std or IndexConfig.std, source_options=options,
                      workers=workers, rank=rank, world_size=world_size, executor=executor, ray_address=ray_address,
                      max_retries=IndexConfig.max_retries if max_retries is None else max_retries,
                      max_file_bytes=max_file_bytes)
    try:
        result = run_index(cfg, source, resume=resume, overwrite=overwrite,
                           progress_bar=sys.stderr.isatty() if progress is None else progress)
    except RunError as e:
        raise click.UsageError(str(e)) from None
    except (UnitError, LabelError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # writing the run state or the merged manifests (disk full, ...)
        raise click.ClickException(_os_error(e)) from None
    _report_index(result, source, out, data, rank, world_size, strict)

def _index_source_arg(data: str, srcs: tuple) -> str | list | None:
    """--src as the source reads it: several only for wds; wds' local paths made absolute
    (a resume from elsewhere reads the same files), URLs verbatim."""
    if len(srcs) > 1 and data != "wds":
        raise click.BadParameter(f"--data {data} takes one --src (several are for wds splits)", param_hint="--src")
    if data == "wds":
        src = [_absolute_spec(s) for s in srcs]
        src = src[0] if len(src) == 1 else (src or None)
    else:
        src = srcs[0] if srcs else None
    return src


def _check_index_args(image_size: int, patch_size: int, rank: int, world_size: int, overwrite: bool, executor: str,
                      ray_address, max_retries) -> None:
    """The argument checks that need no source: a usage error (exit 2) before anything is written."""
    if image_size % patch_size:
        raise click.BadParameter(f"{image_size} is not a multiple of --patch-size {patch_size}", param_hint="--image-size")
    if rank >= world_size:
        raise click.BadParameter(f"{rank} must be < --world-size {world_size}", param_hint="--rank")
    if world_size > 1 and overwrite:
        raise click.UsageError("--overwrite with --world-size > 1 would delete other ranks' shards")
    if executor != "ray" and (ray_address is not None or max_retries is not None):
        raise click.UsageError("--ray-address and --max-retries need --executor ray")
    if executor == "ray":
        from dynavit.pipeline.ray_executor import RayUnavailable, check_address, require_ray

        try:
            require_ray()
            check_address(ray_address)
        except RayUnavailable as e:
            raise _ExitTwo(str(e)) from None


def _report_index(result, source, out, data: str, rank: int, world_size: int, strict: bool) -> None:
    """The run's summary lines; exit 1 when a split has no usable sample, or under --strict
    when an input failed or the source reported a problem."""
    for warning in getattr(source, "warnings", lambda: [])():
        click.echo(f"warning: {warning}", err=True)
    rate = (result.ok + result.failed) / result.seconds if result.seconds else 0.0
    click.echo(f"dynaprep index: {result.units_run} shards written, {result.units_done_before} already done "
               f"({result.ok} ok, {result.failed} failed, {rate:.1f} img/s)")
    failed = result.failed
    if result.merged:
        info = json.loads((Path(out) / "dataset.json").read_text())
        for name, c in info["splits"].items():
            click.echo(f"  {name}: {c['ok']} ok, {c['failed']} failed, {c['shards']} shards")
        for reason, count in failure_reasons(out):
            click.echo(f"  failed: {count} × {reason}")
        click.echo(f"  wrote {out}/dataset.json")
        for line in flat_summary(info):
            click.echo(line)
        failed = sum(c["failed"] for c in info["splits"].values())  # earlier runs and ranks too
        if data == "wds" and not info["classes"] and info["labels"]["from"] == "auto":
            click.echo("warning: no sample has a .cls label; img2dataset keeps the class in KEY.json or KEY.txt: "
                       "index with -o label=json:FIELD or -o label=txt to train on it", err=True)
        empty = [name for name, c in info["splits"].items() if c["ok"] == 0]
        if empty:  # nothing to train or evaluate on: that is not a success
            click.echo(f"Error: split {', '.join(empty)} has 0 usable samples (see the failure reasons above)",
                       err=True)
            sys.exit(1)
    else:
        click.echo(f"rank {rank}/{world_size} done; when every rank has finished run: dynaprep merge-manifests {out}")
    problems = getattr(source, "problems", lambda: [])()
    if strict and (failed or problems):
        what = [f"{failed} inputs failed (see manifest.parquet)"] if failed else []
        what += [f"{len(problems)} dataset problems (see the warnings above)"] if problems else []
        click.echo(f"--strict: {'; '.join(what)}", err=True)
        sys.exit(1)


def flat_summary(info: dict) -> list[str]:
    """The flat-patch figures of dataset.json for the summary: per split the share of flat
    patches the indexed scorers keep at the smallest K next to a random selection's, then a
    warning per scorer that keeps markedly more (pipeline/flatness.py)."""
    from dynavit.pipeline.flatness import warning_lines

    fp = info.get("flat_patches")
    if not fp:
        return []
    lines = []
    for split, fig in fp["splits"].items():
        if fig.get("random") is None:
            continue
        k = str(min(int(k) for k in next(iter(fig["kept_share"].values()), {"0": 0}))) if fig["kept_share"] else None
        shares = ", ".join(f"{s} {100 * fig['kept_share'][s][k]:.0f} %" for s in info["scorers"]
                           if k and fig["kept_share"].get(s, {}).get(k) is not None)
        lines.append(f"  {split}: flat patches kept at K={k} (of {fig['images']} sampled images): {shares}; "
                     f"random {100 * fig['random']:.0f} %")
        lines += [f"warning: {line}" for line in warning_lines(split, fig["warnings"])]
    return lines


def _absolute_spec(spec: str) -> str:
    """A wds --src with its local path made absolute, keeping a NAME= prefix and URLs."""
    from dynavit.manifests.locations import is_url

    from dynavit.pipeline.sources.wds import split_spec

    name, rest = split_spec(spec)
    if name is not None:
        return f"{name}={_absolute_spec(rest)}"
    if is_url(spec) or spec.startswith("file://"):
        return spec
    return str(Path(spec).absolute())


def failure_reasons(out, top: int = 5) -> list[tuple[str, int]]:
    """The most common reasons of failed rows, with counts (numbers in them blanked, so
    that "image is 256×256, not 224×224" and "…300×200…" count as one reason)."""
    import re
    from collections import Counter

    from dynavit.manifests import read_manifest

    rows = read_manifest(out).to_pylist()
    reasons = Counter(re.sub(r"\d+", "N", r["error"] or "") for r in rows if r["status"] == "failed")
    return reasons.most_common(top)


class _ExitTwo(click.ClickException):
    """A one-line `Error: ...` with exit status 2 (no usage text)."""
    exit_code = 2


def _os_error(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


@main.command("merge-manifests")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def merge_manifests(out):
    """Join the per-shard parts of every rank into manifest.parquet, shards.parquet, dataset.json."""
    from dynavit.pipeline.index import LabelError, RunError, merge_from_state

    try:
        info = merge_from_state(out)
    except RunError as e:
        raise click.UsageError(str(e)) from None
    except LabelError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(_os_error(e)) from None
    total = {name: (c.ok, c.failed) for name, c in info.splits.items()}
    click.echo(f"merged {out}: " + ", ".join(f"{n} {ok} ok/{f} failed" for n, (ok, f) in total.items()))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--no-checksums", is_flag=True, help="Skip re-hashing shard files (faster on large datasets).")
@click.option("--images-root", default=None, metavar="DIR|URL",
              help="wds: where the user's tars are now, if they moved since indexing [dataset.json's images_root].")
@click.option(TRUST_OPTION, "trust_urls", is_flag=True, help=TRUST_HELP)
def verify(out, no_checksums, images_root, trust_urls):
    """Check a dataset directory against the on-disk contract; exit 1 on any violation."""
    violations = validate_dataset(out, check_checksums=not no_checksums, images_root=images_root,
                                  trust_urls=trust_urls)
    for v in violations:
        click.echo(str(v))
    if violations:
        click.echo(f"{len(violations)} violations in {out}", err=True)
        sys.exit(1)
    click.echo(f"{out}: ok")



# --- show --------------------------------------------------------------------------------

@main.command("show", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", metavar="OUT", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "png", required=True, type=click.Path(dir_okay=False), callback=out_file,
              help="PNG file to write (replaced atomically).")
@click.option("--split", default=None, help="Split to sample from. [default: val, else test]")
@click.option("--n", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Number of samples (rows), drawn at random with --seed; ignored with --keys.")
@click.option("--k", "ks", default=None, callback=_k_list_or_none,
              help="K values to show, comma-separated; each must be in dataset.json's ks. [default: all]")
@click.option("--keys", default=None, help="Comma-separated sample keys to show instead of a random choice.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random sample choice.")
@click.option("--scorer", "scorer", default="all", show_default=True,
              help="Scorers whose heatmaps are drawn, comma-separated, or all; the first one's top-K "
                   "sets are the kept patches shown.")
@click.option("--dpi", default=DPI, show_default=True, type=click.IntRange(10, 1000), help="Figure resolution.")
@click.option("--panel-size", default=PANEL_INCHES, show_default=True, type=FiniteFloat(0.5, 20),
              help="Side of one panel in inches (PNG width = panels × size × dpi).")
@click.option("--images-root", default=None, metavar="DIR|URL",
              help="wds: where the user's tars are now, if they moved since indexing [dataset.json's images_root].")
@click.option(TRUST_OPTION, "trust_urls", is_flag=True, help=TRUST_HELP)
def show_command(out_dir, png, split, n, ks, keys, seed, scorer, dpi, panel_size, images_root, trust_urls):
    """Draw sampled images of a dataset with their score heatmaps and kept patches per K."""
    scorers = None if scorer.strip() == "all" else _names(scorer)
    try:
        plan_show(out_dir, split, n, ks, keys=_names(keys), seed=seed, scorers=scorers, png=png)  # arguments first
        require_matplotlib()
        facts = render_show(out_dir, split, n, ks, png, keys=_names(keys), seed=seed, scorers=scorers,
                            panel_inches=panel_size, dpi=dpi, images_root=images_root, trust_urls=trust_urls)
    except ShowError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.param}'" if e.param else None) from None
    except (MissingExtra, FormatError) as e:
        raise click.ClickException(str(e)) from None
    w, h = facts["size_px"]
    click.echo(f"dynaprep show: {facts['nrows']} samples of {facts['split']} × K={','.join(map(str, facts['ks']))} "
               f"({facts['scorer']}) → {png} ({w}x{h} px)")
    from dynavit.pipeline.flatness import warning_lines

    flat, split = facts["flat"], facts["split"]
    k = str(min(facts["ks"]))
    shares = ", ".join(f"{s} {100 * flat['kept_share'][s][k]:.0f} %" for s in facts["scorers"])
    click.echo(f"  flat patches kept at K={k} in these samples: {shares}; random {100 * flat['random']:.0f} %")
    for line in warning_lines(split, flat["warnings"], where=" in these samples"):
        click.echo(f"warning: {line}")
    stored = facts["flat_dataset"]
    try:
        for line in warning_lines(split, (stored or {}).get("warnings", []),
                                  where=f" (dataset.json, {stored['images'] if stored else 0} sampled images)"):
            click.echo(f"warning: {line}")
    except (AttributeError, KeyError, TypeError, ValueError):  # data, not code: never a traceback
        click.echo(f"warning: dataset.json's flat_patches of split {split!r} is malformed; see dynaprep verify")


main.add_command(bench_index_command)  # the benchmark owns its command (pipeline/bench/index.py)


if __name__ == "__main__":
    main()
