"""The img2dataset fixture (tests/img2dataset_fixture.py) is faithful to img2dataset 1.47.0.

The real resizer is compared byte for byte when it can be imported: an installed
`img2dataset` (with albumentations<2), or its resizer.py named by $IMG2DATASET_RESIZER_PY
(e.g. unzipped from `pip download img2dataset==1.47.0 --no-deps`); otherwise that test is
skipped and the geometry is checked against values the real resizer produced.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import img2dataset_fixture as F
from dynavit.pipeline.decode import DecodeError, load_image

JSON_FIELDS = ["label", "class_name", "caption", "url", "key", "status", "error_message",
               "width", "height", "original_width", "original_height", "exif", "sha256"]


def read_tar(path) -> list:
    """[(member name, bytes, TarInfo)] in stored order."""
    out = []
    with tarfile.open(path) as tf:
        for ti in tf:
            out.append((ti.name, tf.extractfile(ti).read(), ti))
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return F.write_img2dataset_tars(tmp_path_factory.mktemp("i2d"), n=14, per_tar=12, seed=3,
                                    failed=2, broken=("truncated", "not_image", "json_only"),
                                    keep_originals=True)


# ------------------------------------------------------------------ geometry

# (original w, h) -> content box in the 256² image, as img2dataset 1.47.0 + albumentations
# 1.4.24 + cv2 produced them (non-white bounding box of a flat grey original, PNG output).
REAL_BORDER_BOXES = {
    (512, 301): (0, 53, 256, 203),   # 150.5 -> 150: Python's round (half to even)
    (301, 512): (53, 0, 203, 256),
    (500, 300): (0, 51, 256, 205),
    (255, 256): (0, 0, 255, 256),    # no resize; the odd pad pixel goes right
    (257, 100): (0, 78, 256, 178),
    (1000, 3): (0, 127, 256, 128),   # max(1, ...)
}


def test_border_geometry_matches_real_resizer_values():
    for (w, h), box in REAL_BORDER_BOXES.items():
        assert F.border_content_box(w, h, 256) == box


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_border_pixels_follow_geometry(backend):
    if backend == "cv2" and not F.HAVE_CV2:
        pytest.skip("cv2 not installed")
    for (w, h), box in REAL_BORDER_BOXES.items():
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 30, np.uint8)).save(buf, "PNG")
        img, sw, sh, ow, oh, err = F.resize_like_img2dataset(buf.getvalue(), 256, "border",
                                                             encode_format="png",
                                                             encode_quality=1, backend=backend)
        assert err is None and (sw, sh, ow, oh) == (256, 256, w, h)
        a = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
        ys, xs = np.nonzero((a != 255).any(axis=2))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
        assert (a[(a != 255).any(axis=2)] == 30).all()  # flat colour stays flat; pad is white


def test_pil_emulation_close_to_cv2():
    if not F.HAVE_CV2:
        pytest.skip("cv2 not installed")
    rng = np.random.default_rng(0)
    for name, photo in F.source_photos()[:3]:
        data, _ = F._make_original(rng, photo)
        for mode in ("border", "center_crop", "keep_ratio"):
            a = F.resize_like_img2dataset(data, 256, mode, backend="cv2")
            b = F.resize_like_img2dataset(data, 256, mode, backend="pil")
            assert a[1:] == b[1:]
            ia = np.asarray(Image.open(io.BytesIO(a[0])).convert("RGB"), np.int16)
            ib = np.asarray(Image.open(io.BytesIO(b[0])).convert("RGB"), np.int16)
            assert np.abs(ia - ib).mean() < 4, (name, mode)


def _real_resizer():
    try:
        from img2dataset import resizer  # noqa: F401
        return resizer
    except Exception:
        pass
    path = os.environ.get("IMG2DATASET_RESIZER_PY")
    if path and os.path.exists(path):
        spec = importlib.util.spec_from_file_location("_i2d_resizer", path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
            return mod
        except Exception:
            return None
    return None


def test_cv2_path_is_byte_identical_to_real_resizer():
    real = _real_resizer()
    if real is None or not F.HAVE_CV2:
        pytest.skip("img2dataset's resizer (and albumentations<2) not importable")
    import warnings
    rng = np.random.default_rng(1)
    photos = F.source_photos()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in F.RESIZE_MODES:
            for fmt, q in (("jpg", 95), ("png", 9)):
                for only_bigger in (False, True):
                    r = real.Resizer(256, mode, only_bigger, encode_format=fmt, encode_quality=q)
                    for t in range(3):
                        data, _ = F._make_original(rng, photos[t % len(photos)][1])
                        assert r(io.BytesIO(data)) == F.resize_like_img2dataset(
                            data, 256, mode, only_bigger, fmt, q, backend="cv2")


# ------------------------------------------------------------------ layout

def test_key_format():
    assert F.compute_key(3, 1, 4) == "000010003"          # defaults: 10000 per shard, 5 digits
    assert F.compute_key(3, 1, 2) == "0000103"
    assert F.compute_key(0, 0, 0) == "00000"              # number_sample_per_shard=1 quirk


def test_files_and_members(ds):
    root = ds.root
    assert sorted(os.listdir(root)) == ["00000.parquet", "00000.tar", "00000_stats.json",
                                        "00001.parquet", "00001.tar", "00001_stats.json"]
    for tar in ds.tars:
        with open(tar, "rb") as f:
            head = f.read(512)
        assert head[257:265] == b"ustar\x0000"             # USTAR, as webdataset's TarWriter
        members = read_tar(tar)
        names = [m[0] for m in members]
        keys = []
        for name, _, ti in members:
            assert ti.mode == 0o444 and ti.uname == "bigdata" and ti.gname == "bigdata"
            k = name.split(".")[0]
            if not keys or keys[-1] != k:
                keys.append(k)
        assert keys == ds.order[tar]
        if len(keys) > 1:
            assert keys != sorted(keys)                      # completion order, not key order
        for k in keys:
            exts = [n.split(".", 1)[1] for n in names if n.split(".")[0] == k]
            want = ["json", "txt"] if ds.samples[k].broken == "json_only" else ["jpg", "json", "txt"]
            assert exts == want                              # sorted, consecutive
            assert all(len(key) == 7 and key.isdigit() for key in keys)
            assert int(k) // 100 == ds.tars.index(tar)       # shard id, then 2 row digits


def test_json_txt_and_parquet(ds):
    import pyarrow.parquet as pq
    seen = {}
    for tar in ds.tars:
        for name, data, _ in read_tar(tar):
            seen.setdefault(name.split(".")[0], {})[name.split(".", 1)[1]] = data
    failed = [k for k, s in ds.samples.items() if s.broken == "failed"]
    assert len(failed) == 2 and not set(failed) & set(seen)  # failures write no member at all
    for k, m in seen.items():
        info = ds.samples[k]
        meta = json.loads(m["json"])
        assert list(meta) == JSON_FIELDS
        assert m["json"].decode() == json.dumps(meta, indent=4)
        assert meta["key"] == k and meta["label"] == info.label
        assert meta["class_name"] == info.class_name == ds.classes[info.label]
        assert m["txt"].decode() == meta["caption"]
        assert info.class_name.replace("_", " ") in meta["caption"]
        if info.broken is None or info.broken == "truncated":
            orig = ds.originals[k]
            assert meta["status"] == "success" and meta["error_message"] is None
            assert meta["sha256"] == hashlib.sha256(orig).hexdigest()
            assert (meta["original_width"], meta["original_height"]) == Image.open(io.BytesIO(orig)).size
            assert 150 <= min(info.original_size) and max(info.original_size) <= 900
            assert (meta["width"], meta["height"]) == (256, 256) and meta["exif"] == "{}"
        if info.broken is None:
            assert Image.open(io.BytesIO(m["jpg"])).size == (256, 256)
    # one parquet row per input row, in the tar's order, failures included
    rows = [r for p in ds.parquets for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 14 and [r["key"] for r in rows if r["key"] in seen] == \
        [k for t in ds.tars for k in ds.order[t]]
    assert pq.read_table(ds.parquets[0]).schema.names == JSON_FIELDS
    by_key = {r["key"]: r for r in rows}
    for k in failed:
        assert by_key[k]["status"] == "failed_to_download" and by_key[k]["width"] is None
    stats = [json.load(open(p)) for p in ds.stats]
    assert sum(s["count"] for s in stats) == 14
    assert sum(s["successes"] for s in stats) == 14 - 3     # 2 failed + json_only
    assert set(stats[0]) == {"count", "successes", "failed_to_download", "failed_to_resize",
                             "duration", "start_time", "end_time", "status_dict"}


def test_webdataset_reader_groups_members(ds):
    wds = pytest.importorskip("webdataset")
    got = {}
    for s in wds.WebDataset(ds.tars, shardshuffle=False, empty_check=False):
        got[s["__key__"]] = s
    assert list(got) == [k for t in ds.tars for k in ds.order[t]]
    for k, s in got.items():
        assert {"json", "txt"} <= set(s)
        assert ("jpg" in s) == (ds.samples[k].broken != "json_only")
        assert json.loads(s["json"])["key"] == k


def test_broken_members(ds):
    seen = {}
    for tar in ds.tars:
        for name, data, _ in read_tar(tar):
            seen.setdefault(name.split(".")[0], {})[name.split(".", 1)[1]] = data
    kinds = {s.broken: k for k, s in ds.samples.items() if s.broken}
    for kind in ("truncated", "not_image"):
        with pytest.raises(DecodeError):
            load_image(seen[kinds[kind]]["jpg"], 224)
    assert json.loads(seen[kinds["not_image"]]["json"])["width"] is None
    assert json.loads(seen[kinds["json_only"]]["json"])["status"] == "failed_to_download"
    good = [k for k, s in ds.samples.items() if s.broken is None]
    for k in good:
        assert load_image(seen[k]["jpg"], 224).rgb.shape == (224, 224, 3)


def test_deterministic(tmp_path):
    a = F.write_img2dataset_tars(tmp_path / "a", n=5, per_tar=5, seed=9, mtime=0)
    b = F.write_img2dataset_tars(tmp_path / "b", n=5, per_tar=5, seed=9, mtime=0)
    with open(a.tars[0], "rb") as fa, open(b.tars[0], "rb") as fb:
        assert fa.read() == fb.read()
    assert a.samples == {k: s._replace(tar=s.tar.replace(str(tmp_path / "b"), str(tmp_path / "a")))
                         for k, s in b.samples.items()}
