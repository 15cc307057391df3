"""Patch saliency scores (docs/FORMAT.md 'Patch scores') as Numba kernels.

`score_patches(images[B,H,W,3] uint8, patch, scorer) -> float32[B,Gh,Gw]`.

Every kernel runs one parallel task per (image, patch-row), so a batch of one large
image still uses every thread, and each task owns its scratch rows (no sharing, no
locks). Kernels are compiled with `cache=True` so dataloader/worker processes load the
machine code from disk instead of recompiling. Sums, lumas and gradients are computed as
exact integers (some held in float32, exact below 2^24), so the only rounding is in the
last float step; every score matches a float64 reference to ~1e-7 relative.

`l2` is the paper's score: the energy of the ImageNet-normalised patch, so a flat black or
white patch outranks a textured mid-grey one. `contrast` (the patch's own standard deviation)
and `distinct` (how far the patch's mean colour and contrast are from the image's) measure
content instead: a flat patch of any colour has contrast 0. docs/FORMAT.md defines each.
"""

from __future__ import annotations

import numba
import numpy as np

from dynavit.manifests.schema import SCORER_NAMES as SCORERS  # the one list of names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JIT = dict(parallel=True, cache=True, fastmath=False, nogil=True)


@numba.njit(**_JIT)
def _l2_kernel(rows, patch, a, m, out):
    # rows: images viewed as [B, H, W*3]. Per channel c, z = a_c*x - m_c with a_c = 1/(255 std_c),
    # m_c = mean_c/std_c. Sum z^2 = a^2 (Q - S^2/n) + n (a S/n - m)^2 with S = sum x, Q = sum x^2
    # (exact integers), so the hot loop is an integer sum over contiguous bytes (vectorised,
    # close to memory speed) and the float step is per patch, with no cancellation.
    nb, h, wc = rows.shape
    gh = h // patch
    gw = wc // (3 * patch)
    n = patch * patch
    for t in numba.prange(nb * gh):
        b = t // gh
        y0 = (t % gh) * patch
        s1 = np.empty(wc, np.int32)
        s2 = np.empty(wc, np.int32)  # P * 255^2 fits int32 for any P < 33000
        _channel_sums(rows, b, y0, patch, s1, s2)
        for gx in range(gw):
            acc = 0.0
            for c in range(3):
                s, q = _patch_sums(s1, s2, gx, patch, c)
                var_n = n * q - s * s  # n^2 * variance, exact
                d = a[c] * s / n - m[c]
                acc += a[c] * a[c] * var_n / n + n * d * d
            out[b, t % gh, gx] = np.sqrt(acc)


@numba.njit(inline="always", cache=True)
def _luma1000_row(row, dst):
    # 1000*Y of one flat RGB row, with one reflected column on each side (scipy 'reflect'
    # repeats the edge pixel, so the pad is a copy of the edge). float32 holds these integers
    # (<= 255000 < 2^24) exactly and, unlike int64, converts and vectorises cheaply; the
    # constant stride 3 (flat row, not [W,3]) is what lets LLVM vectorise the RGB loads.
    w = row.shape[0] // 3
    for x in range(w):
        dst[x + 1] = (np.float32(299) * np.float32(row[3 * x]) + np.float32(587) * np.float32(row[3 * x + 1])
                      + np.float32(114) * np.float32(row[3 * x + 2]))
    dst[0] = dst[1]
    dst[w + 1] = dst[w]


@numba.njit(**_JIT)
def _sobel_kernel(rows, patch, out):
    # Sobel on 1000*Y: every gradient is an integer below 2^24, so float32 computes it exactly;
    # the only rounding is the float32 hypot per pixel (rel. 1e-7) and the per-column float32
    # sum over P rows (rel. <= P * 6e-8).
    nb, h, wc = rows.shape
    w = wc // 3
    gh = h // patch
    gw = w // patch
    scale = 1.0 / (1000.0 * patch * patch)
    for t in numba.prange(nb * gh):
        b = t // gh
        y0 = (t % gh) * patch
        r0 = np.empty(w + 2, np.float32)
        r1 = np.empty(w + 2, np.float32)
        r2 = np.empty(w + 2, np.float32)
        col = np.zeros(w, np.float32)
        _luma1000_row(rows[b, max(y0 - 1, 0)], r0)  # reflect: row -1 is row 0
        _luma1000_row(rows[b, y0], r1)
        for y in range(y0, y0 + patch):
            _luma1000_row(rows[b, min(y + 1, h - 1)], r2)  # reflect: row H is row H-1
            for x in range(w):
                gx = (r0[x + 2] - r0[x]) + np.float32(2) * (r1[x + 2] - r1[x]) + (r2[x + 2] - r2[x])
                gy = ((r2[x] + np.float32(2) * r2[x + 1] + r2[x + 2])
                      - (r0[x] + np.float32(2) * r0[x + 1] + r0[x + 2]))
                col[x] += np.sqrt(gx * gx + gy * gy)
            r0, r1, r2 = r1, r2, r0
        for gx in range(gw):
            s = 0.0
            for x in range(gx * patch, (gx + 1) * patch):
                s += col[x]
            out[b, t % gh, gx] = s * scale


