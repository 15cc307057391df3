"""`dynaprep show`: figure size, masks equal the stored top-K sets, argument errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("matplotlib")

from dynavit.manifests import iter_tar_samples, k_count, npy_load, read_dataset_info, read_shards, resolve
from dynavit.pipeline.cli import main
from dynavit.pipeline.show import keep_mask, render_show

KS = (70, 50, 25)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Demo dataset through the real `dynaprep index`: 64 px images, 8 px patches (N = 64)."""
    out = tmp_path_factory.mktemp("show") / "ds"
    result = CliRunner().invoke(main, [
        "index", "--data", "demo", "--out", str(out), "-o", "n_train=4", "-o", "n_val=6",
        "--image-size", "64", "--patch-size", "8", "--scorer", "l2,sobel", "--k", "70,50,25",
        "--format", "png", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def stored(dataset, split="val", scorer="l2"):
    """{key: {K: indices}} and {key: rgb} read straight from the shards."""
    indices, images = {}, {}
    for row in read_shards(dataset).to_pylist():
        if row["split"] != split:
            continue
        for key, members in iter_tar_samples(resolve(dataset, row["images"])):
            images[key] = np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB"))
        path = next(e["path"] for e in row["index"] if e["scorer"] == scorer)
        for key, members in iter_tar_samples(resolve(dataset, path)):
            indices[key] = {k: npy_load(members[f"k{k}.npy"]) for k in KS}
    return indices, images


def show(dataset, png, *args):
    return CliRunner().invoke(main, ["show", str(dataset), "--out", str(png), *map(str, args)])


def test_figure_size_and_masks(dataset, tmp_path):
    png = tmp_path / "fig.png"
    facts = render_show(dataset, "val", 4, [25, 50, 70], png, seed=3)
    assert png.is_file()
    info = read_dataset_info(dataset)
    n = info.num_patches
    assert n == 64

    # Layout: image + one heatmap per scorer + (kept, mask) per K; 2-inch panels at 100 dpi.
    assert facts["columns"] == ["image", "score:l2", "score:sobel", "kept:70", "mask:70", "kept:50", "mask:50",
                                "kept:25", "mask:25"]
    assert facts["nrows"] == 4 and facts["ncols"] == 9
    with Image.open(png) as im:
        assert im.size == facts["size_px"] == (9 * 200, 4 * 200 + 40)
        pixels = np.asarray(im.convert("L"), dtype=np.float64)

    indices, images = stored(dataset)
    assert len({s["key"] for s in facts["samples"]}) == 4
    for s in facts["samples"]:
        for k in KS:
            kept = k_count(k, n)
            mask = s["masks"][k]
            assert mask.shape == tuple(info.image_size) and mask.dtype == bool
            assert s["kept"][k] == kept
            assert mask.mean() == pytest.approx(kept / n, abs=1e-12)
            # the mask is exactly the stored index set, patch by patch
            np.testing.assert_array_equal(s["indices"][k], indices[s["key"]][k])
            cells = mask[::info.patch_size, ::info.patch_size].reshape(-1)
            np.testing.assert_array_equal(np.flatnonzero(cells), indices[s["key"]][k])
            np.testing.assert_array_equal(mask, keep_mask(indices[s["key"]][k], info.grid, info.patch_size))
            # and the PNG shows it: white fraction of the drawn mask panel ≈ k/N
            left, top, right, bottom = s["mask_boxes"][k]
            panel = pixels[int(np.ceil(top)) + 2:int(bottom) - 2, int(np.ceil(left)) + 2:int(right) - 2]
            assert panel.shape[0] > 100 and panel.shape[1] > 100
            white = (panel > 127).mean()
            assert white == pytest.approx(kept / n, abs=0.03), (s["key"], k)
            # exactly: the pixel at the centre of every patch cell is white iff the patch is kept
            gh, gw = info.grid
            rows = (top + (np.arange(gh) + 0.5) * (bottom - top) / gh).astype(int)
            cols = (left + (np.arange(gw) + 0.5) * (right - left) / gw).astype(int)
            drawn = pixels[np.ix_(rows, cols)] > 127
            np.testing.assert_array_equal(np.flatnonzero(drawn.reshape(-1)), indices[s["key"]][k])
        # nested sets: K=25 ⊂ K=50 ⊂ K=70
        assert not (s["masks"][25] & ~s["masks"][50]).any() and not (s["masks"][50] & ~s["masks"][70]).any()


def test_seed_is_deterministic_and_keys_select(dataset, tmp_path):
    a = render_show(dataset, "val", 3, [50], tmp_path / "a.png", seed=1)
    b = render_show(dataset, "val", 3, [50], tmp_path / "b.png", seed=1)
    assert [s["key"] for s in a["samples"]] == [s["key"] for s in b["samples"]]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()

    indices, _ = stored(dataset, scorer="sobel")
    keys = sorted(indices)[-1:] + sorted(indices)[:1]  # order as given
    png = tmp_path / "keys.png"
    result = show(dataset, png, "--keys", ",".join(keys), "--k", "25", "--scorer", "sobel", "--split", "val")
    assert result.exit_code == 0, result.output
    with Image.open(png) as im:
        assert im.size == (4 * 200, 2 * 200 + 40)  # image, sobel heatmap, kept, mask
    facts = render_show(dataset, "val", 8, [25], tmp_path / "k2.png", keys=keys, scorers=["sobel"])
    assert [s["key"] for s in facts["samples"]] == keys
    for s in facts["samples"]:
        np.testing.assert_array_equal(s["indices"][25], indices[s["key"]][25])


def test_n_larger_than_split_shows_all(dataset, tmp_path):
    facts = render_show(dataset, "train", 50, [70], tmp_path / "all.png")
    assert facts["nrows"] == 4


@pytest.mark.parametrize("args, hint", [
    (["--k", "33"], "--k"),
    (["--k", "25,40"], "--k"),
    (["--k", "x"], "--k"),
    (["--split", "nope"], "--split"),
    (["--scorer", "entropy"], "--scorer"),
    (["--keys", "0000000000,123"], "--keys"),
])
def test_bad_arguments_exit_2_without_writing(dataset, tmp_path, args, hint):
    png = tmp_path / "bad.png"
    result = show(dataset, png, *args)
    assert result.exit_code == 2, result.output
    assert hint in result.output
    assert not png.exists() and list(tmp_path.iterdir()) == []


def test_not_a_dataset_exits_2(tmp_path):
    png = tmp_path / "x.png"
    result = show(tmp_path, png)
    assert result.exit_code == 2 and "dataset.json" in result.output
    assert not png.exists()


def test_missing_matplotlib_is_one_line(dataset, tmp_path, no_matplotlib):
    png = tmp_path / "fig.png"
    result = show(dataset, png)
    assert result.exit_code == 1
    assert "install dynavit[viz]" in result.output and result.output.strip().count("\n") == 0
    assert not png.exists()


def test_without_out_it_writes_show_png_here(dataset, tmp_path, monkeypatch):
    """`dynaprep show DATASET` alone (as README's quick start runs it): show.png in the current
    folder, the same picture as with --out."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["show", str(dataset), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert show(dataset, tmp_path / "named.png", "--seed", 3).exit_code == 0
    assert (tmp_path / "show.png").read_bytes() == (tmp_path / "named.png").read_bytes()
