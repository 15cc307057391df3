"""The flat-patch warning (issue 29) on real photos: scikit-image's sample photos squeezed to
mid-grey and pasted on flat dark or white ground with margins (pipeline/photo_data.py). l2
(the energy of the normalised patch) prefers the flat ground; sobel does not. The figures in
dataset.json are recomputed here from the stored PNGs and index tars with tarfile + NumPy."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("skimage")

from dynavit.pipeline import flatness  # noqa: E402
from dynavit.pipeline.cli import main  # noqa: E402
from dynavit.pipeline.photo_data import grey_objects  # noqa: E402

ARGS = ["--data", "imagefolder", "--image-size", "64", "--patch-size", "8", "--resize", "squash",
        "--format", "png", "--k", "50,25", "--scorer", "l2,sobel", "--no-progress", "--shard-size", "64"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey")
    grey_objects(root / "src", n_train=96, n_val=32, size=64)
    out = root / "out"
    result = CliRunner().invoke(main, ["index", "--src", str(root / "src"), "--out", str(out), "--workers", "1", *ARGS])
    assert result.exit_code == 0, result.output
    return root, out, result.output


def _recount(out, split: str, scorers=("l2", "sobel"), ks=(50, 25)) -> dict:
    """Counts of the sampled images from the files alone: PNG pixels, k*.npy members."""
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    sampled = {r["key"] for r in manifest
               if r["split"] == split and r["status"] == "ok" and int(r["sha256"][:16], 16) % 8 == 0}
    images, kept = {}, {s: {} for s in scorers}
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if key not in sampled:
                    continue
                data = tf.extractfile(m).read()
                if ext == "png":
                    images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                elif ext.startswith("k") and ext.endswith(".npy"):
                    scorer = tar_path.name.split("-")[1]
                    kept[scorer].setdefault(key, {})[int(ext[1:-4])] = np.load(io.BytesIO(data))
    counts = {"images": 0, "patches": 0, "flat": 0, "kept_flat": {s: {str(k): 0 for k in ks} for s in scorers}}
    for key, img in images.items():
        p = img.reshape(8, 8, 8, 8, 3).swapaxes(1, 2).astype(np.float64)  # [Gh,Gw,P,P,3]
        pooled_std = np.sqrt(p.var(axis=(2, 3)).mean(-1)).reshape(-1)     # grey levels
        flat = pooled_std < flatness.FLAT_BELOW
        counts["images"] += 1
        counts["patches"] += flat.size
        counts["flat"] += int(flat.sum())
        for s in scorers:
            for k in ks:
                counts["kept_flat"][s][str(k)] += int(flat[kept[s][key][k]].sum())
    return counts


def test_warning_fires_for_l2_not_sobel(photos):
    _, out, output = photos
    fp = json.loads((out / "dataset.json").read_text())["flat_patches"]
    assert fp["definition"]["flat_below"] == flatness.FLAT_BELOW
    for split in ("train", "val"):
        fig = fp["splits"][split]
        warned = {w["scorer"]: w for w in fig["warnings"]}
        assert set(warned) == {"l2"}, fig["warnings"]
        assert warned["l2"]["better"] == "sobel" and warned["l2"]["better_indexed"]
        assert warned["l2"]["kept"] - fig["random"] >= flatness.MARGIN
        assert f"warning: {split}: l2 keeps" in output and f"warning: {split}: sobel" not in output
    assert "train with --scorer sobel" in output


@pytest.mark.parametrize("split", ["train", "val"])
def test_figures_match_the_files(photos, split):
    _, out, _ = photos
    fig = json.loads((out / "dataset.json").read_text())["flat_patches"]["splits"][split]
    ref = _recount(out, split)
    assert ref["images"] >= 3  # the sample is one image in 8, by content hash
    assert (fig["images"], fig["patches"], fig["flat"]) == (ref["images"], ref["patches"], ref["flat"])
    for s in ("l2", "sobel"):
        assert fig["kept_flat"][s] == ref["kept_flat"][s]
        for k in ("50", "25"):
            assert fig["kept"][s][k] == ref["images"] * 64 * int(k) // 100
            assert fig["kept_share"][s][k] == ref["kept_flat"][s][k] / fig["kept"][s][k]
    assert fig["random"] == ref["flat"] / ref["patches"]
    # scorers that were not indexed are measured too (to name a better one)
    assert set(fig["kept_share"]) == {"l2", "sobel", "entropy", "contrast", "distinct"}


def test_workers_and_pieces_give_the_same_figures(photos, tmp_path):
    """Two workers cut the two shards into pieces: the counts are summed when they are joined."""
    root, out, _ = photos
    result = CliRunner().invoke(main, ["index", "--src", str(root / "src"), "--out", str(tmp_path / "o2"),
                                       "--workers", "2", *ARGS])
    assert result.exit_code == 0, result.output
    a = json.loads((out / "dataset.json").read_text())["flat_patches"]
    b = json.loads((tmp_path / "o2" / "dataset.json").read_text())["flat_patches"]
    assert a == b


def test_show_checks_the_shown_samples(photos, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = photos
    result = CliRunner().invoke(main, ["show", str(out), "--split", "val", "--n", "6", "--k", "25",
                                       "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(l.startswith("warning: val: l2 keeps") and "in these samples" in l for l in lines)
    assert any(l.startswith("warning: val: l2 keeps") and "dataset.json" in l for l in lines)
    assert not any("sobel keeps" in l and l.startswith("warning: val: sobel") for l in lines)


def test_rule():
    shares = {"l2": {"50": 0.59, "25": 0.70}, "sobel": {"50": 0.20, "25": 0.10}, "entropy": {"50": 0.30, "25": 0.5}}
    w = flatness.warnings_for(shares, 0.32, ["l2", "entropy"])
    assert [(x["scorer"], x["k"], x["better"]) for x in w] == [("l2", 25, "sobel"), ("entropy", 25, "sobel")]
    # an indexed candidate within the margin is preferred to a lower one that is not indexed
    w = flatness.warnings_for(shares, 0.32, ["l2", "sobel"])
    assert [(x["scorer"], x["better"], x["better_indexed"]) for x in w] == [("l2", "sobel", True)]
    shares["sobel"] = {"50": 0.6, "25": 0.8}
    shares["entropy"] = {"50": 0.6, "25": 0.75}
    assert flatness.warnings_for(shares, 0.32, ["l2"])[0]["better"] is None  # none does better
    assert flatness.warnings_for({"l2": {"50": 0.41}}, 0.32, ["l2"]) == []  # under the margin


def test_verify_checks_the_figures(photos, tmp_path):
    """dynaprep verify accepts the written figures and reports edited ones (one line each)."""
    import shutil

    from dynavit.manifests import validate_dataset

    _, out, _ = photos
    assert validate_dataset(out, check_checksums=False) == []
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    d = json.loads((copy / "dataset.json").read_text())
    d["flat_patches"]["splits"]["val"]["kept_flat"]["l2"]["25"] = 10**6
    d["flat_patches"]["splits"]["train"]["warnings"] = "l2"
    (copy / "dataset.json").write_text(json.dumps(d))
    found = [v.message for v in validate_dataset(copy, check_checksums=False)]
    assert any("'l2'] K=25: 1000000 flat of" in m for m in found), found
    assert any("flat_patches['train'] is malformed" in m for m in found), found
    r = CliRunner().invoke(main, ["show", str(copy), "--split", "train", "--n", "2", "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and "is malformed" in r.output and "Traceback" not in r.output
