"""`bench-index`: the floor must run dynaprep's own jobs, and the reported ratio must be
the median of the floor/dynaprep pairs it ran."""
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynavit.pipeline.bench.index import floor_jobs, make_jpegs
from dynavit.pipeline.cli import main as cli
from dynavit.pipeline.index import IndexConfig, plan, split_jobs
from dynavit.pipeline.sources import open_source


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpegs(tmp_path_factory.mktemp("bench-jpegs"), 70, size=(120, 90))


def _all_files(src: Path) -> list[str]:
    return sorted(str(p) for p in (src / "train").rglob("*.JPEG"))


@pytest.mark.parametrize("workers,shard_size", [(1, 1000), (2, 1000), (2, 20), (3, 30)])
def test_floor_runs_dynaprep_jobs(jpegs, workers, shard_size):
    """Every file once, in the jobs dynaprep's pool runs: one 70-image shard at 2 workers
    is cut into pieces for the floor too, so neither side runs on one worker alone."""
    jobs = floor_jobs(jpegs, workers, shard_size)
    assert sorted(f for job in jobs for f in job) == _all_files(jpegs)
    source = open_source("imagefolder", str(jpegs))
    cfg = IndexConfig(data="imagefolder", src=str(jpegs), out="", ks=[50], shard_size=shard_size, workers=workers)
    theirs, _, _ = split_jobs(cfg, source, plan(cfg, source))
    assert [len(j) for j in jobs] == [u.count for u in theirs]
    assert [os.path.basename(j[0]) for j in jobs] == \
        [os.path.basename(u.payload[1][0][0]) for u in theirs]
    if workers > 1:
        assert len(jobs) >= workers


def test_bench_index_cli_reports_median_of_pairs(tmp_path, jpegs):
    src_root = tmp_path / "work"
    out_json = tmp_path / "rows.json"
    r = CliRunner().invoke(cli, ["bench-index", "--n", "24", "--workers", "1", "--repeats", "3",
                                 "--workdir", str(src_root), "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(out_json.read_text())
    assert len(row["ratios"]) == 3
    assert row["ratio"] == pytest.approx(sorted(row["ratios"])[1], abs=1e-4)
    assert 0 < row["cpu_ratio"] < 10 and row["floor_img_s"] > 0 and row["dynaprep_img_s"] > 0
    assert "medians of 3 floor/dynaprep pairs" in r.output
    assert (src_root / "out" / "dataset.json").exists()  # dynaprep really ran


def test_bench_index_rejects_bad_repeats():
    r = CliRunner().invoke(cli, ["bench-index", "--repeats", "0"])
    assert r.exit_code == 2 and "repeats" in r.output
