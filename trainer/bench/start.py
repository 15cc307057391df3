"""Loader start time and peak memory against sample count (issue 25; docs/BENCHMARKS.md).

    python -m dynavit.trainer.bench.start [--sizes 10000,100000,1280000] [--scan-up-to 100000]

Writes a synthetic dataset per size into a scratch folder (shards of 1000 samples, as
dynaprep writes by default; each sample a 1-byte .jpg and its .cls in real tar bytes, so a
header scan reads what it reads on ImageNet: one 512-byte header per member; manifest.parquet
with a source path, a wnid and a sha256 per row, as an ImageNet one has them), then builds
the train loader in a fresh process and reports the wall time of `build_loader`, the
growth of peak RSS over the process before it, and the number of `os.pread` calls. Sizes
up to --scan-up-to are measured again with manifest.parquet in the older format (no
offset columns), which makes the loader scan every image shard's headers: the cost the
offsets remove. A least-squares line through the offset-path figures is extrapolated to
ImageNet-1k (1,281,167 training images) and ImageNet-21k (14,197,122).

Warm page cache (the files were just written): on a network filesystem the scan's reads
cost far more, the offset path's per-shard reads a little more. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_1K, IMAGENET_21K = 1_281_167, 14_197_122
SHARD = 1000


def make_dataset(out: Path, n: int) -> None:
    """n samples in shards of SHARD: image tars with 1-byte members, index shards whose
    first sample is real and the rest sparse (the loader's start reads only the first)."""
    import numpy as np
    import pyarrow as pa

    from dynavit.manifests import DatasetInfo, KInfo, SplitCounts, TarWriter, k_count, npy_bytes, write_dataset_info
    from dynavit.manifests.io import write_shards, write_table_atomic
    from dynavit.manifests.schema import MANIFEST_PARQUET, MANIFEST_SCHEMA, image_shard_name, index_shard_name

    size, patch, k = 16, 4, 50
    grid_n = (size // patch) ** 2
    info = DatasetInfo(dataset="synthetic", source="bench_start", image_size=(size, size), patch_size=patch,
                       scorers=["l2"], ks=[KInfo(k, k_count(k, grid_n), 1 + k_count(k, grid_n))],
                       classes=[str(i) for i in range(1000)], shard_size=SHARD)
    (out / "train").mkdir(parents=True)
    keys = [f"{i:010d}" for i in range(n)]
    offsets = np.empty(n, np.int64)
    index_members = {"scores.npy": npy_bytes(np.zeros((size // patch,) * 2, np.float16)),
                     f"k{k}.npy": npy_bytes(np.arange(k_count(k, grid_n), dtype=np.uint8))}
    rows = []
    for shard, start in enumerate(range(0, n, SHARD)):
        count = min(SHARD, n - start)
        with TarWriter(out / image_shard_name("train", shard)) as w:
            for i in range(start, start + count):
                offsets[i] = w.write(keys[i], {"jpg": b"x", "cls": b"%d" % (i % 1000)})["jpg"]
        index_path = out / index_shard_name("train", "l2", shard)
        with TarWriter(index_path) as w:
            w.write(keys[start], index_members)
            record = w._offset
        os.truncate(index_path, count * record + 10240)  # sparse: the rest is never read at start
        rows.append({"split": "train", "shard": shard, "images": image_shard_name("train", shard),
                     "images_bytes": w.digest[1], "images_sha256": "0" * 64,
                     "index": [{"scorer": "l2", "path": index_shard_name("train", "l2", shard),
                                "bytes": os.path.getsize(index_path), "sha256": "0" * 64}], "count": count})
    write_shards(out, rows)
    # The other columns as an ImageNet manifest fills them (a source path, a wnid, a sha256):
    # they are most of the table's bytes, and the trainer needs none of them.
    labels = np.arange(n) % 1000
    wnids = [f"n{0x1000000 + 7919 * c:08d}" for c in labels.tolist()]
    digests = np.random.default_rng(0).bytes(32 * n)
    digests = [digests[32 * i:32 * i + 32].hex() for i in range(n)]
    table = pa.table({
        "split": pa.array(["train"] * n), "key": pa.array(keys), "shard": pa.array(np.arange(n) // SHARD, pa.int32()),
        "label": pa.array(labels, pa.int32()), "class_name": pa.array(wnids),
        "source": pa.array([f"/datasets/imagenet/train/{w}/{w}_{i}.JPEG" for i, w in enumerate(wnids)]),
        "orig_width": pa.array(np.full(n, 500), pa.int32()), "orig_height": pa.array(np.full(n, 375), pa.int32()),
        "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()), "sha256": pa.array(digests),
        "image_offset": pa.array(offsets), "image_bytes": pa.array(np.ones(n, np.int64))}, schema=MANIFEST_SCHEMA)
    write_table_atomic(out / MANIFEST_PARQUET, table, MANIFEST_SCHEMA)
    import pyarrow.parquet as pq

    pq.write_table(table.drop_columns(["image_offset", "image_bytes"]), out / "manifest-old.parquet")
    info.splits["train"] = SplitCounts(ok=n, failed=0, shards=len(rows))
    write_dataset_info(out, info)


def measure(dataset: str) -> dict:
    """In this (fresh) process: build the train loader once; time, RSS growth, preads."""
    import resource

    from dynavit.trainer.data import build_loader

    real, calls = os.pread, {"n": 0}

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    os.pread = counted
    t0 = time.perf_counter()
    loader = build_loader(dataset, "train", k=50, batch_size=256, train=True)
    seconds = time.perf_counter() - t0
    os.pread = real
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples": len(loader.table), "seconds": seconds, "peak_rss_mib": (peak - before) / 1024,
            "preads": calls["n"]}


def _child(dataset: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dynavit.trainer.bench.start", "--measure", str(dataset)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(xs, ys) -> tuple[float, float]:
    """Least squares y = a + b·x."""
    import numpy as np

    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynavit.trainer.bench.start", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1280000", help="sample counts, comma-separated")
    p.add_argument("--scan-up-to", type=int, default=100000, help="also time the older scan path up to this size")
    p.add_argument("--scratch", default=None, help="where to write the synthetic datasets (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or min(sizes) < SHARD:
        p.error(f"--sizes must be at least {SHARD}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_start-"))
    results = []
    try:
        for n in sizes:
            ds = scratch / f"n{n}"
            t0 = time.perf_counter()
            make_dataset(ds, n)
            print(f"{n:>10,} samples: written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            row = {"samples": n, "offsets": _child(ds)}
            if n <= args.scan_up_to:
                new = ds / "manifest.parquet"
                new.rename(ds / "manifest-new.parquet")
                shutil.copy(ds / "manifest-old.parquet", new)
                row["scan"] = _child(ds)
            results.append(row)
            print(_line(row), file=sys.stderr)
            shutil.rmtree(ds)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _line(row: dict) -> str:
    o = row["offsets"]
    text = f"{row['samples']:>10,}: offsets {o['seconds']:.3f} s, +{o['peak_rss_mib']:.0f} MiB, {o['preads']} preads"
    if "scan" in row:
        s = row["scan"]
        text += f"; scan {s['seconds']:.3f} s, +{s['peak_rss_mib']:.0f} MiB, {s['preads']} preads"
    return text


def report(results: list[dict]) -> str:
    lines = ["| samples | start, offsets (s) | peak RSS growth (MiB) | preads | start, scan (s) | preads, scan |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        o, s = r["offsets"], r.get("scan")
        lines.append(f"| {r['samples']:,} | {o['seconds']:.3f} | {o['peak_rss_mib']:.0f} | {o['preads']:,} | "
                     + (f"{s['seconds']:.3f} | {s['preads']:,} |" if s else "– | – |"))
    if len(results) >= 2:
        xs = [r["samples"] for r in results]
        a, b = fit(xs, [r["offsets"]["seconds"] for r in results])
        ma, mb = fit(xs, [r["offsets"]["peak_rss_mib"] for r in results])
        lines.append("")
        lines.append(f"Fit (offsets): start ≈ {a:.3f} s + {b * 1e6:.2f} µs/sample; peak RSS growth ≈ "
                     f"{ma:.0f} MiB + {mb * 1e6 / 1024:.2f} KiB/sample")
        for name, n in (("ImageNet-1k", IMAGENET_1K), ("ImageNet-21k", IMAGENET_21K)):
            lines.append(f"Extrapolated {name} ({n:,} samples): start ≈ {a + b * n:.1f} s, "
                         f"peak RSS growth ≈ {ma + mb * n:,.0f} MiB")
        scans = [r for r in results if "scan" in r]
        if scans:
            per = max(r["scan"]["seconds"] / r["samples"] for r in scans)
            lines.append(f"Scan path, measured up to {scans[-1]['samples']:,}: ≈ {per * 1e6:.1f} µs/sample warm; "
                         f"ImageNet-1k ≈ {per * IMAGENET_1K:.0f} s per loader and rank before the first step")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
