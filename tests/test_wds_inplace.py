"""`dynaprep index --data wds` on a WebDataset written the way img2dataset writes it.

The fixture (tests/img2dataset_fixture.py) is img2dataset 1.47.0's real layout: .jpg/.json/
.txt members, labels only in the json, 256×256 images letterboxed with white (border mode)
from photos of 150–900 px, samples not in key order, gaps for failed downloads, plus a few
broken members. Everything is checked against independent readers: the fixture's own
record of each sample, `webdataset` for the index shards, pyarrow for the manifests.
"""
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

import img2dataset_fixture as i2d
from dynavit.manifests import validate_dataset
from dynavit.manifests.schema import k_count
from dynavit.pipeline.cli import main
from dynavit.pipeline.padding import map_box, padding_patches
from dynavit.pipeline.saliency import score_patches
from dynavit.pipeline.topk import select_topk
from loopback import serve_directory  # noqa: E402

SIZE, PATCH = 64, 8  # an 8×8 grid: small enough for CPU tests, fine enough to see letterboxing
COMMON = ["--image-size", SIZE, "--patch-size", PATCH, "--k", "70,25", "--no-progress", "--scorer", "l2"]
MODEL_KWARGS = {"img_size": SIZE, "patch_size": PATCH, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS), "--batch-size", "8",
        "--workers", "0", "--epochs", "1", "--device", "cpu"]


