"""Where `dynaprep index` spends its time, per image and per stage, on the benchmark's JPEGs.

    python -m dynavit.pipeline.bench.profile --n 1000 --mix 500x375
    python -m dynavit.pipeline.bench.profile --n 1000 --mix mixed --scorer l2,sobel,entropy
    python -m dynavit.pipeline.bench.profile --resize --n 300 --mix mixed   # ours vs OpenCV

Stage profile: one in-process `run_index` at 1 worker (as bench_index.run_dynaprep) with
the functions process_unit calls wrapped in timers (the source's reader, decode's
stages, sha256, score_patches, select_topk_multi, encode_image, ShardPairWriter, the
Parquet parts, the merge), so the real code path is measured, whatever index.py does
around them. Times are process CPU time by default (`--clock wall` for wall time): other
processes on a busy machine do not count. "not in a stage" is the run's total minus the
stages (the loop, np.stack, manifest rows, progress). Then, side by side in each repeat,
wall-clock runs of dynaprep and of the floor (bench_index.run_floor) at 1 and 2 workers:
their ratios, and the inter-process cost, 2/throughput(2) − 1/throughput(1) per image per
worker (pool start-up, pickling, the parent process, two workers sharing 2 CPUs), with
the workers' start-up (imports, numba kernels) measured in fresh interpreters. Every
figure is the median of `--repeats` repeats.

--resize: decode+resize+crop (and + encode) µs/image of load_image against the previous
PIL path and OpenCV (img2dataset's resizer: cv2.imdecode, INTER_AREA down / LANCZOS4 up,
cv2.imencode), with PSNR against a float64 Lanczos-3 resize of the full-resolution
decode. OpenCV is optional (`pip install opencv-python-headless`); without it its row is
left out.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dynavit.pipeline import decode
from dynavit.pipeline.bench.index import MIXES, describe_mix, make_jpegs, run_dynaprep, run_floor

FLOOR_STAGES = ("read bytes", "decode (incl. draft)", "to numpy (RGBX)", "to numpy", "resize + crop", "encode")
# (stage, module, attribute): the functions process_unit and _flush call, wrapped in timers.
# decode's stages are looked up by load_image at call time; index's by name in index.py.
_TIMED = (
    ("decode (incl. draft)", "decode", "_decode_bytes"),
    ("to numpy (RGBX)", "decode", "_pixels"),
    ("to numpy", "decode", "_to_array"),  # the keep_size path (and releases before RGBX)
    ("resize + crop", "decode", "_fit"),
    ("manifest sha256", "index", "_sha256"),
    ("score {scorer}", "index", "score_patches"),
    ("top-K", "index", "select_topk_multi"),
    ("pad-aware box/masks", "index", "_content_box"),
    ("pad-aware box/masks", "index", "padding_masks"),
    ("pad-aware box/masks", "index", "mask_scores"),
    ("encode", "index", "encode_image"),
    ("parquet parts", "index", "write_table_atomic"),
)


class _Timers:
    """Wraps the stage functions of a 1-worker, in-process `run_index` in timers (process
    CPU time by default: other processes on a busy machine do not count) and undoes it."""

    def __init__(self, clock):
        self.clock, self.t, self._undo = clock, defaultdict(float), []

    def _wrap(self, owner, attr, stage):
        fn = getattr(owner, attr, None)
        if fn is None:  # index.py without that stage (e.g. no --pad-aware support)
            return
        clock, t = self.clock, self.t

        def timed(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                name = stage.format(scorer=a[2] if len(a) > 2 else k.get("scorer", "?"))
                t[name] += clock() - t0
        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def __enter__(self):
        from dynavit.manifests import ShardPairWriter
        from dynavit.pipeline.sources.base import Source

        from dynavit.pipeline import index
        mods = {"decode": decode, "index": index}
        for stage, mod, attr in _TIMED:
            self._wrap(mods[mod], attr, stage)
        self._wrap(ShardPairWriter, "add", "tar write (incl. its sha256)")
        self._wrap(ShardPairWriter, "__init__", "tar open/close, fsync")
        self._wrap(ShardPairWriter, "commit", "tar open/close, fsync")
        clock, t, read_unit = self.clock, self.t, Source.read_unit

        def timed_read(src, unit):
            it = iter(read_unit(src, unit))
            while True:
                t0 = clock()
                raw = next(it, None)
                t["read bytes"] += clock() - t0
                if raw is None:
                    return
                yield raw
        Source.read_unit = timed_read
        self._undo.append((Source, "read_unit", read_unit))
        self._wrap(index, "merge", "merge (manifest.parquet, dataset.json)")
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def _dynaprep_1w(src, out, cfg_kw, clock, timers=None) -> tuple[float, int]:
    """One in-process run_index (as bench_index.run_dynaprep at 1 worker); (seconds, images)."""
    from dynavit.pipeline.index import IndexConfig, run_index
    from dynavit.pipeline.sources import open_source

    shutil.rmtree(out, ignore_errors=True)
    cfg = IndexConfig(data="imagefolder", src=str(src), out=str(out), workers=1, **cfg_kw)
    source = open_source("imagefolder", str(src))
    t0 = clock()
    if timers is None:
        result = run_index(cfg, source, progress_bar=False)
    else:
        with timers:
            result = run_index(cfg, source, progress_bar=False)
    return clock() - t0, result.ok


def _startup_s(code: str) -> float:
    """Seconds a fresh interpreter takes to run `code` (imports, numba kernels loaded)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter()\n" + code +
                        "\nprint(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


