"""Benchmark `dynaprep index` against the bare floor on the same JPEGs.

    python -m dynavit.pipeline.bench_index --n 2000 --workers 1,2

The floor is what any preprocessing must do: read, decode, resize and re-encode each image,
run with the same process pool and the same units of work. dynaprep adds saliency scoring,
top-K, tar writing and Parquet manifests; the ratio dynaprep/floor is that overhead.
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(root: Path, n: int, size=(500, 375), quality=90, classes=10) -> Path:
    """ImageNet-like JPEGs: smooth shapes plus noise, so they compress like photos, not like flat colour."""
    marker = root / f".made-{n}-{size[0]}x{size[1]}-q{quality}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(8, 60) + c) * np.cos(yy / rng.uniform(8, 60) - c) for c in range(3)], -1)
        img = (127 + 90 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        d = root / "train" / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:06d}.JPEG", quality=quality)
    marker.touch()
    return root


def _floor_unit(args):
    from .decode import encode_image, load_image

    paths, image_size, patch, fmt, quality = args
    for p in paths:
        rgb = load_image(Path(p).read_bytes(), image_size, "center-crop", 0.875, patch).rgb
        encode_image(rgb, fmt, quality)
    return len(paths)


def run_floor(src: Path, workers: int, shard_size: int, image_size: int, patch: int, fmt: str, quality: int) -> float:
    files = sorted(str(p) for p in (src / "train").rglob("*.JPEG"))
    units = [(files[i:i + shard_size], image_size, patch, fmt, quality) for i in range(0, len(files), shard_size)]
    t0 = time.perf_counter()
    if workers == 1:  # dynaprep runs one worker in-process too
        n = sum(_floor_unit(u) for u in units)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            n = sum(pool.map(_floor_unit, units, chunksize=1))
    return n / (time.perf_counter() - t0)


def run_dynaprep(src: Path, out: Path, workers: int, shard_size: int, image_size: int, patch: int, fmt: str,
                 quality: int, ks, scorers) -> float:
    from .index import IndexConfig, run_index
    from .sources import open_source

    shutil.rmtree(out, ignore_errors=True)
    cfg = IndexConfig(data="imagefolder", src=str(src), out=str(out), ks=list(ks), scorers=list(scorers),
                      image_size=image_size, patch_size=patch, image_format=fmt, quality=quality,
                      shard_size=shard_size, workers=workers)
    source = open_source("imagefolder", str(src))
    if workers == 1:
        import numba

        from .saliency import score_patches

        numba.set_num_threads(1)  # one worker = one core, as in the floor (pool workers do this too)
        for scorer in scorers:  # load the cached kernels now: the floor's imports are warm too
            score_patches(np.zeros((1, patch, patch, 3), np.uint8), patch, scorer)
    t0 = time.perf_counter()
    result = run_index(cfg, source, progress_bar=False)
    # With workers, pool start-up is inside both timings (dynaprep's workers also load the
    # numba kernels, ~1 s each, amortised on real datasets); the manifest merge is ours only.
    return result.ok / (time.perf_counter() - t0)


if __name__ == "__main__":
    from .cli import bench_index_command

    bench_index_command()
