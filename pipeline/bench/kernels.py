"""Saliency kernel benchmark: Numba vs a vectorised NumPy implementation vs a memory floor.

    python -m dynavit.pipeline.bench.kernels [--batch-size 256] [--size 224] [--patch 16] [--repeats 5]

Times are the median over repeats (after one warm-up call), in µs per image. The floor is
`np.copy` of the same uint8 batch: no scorer can beat reading the bytes once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numba
import numpy as np

from dynavit.pipeline.saliency import IMAGENET_MEAN, IMAGENET_STD, SCORERS, score_patches


def _grid(a, p):
    b, h, w = a.shape[:3]
    return np.moveaxis(a.reshape(b, h // p, p, w // p, p, *a.shape[3:]), 3, 2)


# Vectorised NumPy versions (float32 where it is accurate enough, as a fast NumPy port would be).
def np_l2(img, p):
    a = (1.0 / (255.0 * np.asarray(IMAGENET_STD))).astype(np.float32)
    m = (np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)
    b, h, w, _ = img.shape
    z = img.astype(np.float32) * a - m
    return np.sqrt(np.square(z, out=z).reshape(b, h // p, p, w // p, p * 3).sum(axis=(2, 4)))


def np_sobel(img, p):
    f = img.astype(np.float32)
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    y = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="edge")  # = scipy 'reflect' for a 1-pixel halo
    sm_x = y[:, :, :-2] + 2 * y[:, :, 1:-1] + y[:, :, 2:]   # [1,2,1] along columns
    sm_y = y[:, :-2] + 2 * y[:, 1:-1] + y[:, 2:]            # [1,2,1] along rows
    gy = sm_x[:, 2:] - sm_x[:, :-2]
    gx = sm_y[:, :, 2:] - sm_y[:, :, :-2]
    return _grid(np.hypot(gx, gy), p).mean(axis=(3, 4))


def np_entropy(img, p):
    b, h, w, _ = img.shape
    gh, gw = h // p, w // p
    i = img.astype(np.int32)
    yi = (299 * i[..., 0] + 587 * i[..., 1] + 114 * i[..., 2] + 500) // 1000
    pid = np.arange(b * gh * gw, dtype=np.int64).reshape(b, gh, 1, gw, 1)
    hist = np.bincount((yi.reshape(b, gh, p, gw, p) + 256 * pid).ravel(),
                       minlength=pid.size * 256).reshape(-1, 256)
    q = hist / float(p * p)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(hist > 0, q * np.log2(q), 0.0).sum(axis=1)
    return ent.reshape(b, gh, gw)


def _np_sums(img, p):
    """Per patch and channel: sum and sum of squares (float32 holds these integers exactly)."""
    b, h, w, _ = img.shape
    f = img.astype(np.float32).reshape(b, h // p, p, w * 3)  # rows first: contiguous adds
    s = f.sum(axis=2).reshape(b, h // p, w // p, p, 3).sum(axis=3)
    q = np.square(f, out=f).sum(axis=2).reshape(b, h // p, w // p, p, 3).sum(axis=3)
    return s, q


def np_contrast(img, p):
    s, q = _np_sums(img, p)
    n = float(p * p)
    var = np.maximum(q / n - np.square(s / n), 0.0)
    return np.sqrt(var.mean(axis=-1)) / 255.0


def np_distinct(img, p):
    s, q = _np_sums(img, p)
    n = float(p * p)
    sigma = np.sqrt(np.maximum(q / n - np.square(s / n), 0.0).mean(axis=-1)) / 255.0
    mu = s / (255.0 * n)
    d_col = mu - mu.mean(axis=(1, 2), keepdims=True)
    d_tex = sigma - sigma.mean(axis=(1, 2), keepdims=True)
    return np.sqrt(np.square(d_col).sum(axis=-1) + np.square(d_tex))


NUMPY_IMPL = {"l2": np_l2, "sobel": np_sobel, "entropy": np_entropy, "contrast": np_contrast,
              "distinct": np_distinct}


def _time(fn, repeats):
    fn()  # warm-up: JIT load/compile, page faults
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dynavit.pipeline.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256, help="images per call (default 256)")
    ap.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    ap.add_argument("--patch", type=int, default=16, help="patch side (default 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.size < args.patch or args.size % args.patch:
        ap.error("need batch >= 1, repeats >= 1 and size a positive multiple of patch")

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    per = 1e6 / args.batch_size
    floor = _time(lambda: np.copy(img), args.repeats) * per
    rows = []
    for scorer in SCORERS:
        ref = NUMPY_IMPL[scorer](img, args.patch)
        np.testing.assert_allclose(score_patches(img, args.patch, scorer), ref, rtol=1e-3, atol=1e-4)
        t_nb = _time(lambda: score_patches(img, args.patch, scorer), args.repeats) * per
        t_np = _time(lambda: NUMPY_IMPL[scorer](img, args.patch), args.repeats) * per
        rows.append(dict(scorer=scorer, numba_us=t_nb, numpy_us=t_np, copy_us=floor,
                         speedup_vs_numpy=t_np / t_nb, numba_over_copy=t_nb / floor))

    print(f"batch={args.batch_size} size={args.size} patch={args.patch} repeats={args.repeats} "
          f"numba_threads={numba.get_num_threads()} cpus={os.cpu_count()}  (µs per image, median)")
    hdr = f"{'scorer':<8} {'numba':>9} {'numpy':>9} {'copy':>9} {'numpy/numba':>12} {'numba/copy':>11}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['scorer']:<8} {r['numba_us']:>9.1f} {r['numpy_us']:>9.1f} {r['copy_us']:>9.1f} "
              f"{r['speedup_vs_numpy']:>11.1f}x {r['numba_over_copy']:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(batch=args.batch_size, size=args.size, patch=args.patch, repeats=args.repeats,
                           numba_threads=numba.get_num_threads(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
