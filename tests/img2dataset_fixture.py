"""A small img2dataset output, written the way img2dataset 1.47.0 writes it (no network).

`write_img2dataset_tars(root, ...)` builds what `img2dataset --input_format parquet
--output_format webdataset --caption_col caption --save_additional_columns
'["label","class_name"]'` leaves in its output folder, with every default not named here
(image_size 256, resize_mode "border", resize_only_if_bigger False, downscale "area",
upscale "lanczos", encode_format "jpg", encode_quality 95, extract_exif True,
compute_hash "sha256", oom_shard_count 5). Transcribed from img2dataset 1.47.0:

- resizer.py (`Resizer.__call__`): cv2.imdecode(IMREAD_UNCHANGED) (BGR, EXIF orientation
  NOT applied; grayscale stays one channel; alpha is matted on white); "border" =
  albumentations 1.x LongestMaxSize (scale = S / max(w, h), new side = max(1, round(side *
  scale)) with Python's round, INTER_AREA when shrinking else INTER_LANCZOS4) then
  PadIfNeeded(S, S, BORDER_CONSTANT, value=[255, 255, 255], position "center": before =
  int((S - n) / 2.0), after = the rest, so an odd remainder goes to the bottom/right);
  "keep_ratio"/"center_crop" = SmallestMaxSize (+ CenterCrop at ((h-S)//2, (w-S)//2));
  "keep_ratio_largest" = LongestMaxSize alone; "no" = no resize. Always re-encoded:
  cv2.imencode(".jpg", [IMWRITE_JPEG_QUALITY, 95]) (libjpeg defaults: 4:2:0 chroma, no
  EXIF/JFIF extras) or ".png" with IMWRITE_PNG_COMPRESSION.
- writer.py (`WebDatasetSampleWriter`): `{shard_id:05d}.tar` through webdataset's TarWriter:
  members `KEY.<ext>` in sorted extension order (jpg, json, txt), USTAR headers, mode 0o444,
  uname/gname "bigdata", mtime = time of writing; `KEY.txt` = str(caption); `KEY.json` =
  json.dumps(meta, indent=4). A failed sample (download or resize) writes NOTHING to the
  tar: it is only a row of `{shard_id:05d}.parquet`, which has one row per input row.
- downloader.py: KEY = f"{shard_id * 10**oom_sample_per_shard + row:0{oom_sample_per_shard +
  5}d}" with oom_sample_per_shard = ceil(log10(number_sample_per_shard)) (so failed rows
  leave gaps in the keys); samples are written in download-completion order
  (imap_unordered), not key order; meta = the input columns in column_list order (the
  additional columns, then caption, then url) followed by key, status, error_message,
  width, height (stored size), original_width, original_height (decoded size), exif (a
  JSON string of exifread's tags of the downloaded bytes: "{}" without EXIF), sha256 (of
  the downloaded bytes). logger.write_stats writes `{shard_id:05d}_stats.json`.

Deviations (all deliberate, documented): the "downloaded" originals are real photos shipped
in packages (skimage.data when scikit-image is importable; matplotlib's grace_hopper.jpg
cut into three regions; seeded colour noise only when neither exists), randomly cropped and
scaled to 150..900 px per side, and JPEG-encoded by PIL; the completion order is a seeded
shuffle; parquet row groups are written at once rather than in buffers of 100; the
`_stats.json` times are fake. When cv2 is not importable the resize/encode step is
emulated with PIL (BOX for INTER_AREA, LANCZOS for INTER_LANCZOS4, PIL's libjpeg at the
same quality): identical geometry and border, pixels differ by a few levels.

`broken=` injects damage that img2dataset itself never writes (it always stores a full
cv2-encoded image, and nothing for a failure): "truncated" (the stored JPEG cut in half, as
a partial copy leaves it), "not_image" (an HTML page stored as KEY.jpg with null sizes, as
`--disable_all_reencoding True` stores a server's error page), "json_only" (KEY.json and
KEY.txt of a failed download but no image, as a hand-filtered or older dataset may have).
Real failures are `failed=`: parquet rows only, and gaps in the tar's keys.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
import time
from typing import NamedTuple

import numpy as np
from PIL import Image

IMG2DATASET_VERSION = "1.47.0"
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
BROKEN_KINDS = ("truncated", "not_image", "json_only")
OOM_SHARD_COUNT = 5
CAPTIONS = ("a photo of a {}", "{} , high quality photo", "my {} picture", "close-up of the {}")

try:  # the real resizer's library; without it the PIL emulation is used
    import cv2  # noqa: F401
    HAVE_CV2 = True
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None
    HAVE_CV2 = False


class SampleInfo(NamedTuple):
    label: int
    class_name: str
    original_size: tuple          # (w, h) of the downloaded image
    broken: str | None            # None, or one of BROKEN_KINDS; "failed" for a parquet-only row
    status: str                   # the json/parquet status
    stored_size: tuple | None     # (w, h) of the stored image (None when nothing is stored)
    content_box: tuple | None     # (x0, y0, x1, y1) of the photo inside the stored image
    tar: str | None               # the tar holding the sample (None for failed rows)


class Img2DatasetFixture(NamedTuple):
    root: str
    tars: list
    parquets: list
    stats: list
    samples: dict                 # key -> SampleInfo, every input row (failed ones too)
    order: dict                   # tar path -> keys in the order their members were written
    classes: list                 # class names, index = label
    originals: dict               # key -> downloaded bytes (only when keep_originals=True)


# ------------------------------------------------------------------ img2dataset's geometry

def longest_max_size(w: int, h: int, size: int) -> tuple[int, int]:
    """albumentations 1.x LongestMaxSize: (new_w, new_h)."""
    scale = size / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def smallest_max_size(w: int, h: int, size: int) -> tuple[int, int]:
    scale = size / min(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def pad_if_needed(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """albumentations 1.x PadIfNeeded(position="center"): (top, bottom, left, right)."""
    def one(n):
        if n >= size:
            return 0, 0
        before = int((size - n) / 2.0)
        return before, size - n - before
    top, bottom = one(h)
    left, right = one(w)
    return top, bottom, left, right


def border_content_box(w: int, h: int, size: int = 256) -> tuple[int, int, int, int]:
    """Where border mode (resize_only_if_bigger=False) puts a w×h original in the S×S image."""
    cw, ch = longest_max_size(w, h, size)
    top, _, left, _ = pad_if_needed(cw, ch, size)
    return left, top, left + cw, top + ch


# ------------------------------------------------------------------ the resizer

def resize_like_img2dataset(data: bytes, image_size: int = 256, resize_mode: str = "border",
                            resize_only_if_bigger: bool = False, encode_format: str = "jpg",
                            encode_quality: int = 95, backend: str | None = None):
    """img2dataset's Resizer.__call__: (img_bytes, width, height, original_width,
    original_height, error) with img_bytes None on error. backend "cv2" (img2dataset's own
    calls) or "pil" (emulation); default cv2 when importable."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"Invalid option for resize_mode: {resize_mode}")
    backend = backend or ("cv2" if HAVE_CV2 else "pil")
    try:
        img = _decode(data, backend)
        if img is None:
            raise ValueError("Image decoding error")
        oh, ow = img.shape[:2]
        S = image_size
        new = None
        if resize_mode in ("keep_ratio", "center_crop"):
            downscale = min(ow, oh) > S
            if not resize_only_if_bigger or downscale:
                new = smallest_max_size(ow, oh, S)
                img = _resize(img, new, downscale, backend)
                if resize_mode == "center_crop":
                    h, w = img.shape[:2]
                    y0, x0 = (h - S) // 2, (w - S) // 2
                    img = np.ascontiguousarray(img[y0:y0 + S, x0:x0 + S])
        elif resize_mode in ("border", "keep_ratio_largest"):
            downscale = max(ow, oh) > S
            if not resize_only_if_bigger or downscale:
                img = _resize(img, longest_max_size(ow, oh, S), downscale, backend)
                if resize_mode == "border":
                    img = _pad_white(img, pad_if_needed(img.shape[1], img.shape[0], S), backend)
        h, w = img.shape[:2]
        return _encode(img, encode_format, encode_quality, backend), w, h, ow, oh, None
    except Exception as err:  # img2dataset reports every failure as a string
        return None, None, None, None, None, str(err)


