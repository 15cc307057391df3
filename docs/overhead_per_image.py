"""dynaprep's own CPU time per image: `run_index` at 1 worker with the decode/resize and
the JPEG encode replaced by cached results, so what is left is reading the file plus what
dynaprep adds to the floor (input sha256, scoring, top-K, tar and Parquet writing, fsync,
merge). PYTHONPATH picks the code tree, so two trees can be compared on the same JPEGs:

    python docs/overhead_per_image.py SRC [OUT]     (SRC: an imagefolder, e.g. bench-index's src-500x375)
"""
import shutil
import statistics
import sys
import time
from pathlib import Path

import numba

import dynavit.pipeline.index as ix
from dynavit.pipeline.decode import encode_image, load_image
from dynavit.pipeline.index import IndexConfig, run_index
from dynavit.pipeline.sources import open_source

if __name__ == "__main__":
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/dynaprep-overhead"
    numba.set_num_threads(1)
    files = sorted(Path(src, "train").rglob("*.JPEG"))[:64]
    decoded = [load_image(f.read_bytes(), 224, "center-crop", 0.875, 16) for f in files]
    encoded = [encode_image(d.rgb, "jpg", 95) for d in decoded]
    calls = [0]

    def cached_load(data, *args, **kwargs):
        calls[0] += 1
        return decoded[calls[0] % len(decoded)]

    ix.load_image = cached_load
    ix.encode_image = lambda rgb, fmt, quality: encoded[calls[0] % len(encoded)]

    def one_run() -> float:
        shutil.rmtree(out, ignore_errors=True)
        cfg = IndexConfig(data="imagefolder", src=src, out=out, ks=[70, 50, 25], scorers=["l2"], shard_size=250,
                          workers=1)
        source = open_source("imagefolder", src)
        t = time.process_time()
        result = run_index(cfg, source, progress_bar=False)
        return (time.process_time() - t) / result.ok * 1e6

    one_run()  # kernels and page cache warm
    runs = [one_run() for _ in range(5)]
    print(f"read + dynaprep's own work, CPU µs/image: {[round(x) for x in runs]}, median {statistics.median(runs):.0f}")
    shutil.rmtree(out, ignore_errors=True)