@numba.njit(**_JIT)
def _entropy_kernel(rows, patch, clog, out):
    # H = log2(n) - (1/n) sum_c c*log2(c); clog[c] = c*log2(c) is precomputed for 0..n.
    # Indices are unsigned so Numba emits no negative-index wraparound fix-up in the two
    # scatter/gather loops that dominate the time.
    nb, h, wc = rows.shape
    w = wc // 3
    gh = h // patch
    gw = w // patch
    n = patch * patch
    log2n = np.log2(n)
    for t in numba.prange(nb * gh):
        b = t // gh
        y0 = (t % gh) * patch
        yi = np.empty(w, np.uint32)
        hist = np.zeros(gw * 256, np.int32)
        for y in range(y0, y0 + patch):
            row = rows[b, y]
            for x in range(w):  # vectorised: the division by a constant becomes a multiply-shift
                yi[x] = (np.uint32(299) * np.uint32(row[3 * x]) + np.uint32(587) * np.uint32(row[3 * x + 1])
                         + np.uint32(114) * np.uint32(row[3 * x + 2]) + np.uint32(500)) // np.uint32(1000)
            for gx in range(gw):
                base = np.uint64(gx * 256)
                for x in range(gx * patch, (gx + 1) * patch):
                    hist[base + yi[x]] += 1
        for gx in range(gw):
            # four partial sums: without fastmath one float chain would serialise on add latency
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            for v in range(gx * 256, gx * 256 + 256, 4):
                s0 += clog[np.uint32(hist[v])]
                s1 += clog[np.uint32(hist[v + 1])]
                s2 += clog[np.uint32(hist[v + 2])]
                s3 += clog[np.uint32(hist[v + 3])]
            out[b, t % gh, gx] = max(log2n - ((s0 + s1) + (s2 + s3)) / n, 0.0)  # clamp -1ulp


@numba.njit(inline="always", cache=True)
def _channel_sums(rows, b, y0, patch, s1, s2):
    # Column sums of x and x^2 over one row of patches (P image rows), exact int32.
    s1[:] = 0
    s2[:] = 0
    wc = rows.shape[2]
    for y in range(y0, y0 + patch):
        r = rows[b, y]
        for j in range(wc):
            v = np.int32(r[j])
            s1[j] += v
            s2[j] += v * v


@numba.njit(inline="always", cache=True)
def _patch_sums(s1, s2, gx, patch, c):
    # S_c = sum x and Q_c = sum x^2 of channel c over patch gx of a row of patches (int64).
    s = np.int64(0)
    q = np.int64(0)
    for j in range(gx * patch * 3 + c, (gx + 1) * patch * 3, 3):
        s += s1[j]
        q += s2[j]
    return s, q


@numba.njit(**_JIT)
def _contrast_kernel(rows, patch, out):
    # sigma = sqrt( sum_c (n*Q_c - S_c^2) / (3 n^2) ) / 255: the per-channel variances come
    # from exact integer sums (n*Q_c - S_c^2 = n^2 var_c, int64), so a flat patch is exactly 0
    # and the only roundings are the final division and sqrt.
    nb, h, wc = rows.shape
    gh = h // patch
    gw = wc // (3 * patch)
    n = patch * patch
    for t in numba.prange(nb * gh):
        b = t // gh
        s1 = np.empty(wc, np.int32)
        s2 = np.empty(wc, np.int32)
        _channel_sums(rows, b, (t % gh) * patch, patch, s1, s2)
        for gx in range(gw):
            tot = np.int64(0)
            for c in range(3):
                s, q = _patch_sums(s1, s2, gx, patch, c)
                tot += n * q - s * s
            out[b, t % gh, gx] = np.sqrt(tot / (3.0 * n * n)) / 255.0