def _decode(data: bytes, backend: str):
    if backend == "cv2":
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            return None
    else:
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except Exception:
            return None
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        img = np.asarray(im)
    if img.ndim == 3 and img.shape[-1] == 4:  # alpha matting with white background
        alpha = img[:, :, 3, np.newaxis]
        img = alpha / 255 * img[..., :3] + 255 - alpha
        img = np.rint(img.clip(min=0, max=255)).astype(np.uint8)
    return img


def _resize(img, new_wh, downscale: bool, backend: str):
    h, w = img.shape[:2]
    if (w, h) == tuple(new_wh):
        return img
    if backend == "cv2":
        return cv2.resize(img, tuple(new_wh),
                          interpolation=cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4)
    im = Image.fromarray(img)
    return np.asarray(im.resize(tuple(new_wh), Image.Resampling.BOX if downscale
                                else Image.Resampling.LANCZOS))


def _pad_white(img, pads, backend: str):
    top, bottom, left, right = pads
    if not any(pads):
        return img
    if backend == "cv2":
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                  value=[255, 255, 255])
    h, w = img.shape[:2]
    out = np.full((h + top + bottom, w + left + right) + img.shape[2:], 255, np.uint8)
    out[top:top + h, left:left + w] = img
    return out


def _encode(img, fmt: str, quality: int, backend: str) -> bytes:
    if backend == "cv2":
        flag = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION,
                "webp": cv2.IMWRITE_WEBP_QUALITY}[fmt]
        ok, buf = cv2.imencode(f".{fmt}", img, params=[int(flag), int(quality)])
        if not ok:
            raise ValueError("encode failed")
        return buf.tobytes()
    # cv2 holds BGR, PIL RGB: both decode/encode the same colours, so nothing to swap.
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=int(quality))  # 4:2:0 like libjpeg's default
    elif fmt == "png":
        im.save(buf, "PNG", compress_level=int(quality))
    else:
        im.save(buf, "WEBP", quality=int(quality))
    return buf.getvalue()


