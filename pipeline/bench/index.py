"""Benchmark `dynaprep index` against the bare floor on the same JPEGs.

    python -m dynavit.pipeline.bench.index --n 2000 --workers 1,2

Image mixes (`make_jpegs(..., mix=)`): "500x375" (default, ImageNet's most common size) and
"mixed" (random 150-900 px per side: upscaled, cropped and drafted images).

The floor is what any preprocessing must do: read, decode, resize and re-encode each image,
run with the same process pool and the same jobs (dynaprep's own plan: units, and pieces of
them when there are too few). dynaprep adds the input's sha256, saliency scoring, top-K, tar
writing, fsync and Parquet manifests; the ratio dynaprep/floor is that overhead.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from dynavit.manifests.options import parse_k_list, parse_list
from dynavit.pipeline.cli_types import out_dir, out_file


MIXES = ("500x375", "mixed")


def describe_mix(mix: str) -> str:
    """One line for a report header: what the benchmark's JPEGs are."""
    if mix == "500x375":
        return "JPEGs 500x375 q90"
    if mix == "mixed":
        return "JPEGs of random sizes 150-900 px per side q90"
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")


def mix_sizes(n: int, mix: str = "500x375") -> list[tuple[int, int]]:
    """(width, height) of each of the n images of a mix.

    500x375: every image 500×375 (ImageNet's most common size). mixed: each side drawn
    independently, uniform in 150..900 (seeded), so aspect ratios range from 1:6 to 6:1 and
    images from well below the 256 px resize size (upscaled) to 3.5× above it (drafted)."""
    describe_mix(mix)  # validates
    if mix == "500x375":
        return [(500, 375)] * n
    rng = np.random.default_rng(12345)
    return [(int(w), int(h)) for w, h in rng.integers(150, 901, (n, 2))]


def make_jpegs(root: Path, n: int, size=(500, 375), quality=90, classes=10, mix: str | None = None) -> Path:
    """ImageNet-like JPEGs: smooth shapes plus noise, so they compress like photos, not like flat colour.

    mix None (or "500x375") makes n images of `size`; "mixed" makes images of random
    sizes (`mix_sizes`). The files are kept in root and reused when asked for again."""
    if mix is None or mix == "500x375":
        sizes, tag = [tuple(size)] * n, f"{size[0]}x{size[1]}"
    else:
        sizes, tag = mix_sizes(n, mix), mix
    marker = root / f".made-{n}-{tag}-q{quality}"
    if marker.exists():
        return root
    old = list(root.glob(".made-*")) if root.exists() else []
    if old:  # images this function made for another n or mix: replace them, never mix the sets
        shutil.rmtree(root / "train", ignore_errors=True)
        for m in old:
            m.unlink()
    rng = np.random.default_rng(0)
    grids = {}
    for i, (w, h) in enumerate(sizes):
        if (w, h) not in grids:
            grids = {(w, h): np.mgrid[0:h, 0:w]}  # consecutive images mostly share a size
        yy, xx = grids[(w, h)]
        base = np.stack([np.sin(xx / rng.uniform(8, 60) + c) * np.cos(yy / rng.uniform(8, 60) - c) for c in range(3)], -1)
        img = (127 + 90 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        d = root / "train" / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:06d}.JPEG", quality=quality)
    marker.touch()
    return root


def _floor_unit(args):
    """One job of the floor: for each file, read its bytes, `load_image` it (dynaprep's own
    decode, JPEG draft, resize and centre crop, same settings) and `encode_image` the result
    (dynaprep's JPEG/PNG encoder, same quality); the bytes are dropped, nothing is written."""
    from dynavit.pipeline.decode import encode_image, load_image

    paths, image_size, patch, fmt, quality = args
    for p in paths:
        rgb = load_image(Path(p).read_bytes(), image_size, "center-crop", 0.875, patch).rgb
        encode_image(rgb, fmt, quality)
    return len(paths)