@numba.njit(**_JIT)
def _distinct_kernel(rows, patch, psum, sigma, out):
    # Pass 1 (per image row of patches): each patch's channel sums S_c (int64, exact) and its
    # contrast sigma. Pass 2 (per image): the image's channel totals and mean sigma, then
    # distinct = sqrt( sum_c ((G*S_c - T_c) / (255 n G))^2 + (sigma - mean sigma)^2 ); the
    # colour difference has an exact integer numerator, so a patch whose mean colour equals
    # the image's scores exactly 0 in colour.
    nb, h, wc = rows.shape
    gh = h // patch
    gw = wc // (3 * patch)
    n = patch * patch
    for t in numba.prange(nb * gh):
        b = t // gh
        gy = t % gh
        s1 = np.empty(wc, np.int32)
        s2 = np.empty(wc, np.int32)
        _channel_sums(rows, b, gy * patch, patch, s1, s2)
        for gx in range(gw):
            tot = np.int64(0)
            for c in range(3):
                s, q = _patch_sums(s1, s2, gx, patch, c)
                psum[b, gy, gx, c] = s
                tot += n * q - s * s
            sigma[b, gy, gx] = np.sqrt(tot / (3.0 * n * n)) / 255.0
    g = gh * gw
    for b in numba.prange(nb):
        tc = np.zeros(3, np.int64)
        ms = 0.0
        for gy in range(gh):
            for gx in range(gw):
                for c in range(3):
                    tc[c] += psum[b, gy, gx, c]
                ms += sigma[b, gy, gx]
        ms /= g
        den = 255.0 * n * g
        for gy in range(gh):
            for gx in range(gw):
                acc = 0.0
                for c in range(3):
                    d = (g * psum[b, gy, gx, c] - tc[c]) / den
                    acc += d * d
                d = sigma[b, gy, gx] - ms
                out[b, gy, gx] = np.sqrt(acc + d * d)


_CLOG: dict[int, np.ndarray] = {}


def _clog_table(n: int) -> np.ndarray:
    tab = _CLOG.get(n)
    if tab is None:
        c = np.arange(n + 1, dtype=np.float64)
        tab = np.zeros(n + 1, np.float64)
        tab[1:] = c[1:] * np.log2(c[1:])
        _CLOG[n] = tab
    return tab


def _channel_vec(name: str, value) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
    return v


def score_patches(images: np.ndarray, patch: int, scorer: str,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Score every P×P patch of a batch of RGB uint8 images: float32 [B, H/P, W/P].

    `mean`/`std` only affect `l2` (they define the model input z = (x/255 - mean)/std).
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; valid scorers: {', '.join(SCORERS)}")
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy uint8 array [B,H,W,3], got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must have shape [B,H,W,3], got {images.shape}")
    if isinstance(patch, (bool, np.bool_)) or not isinstance(patch, (int, np.integer)) or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    patch = int(patch)
    nb, h, w, _ = images.shape
    if h == 0 or w == 0 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} (HxW) is not a positive multiple of patch {patch}")
    # one compiled specialisation per kernel: C layout, viewed as flat RGB rows [B, H, W*3]
    rows = np.ascontiguousarray(images).reshape(nb, h, w * 3)
    out = np.empty((nb, h // patch, w // patch), np.float32)
    if scorer == "l2":
        m = _channel_vec("mean", mean)
        s = _channel_vec("std", std)
        if np.any(s <= 0):
            raise ValueError(f"std must be positive, got {std!r}")
        _l2_kernel(rows, patch, 1.0 / (255.0 * s), m / s, out)
    elif scorer == "sobel":
        _sobel_kernel(rows, patch, out)
    elif scorer == "contrast":
        _contrast_kernel(rows, patch, out)
    elif scorer == "distinct":
        gh, gw = h // patch, w // patch
        _distinct_kernel(rows, patch, np.empty((nb, gh, gw, 3), np.int64), np.empty((nb, gh, gw), np.float64), out)
    elif scorer == "entropy":
        _entropy_kernel(rows, patch, _clog_table(patch * patch), out)
    return out
