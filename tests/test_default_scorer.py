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