def floor_jobs(src: Path, workers: int, shard_size: int) -> list[list[str]]:
    """The files of each job dynaprep's pool would run for src: its units of shard_size,
    cut into pieces the same way when there are fewer units than 2 × workers (`split_jobs`),
    so the floor spreads the same work over the same workers."""
    from dynavit.pipeline.index import IndexConfig, plan, split_jobs
    from dynavit.pipeline.sources import open_source

    source = open_source("imagefolder", str(src))
    cfg = IndexConfig(data="imagefolder", src=str(src), out="", ks=[50], shard_size=shard_size, workers=workers)
    jobs, _, _ = split_jobs(cfg, source, plan(cfg, source))
    return [[os.path.join(str(src), item[0]) for item in job.payload[1]] for job in jobs]


def run_floor(src: Path, workers: int, shard_size: int, image_size: int, patch: int, fmt: str, quality: int) -> float:
    """Images/s of the floor: read + decode + resize/crop + encode of every JPEG under src/train,
    with dynaprep's own functions and settings (`load_image`, `encode_image`), in dynaprep's
    jobs (`floor_jobs`), in-process for 1 worker or in a spawn pool of `workers` (as dynaprep).

    Not included (dynaprep's overhead over the floor): sha256 of the input, patch scoring,
    top-K, tar and Parquet writing, fsync, the final merge."""
    jobs = [(files, image_size, patch, fmt, quality) for files in floor_jobs(src, workers, shard_size)]
    t0 = time.perf_counter()
    if workers == 1:  # dynaprep runs one worker in-process too
        n = sum(_floor_unit(u) for u in jobs)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            n = sum(pool.map(_floor_unit, jobs, chunksize=1))
    return n / (time.perf_counter() - t0)


def run_dynaprep(src: Path, out: Path, workers: int, shard_size: int, image_size: int, patch: int, fmt: str,
                 quality: int, ks, scorers, details: dict | None = None) -> float:
    """Images/s of `run_index` on src (the final merge included); `details`, if given, gets
    ok, seconds (the units) and merge_s (the merge)."""
    from dynavit.pipeline.index import IndexConfig, run_index
    from dynavit.pipeline.sources import open_source

    shutil.rmtree(out, ignore_errors=True)
    cfg = IndexConfig(data="imagefolder", src=str(src), out=str(out), ks=list(ks), scorers=list(scorers),
                      image_size=image_size, patch_size=patch, image_format=fmt, quality=quality,
                      shard_size=shard_size, workers=workers)
    source = open_source("imagefolder", str(src))
    if workers == 1:
        import numba

        from dynavit.pipeline.saliency import score_patches

        numba.set_num_threads(1)  # one worker = one core, as in the floor (pool workers do this too)
        for scorer in scorers:  # load the cached kernels now: the floor's imports are warm too
            score_patches(np.zeros((1, patch, patch, 3), np.uint8), patch, scorer)
    t0 = time.perf_counter()
    result = run_index(cfg, source, progress_bar=False)
    # With workers, pool start-up is inside both timings (dynaprep's workers also load the
    # numba kernels, ~1 s each, amortised on real datasets); the manifest merge is ours only.
    total = time.perf_counter() - t0
    if details is not None:
        details.update(ok=result.ok, seconds=result.seconds, merge_s=total - result.seconds)
    return result.ok / total


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def compare(src: Path, out: Path, workers: int, repeats: int, shard_size: int, fmt: str, ks, scorers,
            image_size: int = 224, patch: int = 16) -> dict:
    """dynaprep next to the floor, `repeats` pairs run back to back in alternating order
    (floor first, then dynaprep first, ...), so a machine that speeds up or slows down
    during the run (shared cloud CPUs do, by ±20 %) weighs on both alike. The ratio is the
    median of the pairs' ratios; `cpu_ratio` compares CPU seconds per image (all processes),
    which steal time on a shared host does not inflate."""
    n = sum(1 for _ in (src / "train").rglob("*.JPEG"))
    ratios, cpu_ratios, floors, ours = [], [], [], []
    for r in range(repeats):
        got = {}
        for which in (("floor", "dynaprep") if r % 2 == 0 else ("dynaprep", "floor")):
            c0 = _cpu_s()
            if which == "floor":
                rate = run_floor(src, workers, shard_size, image_size, patch, fmt, 95)
            else:
                rate = run_dynaprep(src, out, workers, shard_size, image_size, patch, fmt, 95, ks, scorers)
            got[which] = (rate, (_cpu_s() - c0) / n)
        floors.append(got["floor"][0])
        ours.append(got["dynaprep"][0])
        ratios.append(got["dynaprep"][0] / got["floor"][0])
        cpu_ratios.append(got["floor"][1] / got["dynaprep"][1])
    return {"workers": workers, "floor_img_s": float(np.median(floors)), "dynaprep_img_s": float(np.median(ours)),
            "ratio": float(np.median(ratios)), "cpu_ratio": float(np.median(cpu_ratios)),
            "ratios": [round(x, 4) for x in ratios], "repeats": repeats}


