"""`dynatrain explain`: figures and overlap.csv of a Dyna-ViT run (the LIME algorithm itself is
tested in test_lime.py), and in-encoder methods refused with exit 2, nothing written."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import timm
import torch
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from dynavit.trainer.cli import main  # noqa: E402


def _checkpoint(path, method="dynavit", k=50):
    torch.manual_seed(0)
    kw = {"depth": 1, "patch_size": 8, "embed_dim": 32, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, **kw)
    cfg = {"model": "vit_tiny_patch16_224", "model_kwargs": kw, "input_size": 32, "k": k, "scorer": "contrast",
           "method": method}
    torch.save({"model": vit.state_dict(), "config": cfg, "classes": ["a", "b", "c"]}, path)


def _run(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_explain_writes_figures_and_overlaps(tmp_path, capsys):
    _checkpoint(tmp_path / "run.pt")
    from skimage import data
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(data.astronaut()[::16, ::16]).save(img / "astronaut.png")
    Image.fromarray(data.chelsea()[::9, ::9][:32, :32]).save(img / "cat.png")
    out = tmp_path / "out"
    code = _run(["explain", str(tmp_path / "run.pt"), str(img), "--out", str(out), "--k", "25", "--k", "75",
                 "--samples", "40", "--segments", "12", "--top", "3"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "overlap.csv")))
    assert len(rows) == 4 and {r["k"] for r in rows} == {"25", "75"}
    for r in rows:
        assert float(r["kept_share"]) == pytest.approx(int(r["k"]) / 100)  # 16 patches: K·16/100 exact
        assert 0 <= float(r["overlap"]) <= 1
    assert len(list(out.glob("explain-*.png"))) == 2
    said = capsys.readouterr().out
    assert "K=25: overlap" in said and "chance 0.250" in said


def test_explain_refuses_in_encoder_methods(tmp_path, capsys):
    _checkpoint(tmp_path / "tome.pt", method="tome")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert _run(["explain", str(tmp_path / "tome.pt"), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    assert "keeps no patch set" in capsys.readouterr().err
