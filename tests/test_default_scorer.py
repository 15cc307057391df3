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