_WORKER_IMPORTS = {  # what a spawned pool worker does before its first image
    "dynaprep": "import numpy as np\nimport dynavit.pipeline.index as i\nfrom dynavit.pipeline.sources import open_source\n"
                "from dynavit.pipeline.saliency import score_patches\nfrom dynavit.pipeline.decode import load_image\n"
                "load_image(np.zeros((32, 32, 3), np.uint8), 16)\n"
                "score_patches(np.zeros((1, 16, 16, 3), np.uint8), 16, 'l2')",
    "floor": "import numpy as np\nfrom dynavit.pipeline.bench.index import _floor_unit\n"
             "from dynavit.pipeline.decode import load_image, encode_image\n"
             "load_image(np.zeros((32, 32, 3), np.uint8), 16)",
}


def profile(n: int = 1000, mix: str = "500x375", scorers=("l2",), ks=(70, 50, 25), shard_size: int = 250,
            repeats: int = 3, workdir=None, two_workers: bool = True, clock: str = "cpu") -> dict:
    """Run the profile; medians of `repeats` (each repeat runs every measurement once, in turn)."""
    import numba

    from dynavit.pipeline.saliency import score_patches

    tick = time.process_time if clock == "cpu" else time.perf_counter
    work = Path(workdir or tempfile.mkdtemp(prefix="dynaprep-profile-"))
    try:
        src = make_jpegs(work / f"src-{mix}", n, mix=mix)
        cfg_kw = dict(ks=list(ks), scorers=list(scorers), shard_size=shard_size)
        numba.set_num_threads(1)  # one worker = one core, as bench_index.run_dynaprep
        for scorer in scorers:  # kernels loaded outside the timings
            score_patches(np.zeros((1, 16, 16, 3), np.uint8), 16, scorer)
        run_floor(src, 1, shard_size, 224, 16, "jpg", 95)  # page cache and resize kernels warm
        stages, e2e, ratios = defaultdict(list), defaultdict(list), defaultdict(list)
        for _ in range(repeats):
            timers = _Timers(tick)
            secs, count = _dynaprep_1w(src, work / "out-timed", cfg_kw, tick, timers)
            for k, v in timers.t.items():
                stages[k].append(v / count * 1e6)
            e2e["dynaprep 1 worker, timed"].append(secs / count * 1e6)
            secs, count = _dynaprep_1w(src, work / "out", cfg_kw, tick)
            e2e["dynaprep 1 worker"].append(secs / count * 1e6)
            # wall-clock ratios, side by side
            d1 = run_dynaprep(src, work / "out", 1, shard_size, 224, 16, "jpg", 95, ks, scorers)
            f1 = run_floor(src, 1, shard_size, 224, 16, "jpg", 95)
            ratios["1 worker"].append(d1 / f1)
            e2e["wall dynaprep 1w"].append(1e6 / d1)
            e2e["wall floor 1w"].append(1e6 / f1)
            if two_workers:
                d2 = run_dynaprep(src, work / "out", 2, shard_size, 224, 16, "jpg", 95, ks, scorers)
                f2 = run_floor(src, 2, shard_size, 224, 16, "jpg", 95)
                ratios["2 workers"].append(d2 / f2)
                e2e["wall dynaprep 2w"].append(2e6 / d2)   # µs per image per worker
                e2e["wall floor 2w"].append(2e6 / f2)
        startup = {k: float(np.median([_startup_s(c) for _ in range(3)])) for k, c in _WORKER_IMPORTS.items()}
        med = lambda d: {k: float(np.median(v)) for k, v in d.items()}  # noqa: E731
        return {"n": n, "mix": mix, "scorers": list(scorers), "ks": list(ks), "repeats": repeats, "clock": clock,
                "stages": med(stages), "e2e": med(e2e), "ratios": med(ratios), "startup_s": startup,
                "runs": {**{k: list(v) for k, v in e2e.items()}, **{"ratio " + k: list(v) for k, v in ratios.items()}}}
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def format_profile(r: dict) -> str:
    st, e, q = r["stages"], r["e2e"], r["ratios"]
    total = e["dynaprep 1 worker, timed"]
    clock = "process CPU time" if r["clock"] == "cpu" else "wall time"
    lines = [f"dynaprep index, 1 worker in-process: {r['n']} {describe_mix(r['mix'])} -> 224 jpg q95, scorers "
             f"{','.join(r['scorers'])}, K {','.join(map(str, r['ks']))}; {clock}, median of {r['repeats']}; "
             f"resampler {decode.RESAMPLER}",
             f"{'stage':<40}{'µs/image':>10}{'%':>7}"]
    for name, us in sorted(st.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<40}{us:>10.0f}{100 * us / total:>6.1f}%")
    s = sum(st.values())
    lines.append(f"{'not in a stage (loop, stack, rows, ...)':<40}{total - s:>10.0f}{100 * (total - s) / total:>6.1f}%")
    lines.append(f"{'total (timed run)':<40}{total:>10.0f}{100.0:>6.1f}%")
    lines.append(f"{'untimed run (timer overhead = diff)':<40}{e['dynaprep 1 worker']:>10.0f}")
    fs = sum(st.get(k, 0.0) for k in FLOOR_STAGES)
    lines.append(f"{'floor stages (read, decode, resize, enc)':<40}{fs:>10.0f}{100 * fs / total:>6.1f}%")
    lines.append(f"wall clock, side by side: dynaprep/floor img/s at 1 worker {q['1 worker']:.3f} "
                 f"(µs/image {e['wall dynaprep 1w']:.0f} vs {e['wall floor 1w']:.0f})")
    if "2 workers" in q:
        d2, f2 = e["wall dynaprep 2w"], e["wall floor 2w"]
        lines.append(f"  at 2 workers {q['2 workers']:.3f} (µs per image per worker {d2:.0f} vs {f2:.0f}); "
                     f"inter-process (2w - 1w per image per worker): dynaprep {d2 - e['wall dynaprep 1w']:.0f} µs, "
                     f"floor {f2 - e['wall floor 1w']:.0f} µs")
        su = r["startup_s"]
        extra = (su["dynaprep"] - su["floor"]) * 2 / r["n"] * 1e6
        lines.append(f"  worker start-up (imports, numba kernels): dynaprep {su['dynaprep']:.2f} s, floor "
                     f"{su['floor']:.2f} s -> {extra:.0f} µs per image per worker at 2 workers and n={r['n']}")
    return "\n".join(lines)


