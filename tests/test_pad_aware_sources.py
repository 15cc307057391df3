"""--pad-aware for every source, not only wds (issue 29): an ImageFolder of real photos
letterboxed with centred constant bars. With the option no bar patch is kept while photo
patches are left out; without it (the default for folder layouts) l2 keeps bars."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

pytest.importorskip("skimage")

from dynavit.pipeline.cli import main  # noqa: E402
from dynavit.pipeline.photo_data import letterboxed  # noqa: E402

SIZE, PATCH, BAR = 64, 8, 16


def _kept(out, k: int) -> dict:
    """{source file name: k{K}.npy} of the l2 index tars, read with tarfile."""
    rows = {r["key"]: r["source"] for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["split"] == "train"}
    kept = {}
    for tar_path in sorted((out / "train").glob("topk-l2-*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == f"k{k}.npy":
                    kept["/".join(rows[key].split("/")[-3:])] = np.load(io.BytesIO(tf.extractfile(m).read()))
    return kept


def _bar_patches(axis: int) -> np.ndarray:
    g = SIZE // PATCH
    rows = np.zeros((g, g), bool)
    b = BAR // PATCH
    if axis == 0:
        rows[:b], rows[g - b:] = True, True
    else:
        rows[:, :b], rows[:, g - b:] = True, True
    return rows.reshape(-1)


def test_pad_aware_on_an_imagefolder(tmp_path):
    data = letterboxed(tmp_path / "src", n_train=24, n_val=4, size=SIZE, bar=BAR)
    bars = {"/".join(p.split("/")[-3:]): v for p, v in data["bars"].items()}  # train/<class>/<file>
    common = ["index", "--data", "imagefolder", "--src", str(tmp_path / "src"), "--image-size", str(SIZE),
              "--patch-size", str(PATCH), "--resize", "squash", "--format", "png", "--k", "50",
              "--workers", "1", "--no-progress", "--scorer", "l2"]
    shares = {}
    for flag in ("--pad-aware", None):
        out = tmp_path / f"out{flag or ''}"
        r = CliRunner().invoke(main, [*common, "--out", str(out), *([flag] if flag else [])])
        assert r.exit_code == 0, r.output
        info = json.loads((out / "dataset.json").read_text())
        assert info["padding"]["policy"] == ("pad-aware" if flag else "none")
        kept = _kept(out, 50)
        assert len(kept) == 24 and set(kept) <= set(bars)
        on_bars = [int(_bar_patches(bars[n][0])[idx].sum()) for n, idx in kept.items()]
        shares[flag] = sum(on_bars) / sum(len(i) for i in kept.values())
        if flag:  # 32 photo patches of 64 = k: every kept patch is photo
            assert sum(on_bars) == 0
    assert shares[None] > 0.2  # the paper's plain l2 keeps the bars (white ones above all)
