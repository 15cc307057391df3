"""Which scorer a run uses when --scorer is not given (issue 29): the dataset's first one,
i.e. the one `dynaprep index` wrote first; the run's config.json records the name."""
from __future__ import annotations

import pytest

from tiny_dataset import make_tiny_dataset

from dynavit.trainer.config import ConfigError, TrainConfig, check_config


@pytest.mark.parametrize("scorers", [("sobel", "l2"), ("l2", "entropy")])
def test_train_defaults_to_the_datasets_first_scorer(tmp_path, scorers):
    make_tiny_dataset(tmp_path / "ds", scorers=scorers)
    cfg = TrainConfig(shards=str(tmp_path / "ds"), out=str(tmp_path / "run"), k=50, model="vit_tiny_patch16_224",
                      workers=0)
    check_config(cfg)
    assert cfg.scorer == scorers[0] and cfg.to_dict()["scorer"] == scorers[0]


def test_named_scorer_must_be_in_the_dataset(tmp_path):
    make_tiny_dataset(tmp_path / "ds", scorers=("l2",))
    cfg = TrainConfig(shards=str(tmp_path / "ds"), out=str(tmp_path / "run"), k=50, scorer="contrast", workers=0)
    with pytest.raises(ConfigError, match="'contrast' is not in this dataset's scorers"):
        check_config(cfg)


def test_dynaprep_index_defaults_to_entropy(tmp_path):
    """New datasets are scored with entropy unless --scorer says otherwise (the paper's l2
    kept flat background on real scans and photos: docs/BENCHMARKS.md)."""
    from click.testing import CliRunner

    from dynavit.manifests import DEFAULT_SCORER, read_dataset_info
    from dynavit.pipeline.cli import main

    common = ["index", "--data", "demo", "-o", "n_train=8", "-o", "n_val=4", "--image-size", "32", "--patch-size",
              "8", "--k", "50", "--format", "png", "--workers", "1", "--no-progress"]
    r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert DEFAULT_SCORER == "entropy" and read_dataset_info(tmp_path / "a").scorers == ["entropy"]
    assert sorted(p.name for p in (tmp_path / "a" / "train").glob("topk-*")) == ["topk-entropy-000000.tar"]
    r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "b"), "--scorer", "l2"])
    assert r.exit_code == 0 and read_dataset_info(tmp_path / "b").scorers == ["l2"]  # the paper's, by name


@pytest.mark.parametrize("saved,expect", [("sobel", "sobel"), (None, "l2")])
def test_predict_defaults_to_the_runs_scorer(tmp_path, saved, expect):
    """dynatrain predict at K < 100 without --scorer scores with the scorer the checkpoint's
    run trained with (its config), else l2."""
    import numpy as np
    import timm
    import torch
    from click.testing import CliRunner
    from PIL import Image

    from dynavit.trainer.cli_tools import predict_command

    kw = {"img_size": 32, "depth": 1, "num_classes": 3}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    config = {"model": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "depth": 1},
              **({"scorer": saved} if saved else {})}
    torch.save({"model": vit.state_dict(), "model_name": "vit_tiny_patch16_224", "config": config,
                "classes": ["a", "b", "c"], "epoch": 1}, tmp_path / "best.pt")
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    r = CliRunner().invoke(predict_command, [str(tmp_path / "best.pt"), str(tmp_path / "x.png"), "--out",
                                             str(tmp_path / "p.csv"), "--k", "50", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"K=50 {expect} on cpu" in r.output