# --- resize: ours vs OpenCV, speed and quality --------------------------------------------

def _lanczos_weights(in_size: int, in0: float, in1: float, out_size: int, a: int = 3) -> np.ndarray:
    """Dense float64 [out, in] antialiased Lanczos-a weights (normalised), PIL's pixel-centre mapping."""
    scale = (in1 - in0) / out_size
    fs = max(scale, 1.0)
    centers = in0 + (np.arange(out_size) + 0.5) * scale
    x = (np.arange(in_size) + 0.5)[None, :] - centers[:, None]
    z = x / fs
    w = np.where(np.abs(z) < a, np.sinc(z) * np.sinc(z / a), 0.0)
    return w / w.sum(1, keepdims=True)


def reference_resize(data: bytes, out=224, crop_pct=0.875) -> np.ndarray:
    """float64 RGB: the full-resolution decode (no draft), antialiased Lanczos-3 in float64
    to _resize_plan's geometry, only the crop computed. What a perfect resizer would give."""
    import io

    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    (rw, rh), (left, top, right, bottom) = decode._resize_plan(w, h, out, out, "center-crop", crop_pct)
    wy = _lanczos_weights(h, 0.0, float(h), rh)[top:bottom]
    wx = _lanczos_weights(w, 0.0, float(w), rw)[left:right]
    a = np.asarray(img, dtype=np.float64)
    return np.einsum("yh,hwc,xw->yxc", wy, a, wx, optimize=True)


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)  # one worker = one core
    return cv2