def dynaprep(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def dynatrain(*args) -> int:
    from dynavit.trainer.cli import main as train_main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exc:
            train_main(["train", *[str(a) for a in args]])
    finally:
        torch.set_num_threads(before)
    return exc.value.code


def manifest(out):
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """3 tars of img2dataset output (10 rows each, 2 failed downloads) + 3 broken members."""
    root = tmp_path_factory.mktemp("crawl")
    return i2d.write_img2dataset_tars(root / "data", n=30, per_tar=10, seed=3, failed=2,
                                      broken=("truncated", "not_image", "json_only"))


@pytest.fixture(scope="module")
def indexed(crawl, tmp_path_factory):
    """train = the first two tars, val = the third, labels from KEY.json's `label`."""
    out = tmp_path_factory.mktemp("idx") / "ds"
    tars = sorted(crawl.tars)
    result = dynaprep("index", "--data", "wds", "--src", f"train={Path(crawl.root)}/{{00000..00001}}.tar",
                      "--src", f"val={tars[2]}", "-o", "label=json:label", "--out", out, "--workers", 2, *COMMON)
    return out, result


def _valid(crawl):
    """key -> SampleInfo of every sample img2dataset stored with a decodable image."""
    return {k: s for k, s in crawl.samples.items() if s.tar is not None and s.broken is None}


def test_index_img2dataset_output(crawl, indexed):
    out, result = indexed
    rows = {r["key"]: r for r in manifest(out)}
    valid = _valid(crawl)
    ok = [k for k in valid if rows.get(k, {}).get("status") == "ok"]
    assert len(ok) >= 0.95 * len(valid) and len(valid) >= 20
    for k in ok:  # labels as the json says, names from the discovered (sorted) integer labels
        assert rows[k]["label"] == valid[k].label, k
    broken = {k: s.broken for k, s in crawl.samples.items() if s.broken in i2d.BROKEN_KINDS}
    assert broken and all(rows[k]["status"] == "failed" and rows[k]["error"] for k in broken)
    assert "no image member" in rows[next(k for k, b in broken.items() if b == "json_only")]["error"]
    # Failed downloads are not in the tars at all, so not in the manifest either.
    assert not any(k in rows for k, s in crawl.samples.items() if s.tar is None)
    info = json.loads((out / "dataset.json").read_text())
    assert set(info["splits"]) == {"train", "val"}
    assert info["resize"]["policy"] == "center-crop" and info["padding"]["policy"] == "pad-aware"
    assert info["images_root"] == str(Path(crawl.root).resolve())
    # Shard paths are relative to the root: the tars can move.
    assert all(not r["images"].startswith("/") for r in pq.read_table(out / "shards.parquet").to_pylist())
    assert "failed: " in result.output and validate_dataset(out) == []


def test_stored_indices_are_what_the_trainer_decodes(crawl, tmp_path):
    """Images of any size are resized by the recorded policy; re-scoring what the trainer
    decodes (its own loader) gives the stored scores and, without padding awareness, the
    stored top-K exactly."""
    from dynavit.trainer.data import build_loader

    out = tmp_path / "plain"
    dynaprep("index", "--data", "wds", "--src", sorted(crawl.tars)[0], "-o", "label=json:label", "--out", out,
             "--no-pad-aware", "--workers", 1, *COMMON)
    loader = build_loader(out, "train", k=100, batch_size=4, train=False, workers=0)
    images = {}
    for batch in loader:
        for key, img in zip(batch.keys, batch.images):
            images[key] = img
    assert len(images) >= 6
    stored = {s["__key__"]: s for s in wds.WebDataset(str(out / "train" / "topk-l2-000000.tar"),
                                                        shardshuffle=False).decode()}
    assert set(stored) == set(images)
    for key, img in images.items():
        rgb = np.asarray(img)
        rgb = rgb if rgb.shape[-1] == 3 else np.moveaxis(rgb, 0, -1)
        scores = score_patches(rgb[None].astype(np.uint8), PATCH, "l2")[0]
        np.testing.assert_array_equal(stored[key]["scores.npy"], scores.astype(np.float16))
        for k in (70, 25):
            np.testing.assert_array_equal(stored[key][f"k{k}.npy"], select_topk(scores[None], k)[0])


def _padding_masks(crawl, out):
    """key -> (kept K=25 indices, padding patch mask from the fixture's true content box)."""
    idx = {}
    for tar in sorted((out / "train").glob("topk-l2-*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False).decode():
            info = crawl.samples[s["__key__"]]
            w, h = info.stored_size
            box = map_box(info.content_box, w, h, SIZE)
            idx[s["__key__"]] = (s["k25.npy"], padding_patches(box, SIZE, PATCH).ravel())
    return idx


def test_padding_patches_never_kept(crawl, tmp_path):
    """With img2dataset's white letterbox, K=25 keeps no padding patch when the photo has
    enough patches; the paper's plain l2 (--no-pad-aware) keeps many of them."""
    tars = sorted(crawl.tars)[:2]
    kept = {}
    for mode in ("--pad-aware", "--no-pad-aware"):
        out = tmp_path / mode
        dynaprep("index", "--data", "wds", "--src", f"{Path(crawl.root)}/{{00000..00001}}.tar", "--out", out,
                 mode, "--workers", 1, *COMMON)
        kept[mode] = _padding_masks(crawl, out)
    need = k_count(25, (SIZE // PATCH) ** 2)
    letterboxed = 0
    for key, (idx, pad) in kept["--pad-aware"].items():
        if pad.any():
            letterboxed += 1
        if (~pad).sum() >= need:
            assert not pad[idx].any(), key
        else:  # fewer content patches than K: all of them are kept, padding fills the rest
            assert set(np.flatnonzero(~pad)) <= set(idx.tolist()), key
    assert letterboxed >= 5 and len(tars) == 2
    plain = sum(int(pad[idx].sum()) for idx, pad in kept["--no-pad-aware"].values())
    assert plain > 0  # the test would see a regression: plain l2 keeps white padding


def test_recorded_offsets_are_where_tarfile_and_webdataset_find_the_image(crawl, indexed):
    """A user's tar indexed in place: each ok row's image_offset/image_bytes are the data
    offset and size tarfile reports for the sample's image member (the first of webdataset's
    image extensions), and the bytes there are webdataset's bytes for that key."""
    out, _ = indexed
    rows = [r for r in manifest(out) if r["status"] == "ok"]
    assert rows and all(r["image_offset"] is not None for r in rows)
    failed = [r for r in manifest(out) if r["status"] == "failed"]
    assert failed and all(r["image_offset"] is None and r["image_bytes"] is None for r in failed)
    by_source = {}
    for tar in crawl.tars:
        with tarfile.open(tar) as tf:
            found = {}
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {}).setdefault(ext.lower(), (m.offset_data, m.size))
        raw = {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False)}
        by_source[Path(tar).name] = (found, raw, Path(tar).read_bytes())
    for r in rows:
        name, key = r["source"].split("#", 1)
        found, raw, data = by_source[name]
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in found[key])
        assert (r["image_offset"], r["image_bytes"]) == found[key][ext], r["key"]
        assert data[r["image_offset"]:r["image_offset"] + r["image_bytes"]] == raw[key][ext], r["key"]


@pytest.fixture
def http_root(crawl):
    with serve_directory(crawl.root) as url:
        yield url


def test_http_source_index_verify_train(crawl, indexed, http_root, tmp_path, monkeypatch):
    """The same tars through a loopback http:// URL: the same index shards byte for byte,
    verify ok (the trainer's cache fetches and checks them), and a 1-epoch training run."""
    monkeypatch.setenv("DYNAVIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "http"
    dynaprep("index", "--data", "wds", "--src", f"train={http_root}/{{00000..00001}}.tar",
             "--src", f"val={http_root}/00002.tar", "-o", "label=json:label", "--out", out, "--workers", 2, *COMMON)
    local, _ = indexed
    for tar in sorted(local.rglob("topk-*.tar")):
        assert (out / tar.relative_to(local)).read_bytes() == tar.read_bytes(), tar.name
    # offsets taken while streaming are those the local reader found by offset
    assert [(r["key"], r["status"], r["label"], r["image_offset"], r["image_bytes"]) for r in manifest(out)] == \
        [(r["key"], r["status"], r["label"], r["image_offset"], r["image_bytes"]) for r in manifest(local)]
    info = json.loads((out / "dataset.json").read_text())
    assert info["images_root"] == http_root
    # A URL the folder names is read only when the user vouches for it (issue 23):
    refused = validate_dataset(out)
    assert refused and all("--trust-dataset-urls" in v.message for v in refused)
    assert validate_dataset(out, trust_urls=True) == []
    assert validate_dataset(out, images_root=http_root) == []  # the command line's own URL
    assert dynatrain("--shards", out, "--k", 70, "--out", tmp_path / "run", "--trust-dataset-urls", *TINY) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_moved_tars_need_images_root(crawl, indexed, tmp_path):
    """Moving the tars breaks nothing silently: verify names --images-root, which fixes it
    for verify and for training."""
    out, _ = indexed
    moved = tmp_path / "moved"
    shutil.copytree(crawl.root, moved)
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["images_root"] = str(tmp_path / "gone")
    (copy / "dataset.json").write_text(json.dumps(info))
    violations = validate_dataset(copy, check_checksums=False)
    assert violations and all("--images-root" in v.message for v in violations)
    result = dynaprep("verify", copy, "--images-root", moved)
    assert "ok" in result.output
    assert dynatrain("--shards", copy, "--k", 25, "--out", tmp_path / "run", "--images-root", moved, *TINY) == 0


def test_labels_from_caption_text(crawl, tmp_path):
    """label=txt: the caption is the class name; classes are every distinct caption, sorted."""
    out = tmp_path / "txt"
    dynaprep("index", "--data", "wds", "--src", sorted(crawl.tars)[0], "-o", "label=txt", "--out", out,
             "--workers", 1, *COMMON)
    info = json.loads((out / "dataset.json").read_text())
    rows = [r for r in manifest(out) if r["status"] == "ok"]
    assert info["classes"] == sorted({r["class_name"] for r in rows})
    assert all(info["classes"][r["label"]] == r["class_name"] for r in rows)


def test_missing_label_field_fails_rows_and_exits_1(crawl, tmp_path):
    out = tmp_path / "nolabel"
    result = dynaprep("index", "--data", "wds", "--src", sorted(crawl.tars)[0], "-o", "label=json:species",
                      "--out", out, "--workers", 1, *COMMON, code=1)
    assert "0 usable samples" in result.output
    assert "json has no field 'species'" in result.output  # the summary names the reason, with a count
    assert all(r["status"] == "failed" for r in manifest(out))
    violations = validate_dataset(out)  # and verify does not call it ok
    assert any("0 usable samples" in v.message for v in violations)


def test_unreachable_url_keeps_the_url(tmp_path):
    """A URL source that cannot be read: the split fails with the URL spelled as given."""
    out = tmp_path / "dead"
    url = "http://127.0.0.1:9/nothing-{0..1}.tar"
    result = dynaprep("index", "--data", "wds", "--src", url, "--out", out, "--workers", 1, *COMMON, code=1)
    assert "0 usable samples" in result.output and "unreadable tar" in result.output
    errors = [r["error"] for r in manifest(out)]
    assert len(errors) == 2 and "unreadable tar http://127.0.0.1:9/nothing-0.tar:" in errors[0]


def test_bad_label_option_is_an_argument_error(crawl, tmp_path):
    result = dynaprep("index", "--data", "wds", "--src", sorted(crawl.tars)[0], "-o", "label=yaml",
                      "--out", tmp_path / "x", *COMMON, code=2)
    assert "label" in result.output and not (tmp_path / "x").exists()


def test_split_given_twice_is_an_argument_error(crawl, tmp_path):
    tar = sorted(crawl.tars)[0]
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "--src", f"train={tar}",
                      "--out", tmp_path / "x", *COMMON, code=2)
    assert "twice" in result.output and not (tmp_path / "x").exists()


def test_large_tar_is_cut_into_pieces_byte_identical(tmp_path):
    """One 80-sample tar and 2 workers: it is indexed in pieces by both workers, and the
    output is byte-identical to one worker's."""
    crawl = i2d.write_img2dataset_tars(tmp_path / "big", n=80, per_tar=80, seed=5)
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        dynaprep("index", "--data", "wds", "--src", crawl.tars[0], "-o", "label=json:label",
                 "--out", outs[workers], "--workers", workers, *COMMON)
    files = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file()
                   and ".dynaprep" not in p.parts and p.name != "dataset.json")
    assert files and not list((outs[2] / ".dynaprep" / "pieces").glob("*"))
    for rel in files:
        assert (outs[1] / rel).read_bytes() == (outs[2] / rel).read_bytes(), rel
    # and it really was cut: the plan for 2 workers has two pieces of 40 samples
    from dynavit.pipeline.index import IndexConfig, plan, split_jobs
    from dynavit.pipeline.sources import open_source

    source = open_source("wds", crawl.tars[0])
    cfg = IndexConfig(data="wds", src=crawl.tars[0], out=str(tmp_path / "x"), ks=[25], workers=2)
    jobs, _, _ = split_jobs(cfg, source, plan(cfg, source))
    assert [(j.part, j.parts, j.count) for j in jobs] == [(0, 2, 40), (1, 2, 40)]
