"""Issue 15, item 4: `merge-manifests` merges from the plan saved in OUT/.dynaprep/plan.json,
so it works where the source is not mounted, and still refuses parts of another run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

import fixtures_data as fd
from dynavit.manifests import validate_dataset
from dynavit.pipeline.cli import main
from test_index import SMALL, _tree


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _dataset(tmp_path):
    return fd.make_imagefolder(tmp_path / "src", classes=("a", "b", "c"), per_class=5, size=(48, 48),
                               val_per_class=2, extras=False)


def _job(src):
    return ["index", "--data", "imagefolder", "--src", src, "--k", "50,25", "--shard-size", "4", *SMALL]


def _unmerge(out: Path) -> None:
    for name in ("dataset.json", "manifest.parquet", "shards.parquet"):
        (out / name).unlink()


def test_merge_manifests_without_the_source(tmp_path):
    ds = _dataset(tmp_path)
    one = tmp_path / "one"
    assert invoke(*_job(ds["root"]), "--out", one).exit_code == 0
    out = tmp_path / "ranks"
    for rank in (1, 0):
        r = invoke(*_job(ds["root"]), "--out", out, "--rank", rank, "--world-size", 2)
        assert r.exit_code == 0, r.output
    plan = json.loads((out / ".dynaprep" / "plan.json").read_text())
    assert plan["splits"] == ["train", "val"] and plan["classes"] == ["a", "b", "c"]
    assert [u[:2] for u in plan["units"]] == [["train", i] for i in range(4)] + [["val", i] for i in range(2)]
    assert [u[2] for u in plan["units"]] == [4, 4, 4, 3, 4, 2]
    before = json.loads((out / "dataset.json").read_text())
    _unmerge(out)
    shutil.move(ds["root"], tmp_path / "elsewhere")  # the source is not mounted on this machine
    result = invoke("merge-manifests", out)
    assert result.exit_code == 0, result.output
    assert "train 15 ok/0 failed, val 6 ok/0 failed" in result.output
    assert validate_dataset(out) == []
    assert invoke("verify", out).exit_code == 0
    assert _tree(out) == _tree(one)
    after = json.loads((out / "dataset.json").read_text())
    assert {**after, "created_at": None} == {**before, "created_at": None}


def test_merge_refuses_a_plan_of_another_run_and_parts_that_do_not_match_it(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    assert invoke(*_job(ds["root"]), "--out", out).exit_code == 0
    _unmerge(out)
    plan_path = out / ".dynaprep" / "plan.json"
    good = plan_path.read_text()
    # A plan whose digest is not the run's (config.json) is refused.
    plan_path.write_text(good.replace(json.loads(good)["plan"], "0" * 64))
    result = invoke("merge-manifests", out)
    assert result.exit_code == 2 and "plan digests differ" in result.output, result.output
    # Parts that do not hold what the plan says (here: a unit's count) are refused.
    plan = json.loads(good)
    plan["units"][1][2] = 3
    plan_path.write_text(json.dumps(plan))
    result = invoke("merge-manifests", out)
    assert result.exit_code == 2 and "shard train/000001 has 4 manifest rows where the plan has 3" in result.output
    assert not (out / "dataset.json").exists()
    plan_path.write_text("{not json")
    result = invoke("merge-manifests", out)
    assert result.exit_code == 2 and "plan.json is damaged" in result.output
    plan_path.write_text(good)
    assert invoke("merge-manifests", out).exit_code == 0
    assert validate_dataset(out) == []


def test_merge_of_an_output_without_a_saved_plan_re_plans_from_the_source(tmp_path):
    """Outputs written before plans were saved still merge (from the source, as before)."""
    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    assert invoke(*_job(ds["root"]), "--out", out).exit_code == 0
    want = _tree(out)
    _unmerge(out)
    (out / ".dynaprep" / "plan.json").unlink()
    assert invoke("merge-manifests", out).exit_code == 0
    assert _tree(out) == want
    assert len(pq.read_table(out / "manifest.parquet")) == 21