def _paths(out=224, crop_pct=0.875):
    """name -> (decode+resize fn(bytes) -> uint8 [out, out, 3], encode fn(rgb) -> bytes)."""
    from PIL import Image

    def before(data):  # the previous release: draft to >= need, PIL resize of the whole image, crop
        keep, decode.DRAFT_MARGIN = decode.DRAFT_MARGIN, 1.0
        try:
            img, ow, oh, orientation, _ = decode._decode_bytes(data, out, out, "center-crop", crop_pct, False)
        finally:
            decode.DRAFT_MARGIN = keep
        if orientation in decode._ORIENT:
            img = img.transpose(decode._ORIENT[orientation])
        (rw, rh), box = decode._resize_plan(ow, oh, out, out, "center-crop", crop_pct)
        if img.size != (rw, rh):
            img = img.resize((rw, rh), Image.Resampling.BICUBIC)
        return np.asarray(img.crop(box))

    def ours(data):
        return decode.load_image(data, out, "center-crop", crop_pct).rgb

    def ours_margin1(data):  # drafted as far as possible (the previous draft rule)
        keep, decode.DRAFT_MARGIN = decode.DRAFT_MARGIN, 1.0
        try:
            return decode.load_image(data, out, "center-crop", crop_pct).rgb
        finally:
            decode.DRAFT_MARGIN = keep

    enc = lambda rgb: decode.encode_image(rgb, "jpg", 95)  # noqa: E731
    paths = {"ours (load_image)": (ours, enc), "ours, DRAFT_MARGIN=1": (ours_margin1, enc),
             "PIL resize+crop (before)": (before, enc)}
    cv2 = _cv2()
    if cv2 is not None:
        def opencv(data):  # img2dataset's resizer: INTER_AREA down, INTER_LANCZOS4 up; BGR kept
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            h, w = bgr.shape[:2]
            (rw, rh), (left, top, right, bottom) = decode._resize_plan(w, h, out, out, "center-crop", crop_pct)
            interp = cv2.INTER_AREA if rw <= w else cv2.INTER_LANCZOS4
            return cv2.resize(bgr, (rw, rh), interpolation=interp)[top:bottom, left:right]

        params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, 0x111111]
        paths["OpenCV INTER_AREA (img2dataset)"] = (opencv, lambda bgr: cv2.imencode(".jpg", bgr, params)[1])
    return paths