# ------------------------------------------------------------------ source photos

@functools.lru_cache(maxsize=1)
def source_photos() -> tuple:
    """((class_name, uint8 array [h, w] or [h, w, 3]), ...): real photos shipped in packages."""
    photos = []
    try:
        from skimage import data as skd
        for name in ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera"):
            photos.append((name, np.ascontiguousarray(getattr(skd, name)())))
    except Exception:  # scikit-image missing (it is not a dev dependency)
        pass
    try:
        import matplotlib
        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        gh = np.asarray(Image.open(path).convert("RGB"))  # 600 × 512
        photos += [("flag", gh[0:420, 0:190]), ("face", gh[20:330, 150:380]),
                   ("uniform", gh[330:600, 0:512])]
    except Exception:  # pragma: no cover - matplotlib is a dev dependency
        pass
    if len(photos) < 2:  # pragma: no cover - last resort: seeded smooth colour noise
        rng = np.random.default_rng(1234)
        for i in range(3):
            small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            big = Image.fromarray(small).resize((512, 384), Image.Resampling.BICUBIC)
            noise = rng.integers(-20, 21, size=(384, 512, 3))
            photos.append((f"texture{i}", np.clip(np.asarray(big) + noise, 0, 255).astype(np.uint8)))
    return tuple(photos)


