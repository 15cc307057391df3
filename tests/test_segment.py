"""Semantic segmentation end to end (issue 27): a VOC-layout folder from real photos with
hand-made masks → `dynaprep index --data voc-seg` → `dynatrain --task segment` for dynavit,
svit and tome. Checked against independent references: the stored masks against a NumPy
nearest-neighbour resize + centre crop of the source masks, read with Python's tarfile; the
reported mIoU against a NumPy confusion matrix of the saved model's predictions."""
from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dynavit.pipeline.cli import main as dynaprep
from dynavit.trainer.cli import main as dynatrain
from dynavit.trainer.segment.metrics import confusion, iou_per_class, mean_iou
from tiny_vits import one_thread  # noqa: F401,E402 (autouse: this module on one intra-op thread)

pytest.importorskip("skimage")

SIZE, PATCH = 32, 4
HEAD_MACS = 32 * 21  # the timm classifier (D x classes): in the budget, not in a dense forward
MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
         json.dumps({"img_size": SIZE, "patch_size": PATCH, "embed_dim": 32, "depth": 4, "num_heads": 2}),
         "--batch-size", "5", "--workers", "0", "--lr", "3e-3", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dynavit.pipeline.seg_photo_data import voc_seg

    root = tmp_path_factory.mktemp("voc")
    made = voc_seg(root / "src", n_train=10, n_val=5)
    res = CliRunner().invoke(dynaprep, [
        "index", "--data", "voc-seg", "--src", str(root / "src"), "--out", str(root / "ds"),
        "--image-size", str(SIZE), "--patch-size", str(PATCH), "--k", "50,25", "--format", "png",
        "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return {"root": root, "ds": root / "ds", **made}


def tar_samples(ds, split):
    """{key: {ext: bytes}} of a split's image shards, read with the standard library."""
    import pyarrow.parquet as pq

    out = {}
    for row in pq.read_table(ds / "shards.parquet").to_pylist():
        if row["split"] != split:
            continue
        with tarfile.open(ds / row["images"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def ref_fit(mask: np.ndarray, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """torchvision-style Resize(short side = floor(size / crop_pct)) + CenterCrop(size), nearest
    neighbour written out: output pixel x reads source floor((x + 0.5) · w / rw)."""
    h, w = mask.shape
    short = math.floor(size / crop_pct)
    rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    ys = np.minimum(((np.arange(rh) + 0.5) * h / rh).astype(int), h - 1)
    xs = np.minimum(((np.arange(rw) + 0.5) * w / rw).astype(int), w - 1)
    full = mask[ys][:, xs]
    top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
    return full[top:top + size, left:left + size]


def test_stored_masks_are_the_nearest_resized_source_masks(voc):
    import pyarrow.parquet as pq

    rows = {r["key"]: r for r in pq.read_table(voc["ds"] / "manifest.parquet").to_pylist()
            if r["split"] == "val"}
    samples = tar_samples(voc["ds"], "val")
    assert len(samples) == 5 and all("mask.png" in m for m in samples.values())
    for key, members in samples.items():
        image_id = rows[key]["source"].rsplit("/", 1)[1][:-4]
        src = np.asarray(Image.open(voc["voc"] / "SegmentationClass" / f"{image_id}.png"))
        stored = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
        assert np.array_equal(stored, ref_fit(src, SIZE))
        assert set(np.unique(stored)) <= set(np.unique(src))      # nearest: no blended values
        assert int(members["cls"]) == rows[key]["label"] != 0      # the main foreground class


def test_metrics_equal_a_numpy_confusion_matrix():
    g = np.random.default_rng(0)
    target = g.integers(0, 5, (3, 17, 19))
    target[g.random(target.shape) < 0.2] = 255
    pred = g.integers(0, 5, target.shape)
    want = np.zeros((5, 5), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            want[t, p] += 1
    conf = confusion(torch.from_numpy(pred), torch.from_numpy(target), 5).numpy()
    assert np.array_equal(conf, want)
    iou = [want[c, c] / (want[c].sum() + want[:, c].sum() - want[c, c]) for c in range(5)]
    assert np.allclose(iou_per_class(conf), iou) and math.isclose(mean_iou(conf), np.mean(iou))
    conf[4] = conf[:, 4] = 0  # a class neither present nor predicted has no IoU
    assert np.isnan(iou_per_class(conf)[4]) and math.isclose(mean_iou(conf), np.mean(iou_per_class(conf)[:4]))


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        dynatrain([str(a) for a in args])
    return exc.value.code


def run_segment(voc, method, out, *extra):
    args = ["--shards", voc["ds"], "--out", out, "--task", "segment", "--method", method, "--k", "50",
            "--epochs", "3", *MODEL, *extra]
    assert run_cli(args) == 0
    return json.loads((out / "summary.json").read_text())


def numpy_miou(voc, run, method_param):
    """Predictions of best.pt on the val split, scored with a NumPy confusion matrix; images,
    masks and kept patches read with tarfile."""
    import timm

    from dynavit.trainer.methods.dense import forward_dense
    from dynavit.trainer.segment.head import SegHead

    ckpt = torch.load(run / "best.pt", weights_only=True)
    kw = json.loads(MODEL[3])
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=21, **kw).eval()
    vit.load_state_dict(ckpt["model"])
    seg = SegHead(32, 21).eval()
    seg.load_state_dict(ckpt["seg_head"])
    samples = tar_samples(voc["ds"], "val")
    import pyarrow.parquet as pq
    index = {}
    for row in pq.read_table(voc["ds"] / "shards.parquet").to_pylist():
        if row["split"] == "val":
            with tarfile.open(voc["ds"] / row["index"][0]["path"]) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".k50.npy"):
                        index[m.name.split(".")[0]] = np.load(io.BytesIO(tf.extractfile(m).read()))
    conf = np.zeros((21, 21), np.int64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for key, members in sorted(samples.items()):
        rgb = np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")) / 255.0
        x = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1)[None]).float()
        keep = torch.from_numpy(index[key].astype(np.int64))[None]
        with torch.no_grad():
            pred = seg(forward_dense(vit, x, "dynavit", None, None, keep), (SIZE, SIZE)).argmax(1)[0].numpy()
        mask = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
        valid = mask != 255
        np.add.at(conf, (mask[valid], pred[valid]), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


@pytest.mark.slow
def test_dynavit_segment_trains_and_reports_the_true_miou(voc, tmp_path):
    s = run_segment(voc, "dynavit", tmp_path / "dv")
    assert s["train_loss"][-1] < s["train_loss"][0]
    assert s["best_miou"] == max(json.loads(ln)["miou"] for ln in open(tmp_path / "dv" / "metrics.jsonl"))
    assert math.isclose(s["best_miou"], numpy_miou(voc, tmp_path / "dv", s["method_param"]), rel_tol=1e-9)
    assert len(s["best"]["iou"]) == 21 and s["best"]["iou"][0] is not None  # background is scored
    # Dyna-ViT's dense forward does exactly its budget, less the classifier it does not run
    assert s["best"]["measured_macs"] + HEAD_MACS == s["macs"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svit", "tome"])
def test_svit_and_tome_segment_train(voc, tmp_path, method):
    s = run_segment(voc, method, tmp_path / method)
    assert s["train_loss"][-1] < s["train_loss"][0]
    if method == "tome":  # a fixed schedule: the measured MACs are the matched ones (no classifier)
        assert s["best"]["measured_macs"] + HEAD_MACS == s["macs"]
    assert 0 < s["best_miou"] <= 1 and abs(s["macs"] / s["dynavit_macs"] - 1) < 0.1


def test_segment_refuses_a_dataset_without_masks(tmp_path, capsys):
    from tiny_dataset import make_tiny_dataset

    make_tiny_dataset(tmp_path / "ds", splits=(("train", 8), ("val", 4)))
    code = run_cli(["--shards", tmp_path / "ds", "--out", tmp_path / "r", "--task", "segment", "--k", "50",
                    "--epochs", "1", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                    json.dumps({"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
                    "--batch-size", "4", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "mask" in err[-1]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_show_draws_the_stored_mask_beside_the_kept_patches(voc, tmp_path):
    pytest.importorskip("matplotlib")
    from dynavit.pipeline.show import render_show

    res = render_show(voc["ds"], "val", 2, [50], tmp_path / "fig.png")
    assert res["columns"][:2] == ["image", "seg"] and (tmp_path / "fig.png").is_file()
    samples = tar_samples(voc["ds"], "val")
    for s in res["samples"]:
        want = np.asarray(Image.open(io.BytesIO(samples[s["key"]]["mask.png"])))
        assert np.array_equal(s["seg"], want)


@pytest.mark.slow
def test_report_lists_miou_overall_and_per_class(voc, tmp_path):
    s = run_segment(voc, "dynavit", tmp_path / "dv", "--epochs", "1")
    assert run_cli(["report", tmp_path / "dv", "--out", tmp_path / "rep"]) == 0
    md = (tmp_path / "rep" / "segment.md").read_text()
    assert f"{100 * s['best_miou']:.1f}" in md and "background" in md
    import csv
    rows = list(csv.DictReader(open(tmp_path / "rep" / "segment.csv")))
    assert len(rows) == 21
    bg = next(r for r in rows if r["class"] == "background")
    assert float(bg["iou"]) == pytest.approx(s["best"]["iou"][0])


def test_voc_seg_source_refuses_bad_masks_per_sample(tmp_path):
    from dynavit.pipeline.decode import DecodeError
    from dynavit.pipeline.seg_mask import fit_mask, read_mask
    from dynavit.pipeline.sources import SourceError, open_source

    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    rgb = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(40, 30, 3)
    good = np.zeros((40, 30), np.uint8)
    good[10:30, 5:25] = 8
    masks = {"a": Image.fromarray(good), "b": None, "c": Image.fromarray(np.full((40, 30), 42, np.uint8)),
             "d": Image.fromarray(good).convert("RGB")}
    for name, m in masks.items():
        Image.fromarray(rgb).save(voc / "JPEGImages" / f"{name}.jpg")
        if m is not None:
            m.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\nc\nd\n")
    src = open_source("voc-seg", str(tmp_path))
    got = {r.source.split("/")[-1]: r for r in src.read_unit(src.units("train", 10)[0])}
    assert got["a.jpg"].ok and got["a.jpg"].label == 8 and got["a.jpg"].mask
    assert got["b.jpg"].error == "mask: missing file"
    assert "value 42" in got["c.jpg"].error and "mode RGB" in got["d.jpg"].error
    with pytest.raises(DecodeError, match="30×40 but the image is 40×30"):
        fit_mask(read_mask(got["a.jpg"].mask, 21), 32, "center-crop", 0.875, 4, (40, 30))
    (voc / "ImageSets/Segmentation/train.txt").write_text("../x\n")
    with pytest.raises(SourceError, match="not an image id"):
        open_source("voc-seg", str(tmp_path)).entries("train")