def compare_resize(n: int = 300, mix: str = "500x375", repeats: int = 3, quality_n: int = 100, workdir=None) -> dict:
    """µs/image (process CPU time, medians of interleaved repeats) of decode+resize+crop and of
    decode+resize+crop+encode for each path, and PSNR (dB) against `reference_resize`."""
    work = Path(workdir or tempfile.mkdtemp(prefix="dynaprep-resize-"))
    try:
        src = make_jpegs(work / f"src-{mix}", n, mix=mix)
        datas = [p.read_bytes() for p in sorted((src / "train").rglob("*.JPEG"))]
        paths = _paths()
        for fn, enc in paths.values():  # warm: kernels, caches
            enc(fn(datas[0]))
        times = defaultdict(list)
        for _ in range(repeats):
            for name, (fn, enc) in paths.items():
                t0 = time.process_time()
                for d in datas:
                    fn(d)
                t1 = time.process_time()
                for d in datas:
                    enc(fn(d))
                t2 = time.process_time()
                times[(name, "resize")].append((t1 - t0) / len(datas) * 1e6)
                times[(name, "+encode")].append((t2 - t1) / len(datas) * 1e6)
        quality = defaultdict(list)
        for d in datas[:quality_n]:
            ref = reference_resize(d)
            for name, (fn, _) in paths.items():
                x = fn(d)
                quality[name].append(psnr(x[..., ::-1] if "OpenCV" in name else x, ref))
        rows = {name: {"resize_us": float(np.median(times[(name, "resize")])),
                       "resize_encode_us": float(np.median(times[(name, "+encode")])),
                       "psnr_db": float(np.mean(quality[name])), "psnr_min_db": float(np.min(quality[name]))}
                for name in paths}
        return {"mix": mix, "n": n, "quality_n": min(quality_n, n), "repeats": repeats, "paths": rows}
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def format_resize(r: dict) -> str:
    lines = [f"decode+resize+crop to 224: {r['n']} {describe_mix(r['mix'])}; process CPU time, median of "
             f"{r['repeats']}; PSNR vs float64 Lanczos-3 of the full-resolution decode, mean (min) over "
             f"{r['quality_n']} images",
             f"{'path':<34}{'µs/img':>8}{'+encode':>9}{'PSNR dB':>9}{'min':>7}{'speed vs ours':>15}"]
    base = r["paths"]["ours (load_image)"]["resize_us"]
    for name, v in r["paths"].items():
        lines.append(f"{name:<34}{v['resize_us']:>8.0f}{v['resize_encode_us']:>9.0f}{v['psnr_db']:>9.2f}"
                     f"{v['psnr_min_db']:>7.2f}{v['resize_us'] / base:>14.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mix", choices=MIXES, default="500x375")
    ap.add_argument("--scorer", default="l2", help="comma-separated scorers (l2, sobel, entropy, contrast, distinct)")
    ap.add_argument("--k", default="70,50,25")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-workers", action="store_true", help="skip the 2-worker runs")
    ap.add_argument("--workdir", default=None, help="keep the JPEGs here for re-runs; default: a temp dir")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="stage timings in process CPU time (robust on a busy machine) or wall time")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--resize", action="store_true",
                    help="instead: decode+resize(+encode) of ours vs OpenCV INTER_AREA (if installed), with PSNR")
    a = ap.parse_args(argv)
    if a.resize:
        r = compare_resize(min(a.n, 300) if a.n else 300, a.mix, a.repeats, workdir=a.workdir)
        print(format_resize(r))
        if a.json:
            import json

            Path(a.json).write_text(json.dumps(r, indent=2))
        return
    r = profile(a.n, a.mix, [s.strip() for s in a.scorer.split(",") if s.strip()],
                [int(k) for k in a.k.split(",")], a.shard_size, a.repeats, a.workdir, not a.no_workers, a.clock)
    print(format_profile(r))
    if a.json:
        import json

        Path(a.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