def _make_original(rng, photo: np.ndarray) -> tuple[bytes, tuple[int, int]]:
    """A random crop of the photo, scaled to 150..900 px per side, as JPEG bytes."""
    ph, pw = photo.shape[:2]
    while True:
        w = int(rng.integers(150, 901))
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # w / h
        if rng.random() < 0.15:
            aspect = rng.uniform(0.95, 1.05)  # near-square: pads narrower than a patch
        h = int(round(w / aspect))
        if 150 <= h <= 900:
            break
    # the largest crop of that aspect inside the photo, then 50..100 % of it
    cw = min(pw, ph * w / h)
    f = rng.uniform(0.5, 1.0)
    cw = max(8.0, cw * f)
    ch = cw * h / w
    x0 = rng.uniform(0, pw - cw)
    y0 = rng.uniform(0, ph - ch)
    im = Image.fromarray(photo)
    crop = im.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), (w, h)


# ------------------------------------------------------------------ the writer

def compute_key(row: int, shard_id: int, oom_sample_per_shard: int,
                oom_shard_count: int = OOM_SHARD_COUNT) -> str:
    """img2dataset.downloader.compute_key."""
    true_key = (10 ** oom_sample_per_shard) * shard_id + row
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


def _tar_write(tarstream, key: str, members: dict, mtime) -> None:
    """webdataset.TarWriter.write: members in sorted extension order, its header fields."""
    for ext in sorted(members):
        v = members[ext]
        v = v.encode("utf-8") if isinstance(v, str) else v
        ti = tarfile.TarInfo(key + "." + ext)
        ti.size = len(v)
        ti.mtime = mtime if mtime is not None else time.time()
        ti.mode = 0o0444
        ti.uname = "bigdata"
        ti.gname = "bigdata"
        tarstream.addfile(ti, io.BytesIO(v))


