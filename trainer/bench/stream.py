"""Streaming (--stream) against random access: loader throughput side by side (issue 25).

    python -m dynavit.trainer.bench.stream [--n 2048] [--size 160] [--workers 2] [--repeats 3]

Indexes `--n` demo images (dynaprep index --data demo, shards of 256, JPEG, K=50) into a
scratch folder, serves it with `python -m http.server` on 127.0.0.1 in another process, and
reads one training epoch (batches of 64, K=50, flips) with three loaders, in turns, `--repeats`
times each: the random-access loader on the local folder, --stream over the same local
files, and --stream over loopback http with the image tars absent from the folder the
trainer reads. Each figure is samples per second over one epoch, loader construction and
worker start included (what a training epoch pays); the median over the repeats is reported
with the ratio of each streaming mode to random access.

Loopback http has no network latency or bandwidth limit: the figures measure what the
streaming reader itself costs (tar parsing, key checks, the shuffle buffer, the HTTP client)
against preads; a real object store adds its own latency, which streaming hides behind large
sequential reads and random access would pay per sample (hence the cache copy). Not part of
`make test`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("random access, local", "stream, local files", "stream, loopback http")


def index_demo(out: Path, n: int, size: int, workers: int) -> None:
    subprocess.run([sys.executable, "-m", "dynavit.pipeline.cli", "index", "--data", "demo", "-o", f"n_train={n}",
                    "-o", "n_val=64", "--image-size", str(size), "--k", "50", "--scorer", "l2", "--shard-size", "256",
                    "--workers", str(workers), "--out", str(out), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on 127.0.0.1 serving `folder`; waits until it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the http server did not start in 30 s")


def epoch_rate(dataset: Path, workers: int, batch: int, epoch: int, **kw) -> dict:
    """One training epoch of one loader: samples/s, build and worker start included."""
    from dynavit.trainer.data import build_loader

    t0 = time.perf_counter()
    loader = build_loader(dataset, "train", k=50, batch_size=batch, workers=workers, recycle_buffers=True, **kw)
    loader.set_epoch(epoch)
    samples = sum(len(b) for b in loader)
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "rate": samples / seconds}


def run(n: int, size: int, workers: int, repeats: int, batch: int, buffer: int, scratch: Path) -> dict:
    full, light = scratch / "ds", scratch / "light"
    t0 = time.perf_counter()
    index_demo(full, n, size, workers)
    print(f"indexed {n} demo images at {size} px in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    shutil.copytree(full, light, ignore=shutil.ignore_patterns("images-*.tar"))  # the trainer's folder: no images
    server, url = serve(full)
    rates: dict[str, list] = {m: [] for m in MODES}
    try:
        for r in range(repeats):
            for mode in MODES:
                if mode == MODES[0]:
                    fig = epoch_rate(full, workers, batch, r)
                elif mode == MODES[1]:
                    fig = epoch_rate(full, workers, batch, r, stream=True, stream_buffer=buffer)
                else:
                    fig = epoch_rate(light, workers, batch, r, stream=True, stream_buffer=buffer, images_root=url)
                rates[mode].append(fig["rate"])
                print(f"  repeat {r + 1}: {mode}: {fig['samples']} samples in {fig['seconds']:.2f} s = "
                      f"{fig['rate']:.0f} samples/s", file=sys.stderr)
    finally:
        server.kill()
        server.wait()
    return {"n": n, "size": size, "workers": workers, "batch": batch, "buffer": buffer, "repeats": repeats,
            "rates": rates}


def report(result: dict) -> str:
    rates = result["rates"]
    base = statistics.median(rates[MODES[0]])
    lines = [f"{result['n']:,} demo JPEGs at {result['size']} px, batches of {result['batch']}, K=50, "
             f"{result['workers']} workers, shuffle buffer {result['buffer']}; median of {result['repeats']} epochs each",
             "", "| loader | samples/s (median) | each epoch | ÷ random access |", "|---|---:|---:|---:|"]
    for mode in MODES:
        med = statistics.median(rates[mode])
        lines.append(f"| {mode} | {med:.0f} | {' / '.join(f'{x:.0f}' for x in rates[mode])} | {med / base:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynavit.trainer.bench.stream", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="demo training images (shards of 256)")
    p.add_argument("--size", type=int, default=160, help="stored image size (a multiple of 16)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of each loader")
    p.add_argument("--repeats", type=int, default=3, help="epochs per loader (in turns)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--buffer", type=int, default=1000, help="--stream-buffer")
    p.add_argument("--scratch", default=None, help="where to index (default: a temp dir, removed after)")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    if args.n < 256 or args.size < 16 or args.size % 16 or args.workers < 0 or args.repeats < 1 or args.batch_size < 1:
        p.error("need --n >= 256, --size a multiple of 16, --workers >= 0, --repeats >= 1, --batch-size >= 1")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_stream-"))
    try:
        result = run(args.n, args.size, args.workers, args.repeats, args.batch_size, args.buffer, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