@click.command("bench-index", short_help="dynaprep img/s against the decode floor.")
@click.option("--n", default=2000, show_default=True, help="Number of JPEGs (quality 90).")
@click.option("--mix", type=click.Choice(["500x375", "mixed"]), default="500x375", show_default=True,
              help="Image sizes: all 500×375 (ImageNet's most common), or random 150–900 px per side.")
@click.option("--workers", default="1,2", show_default=True, help="Worker counts to measure, comma-separated.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard, as `dynaprep index --shard-size` (the same default).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Floor/dynaprep pairs per worker count, in alternating order; the median ratio is reported.")
@click.option("--scorer", default="l2", show_default=True)
@click.option("--k", "ks", default="70,50,25", show_default=True)
@click.option("--format", "fmt", default="jpg", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None, callback=out_dir,
              help="Where the JPEGs are made (kept for re-runs); default: a temp dir.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, callback=out_file, help="Also write the figures here.")
def bench_index_command(n, mix, workers, shard_size, repeats, scorer, ks, fmt, workdir, json_out):
    """Print dynaprep images/s next to the decode+resize+encode floor, per worker count."""
    import numpy as np

    from dynavit.pipeline.decode import load_image

    work = Path(workdir or tempfile.mkdtemp(prefix="dynaprep-bench-"))
    src = make_jpegs(work / f"src-{mix}", n, mix=mix)
    ks, scorers = parse_k_list(ks), parse_list(scorer)
    for path in sorted((src / "train").rglob("*.JPEG")):  # page cache warm for both
        path.read_bytes()
    load_image(np.zeros((32, 32, 3), np.uint8), 16)  # numba's disk cache filled before any worker starts
    rows = [{"mix": mix, **compare(src, work / "out", w, repeats, shard_size, fmt, ks, scorers)}
            for w in parse_list(workers, int, "integers")]
    base = rows[0]["dynaprep_img_s"]
    click.echo(f"{n} {describe_mix(mix)} -> 224 {fmt}, scorers {scorer}, K {ks}, shard size {shard_size}; "
               f"medians of {repeats} floor/dynaprep pairs in alternating order")
    click.echo(f"{'workers':>7} {'floor img/s':>12} {'dynaprep img/s':>15} {'ratio':>6} {'cpu ratio':>10} "
               f"{'scaling':>8}  ratio per pair")
    for r in rows:
        r["scaling"] = r["dynaprep_img_s"] / base
        click.echo(f"{r['workers']:>7} {r['floor_img_s']:>12.1f} {r['dynaprep_img_s']:>15.1f} {r['ratio']:>6.3f} "
                   f"{r['cpu_ratio']:>10.3f} {r['scaling']:>7.2f}x  {' '.join(f'{x:.3f}' for x in r['ratios'])}")
    click.echo("ratio: dynaprep img/s over the floor's, wall clock; cpu ratio: the floor's CPU seconds per image "
               "over dynaprep's (all processes)")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    bench_index_command()