def write_img2dataset_tars(root, n: int = 12, per_tar: int = 8, resize_mode: str = "border",
                           image_size: int = 256, seed: int = 0, broken=(), failed: int = 0,
                           encode_format: str = "jpg", encode_quality: int | None = None,
                           backend: str | None = None, keep_originals: bool = False,
                           mtime: float | None = None) -> Img2DatasetFixture:
    """Write n input rows as img2dataset would, number_sample_per_shard = per_tar.

    broken: kinds from BROKEN_KINDS (one sample each, injected damage, see the module doc);
    failed: rows whose download fails (parquet row only, a gap in the tar's keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = list(broken)
    for b in broken:
        if b not in BROKEN_KINDS:
            raise ValueError(f"broken kinds are {BROKEN_KINDS}, got {b!r}")
    if len(broken) + failed > n:
        raise ValueError("more broken/failed rows than rows")
    if encode_quality is None:
        encode_quality = 95 if encode_format != "png" else 9
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = source_photos()
    classes = [name for name, _ in photos]
    # which rows are damaged: spread over the rows, seeded
    special = rng.permutation(n)[:len(broken) + failed]
    fate = {int(r): b for r, b in zip(special, broken + ["failed"] * failed)}

    # the input table (what the user gave img2dataset), column_list order
    rows = []
    for i in range(n):
        label = int(rng.integers(0, len(classes))) if i >= len(classes) else i % len(classes)
        name = classes[label]
        cap = CAPTIONS[int(rng.integers(0, len(CAPTIONS)))].format(name.replace("_", " "))
        rows.append({"label": label, "class_name": name, "caption": cap,
                     "url": f"https://images.example.com/{name}/{seed}_{i:06d}.jpg"})

    oom_sample_per_shard = math.ceil(math.log10(per_tar))
    n_shards = -(-n // per_tar)
    schema = pa.schema([("label", pa.int64()), ("class_name", pa.string()),
                        ("caption", pa.string()), ("url", pa.string()),
                        ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("original_width", pa.int32()),
                        ("original_height", pa.int32()), ("exif", pa.string()),
                        ("sha256", pa.string())])
    out = Img2DatasetFixture(str(root), [], [], [], {}, {}, classes, {})
    for shard_id in range(n_shards):
        shard_rows = list(range(shard_id * per_tar, min(n, (shard_id + 1) * per_tar)))
        completion = [int(v) for v in rng.permutation(len(shard_rows))]
        written = [v for v in completion if fate.get(shard_rows[v]) != "failed"]
        if len(written) > 1 and written == sorted(written):  # never key order in the tar
            a, b = completion.index(written[0]), completion.index(written[1])
            completion[a], completion[b] = completion[b], completion[a]
        shard_name = f"{shard_id:0{OOM_SHARD_COUNT}d}"
        tar_path = os.path.join(str(root), shard_name + ".tar")
        meta_rows, order, status_dict = [], [], {}
        counts = {"successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
        with open(tar_path, "wb") as fd:
            tarstream = tarfile.open(fileobj=fd, mode="w|", format=tarfile.USTAR_FORMAT)
            for local in completion:
                i = shard_rows[int(local)]
                row = rows[i]
                key = compute_key(int(local), shard_id, oom_sample_per_shard)
                kind = fate.get(i)
                photo = photos[row["label"]][1]
                original, osize = _make_original(rng, photo)
                if keep_originals:
                    out.originals[key] = original
                meta = {**row, "key": key, "status": None, "error_message": None,
                        "width": None, "height": None, "original_width": None,
                        "original_height": None, "exif": None, "sha256": None}
                members = None
                stored = box = None
                if kind in ("failed", "json_only"):
                    meta["status"] = "failed_to_download"
                    meta["error_message"] = "HTTP Error 404: Not Found"
                    counts["failed_to_download"] += 1
                    status_dict[meta["error_message"]] = status_dict.get(meta["error_message"], 0) + 1
                    if kind == "json_only":
                        members = {"json": json.dumps(meta, indent=4), "txt": str(row["caption"])}
                elif kind == "not_image":
                    payload = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"
                    meta.update(status="success", exif="{}",
                                sha256=hashlib.sha256(payload).hexdigest())
                    counts["successes"] += 1
                    status_dict["success"] = status_dict.get("success", 0) + 1
                    members = {encode_format: payload, "txt": str(row["caption"]),
                               "json": json.dumps(meta, indent=4)}
                else:
                    img, w, h, ow, oh, err = resize_like_img2dataset(
                        original, image_size, resize_mode, False, encode_format,
                        encode_quality, backend)
                    assert err is None, err
                    if kind == "truncated":
                        img = img[: len(img) // 2]
                    meta.update(status="success", width=w, height=h, original_width=ow,
                                original_height=oh, exif="{}",
                                sha256=hashlib.sha256(original).hexdigest())
                    counts["successes"] += 1
                    status_dict["success"] = status_dict.get("success", 0) + 1
                    members = {encode_format: img, "txt": str(row["caption"]),
                               "json": json.dumps(meta, indent=4)}
                    stored = (w, h)
                    box = (border_content_box(ow, oh, image_size) if resize_mode == "border"
                           else (0, 0, w, h))
                if members is not None:
                    _tar_write(tarstream, key, members, mtime)
                    order.append(key)
                meta_rows.append(meta)
                out.samples[key] = SampleInfo(row["label"], row["class_name"], osize, kind,
                                              meta["status"], stored, box,
                                              tar_path if members is not None else None)
            tarstream.close()
        pq.write_table(pa.Table.from_pylist(meta_rows, schema=schema),
                       os.path.join(str(root), shard_name + ".parquet"))
        t0 = 1_700_000_000.0 + shard_id
        stats = {"count": len(shard_rows), **counts, "duration": 1.0, "start_time": t0,
                 "end_time": t0 + 1.0, "status_dict": status_dict}
        stats_path = os.path.join(str(root), shard_name + "_stats.json")
        with open(stats_path, "w") as f:
            json.dump(stats, f, indent=4)
        out.tars.append(tar_path)
        out.parquets.append(os.path.join(str(root), shard_name + ".parquet"))
        out.stats.append(stats_path)
        out.order[tar_path] = order
    return out
