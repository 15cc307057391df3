"""--method tome|evit in dynatrain at Dyna-ViT's budget, and `dynatrain compare`."""
from __future__ import annotations

import csv
import json

import pytest

from dynavit.trainer.methods.budget import count_evit_macs, count_tome_macs
from dynavit.trainer.cli import main
from dynavit.trainer.methods.flops import build_meta_model, count_macs
from tiny_dataset import make_tiny_dataset

# 12 blocks, so that EViT's default pruning blocks 4, 7, 10 exist.
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 12, "num_heads": 2}
COMMON = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS), "--batch-size", "8",
          "--workers", "0", "--epochs", "1", "--k", "50"]


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    make_tiny_dataset(root / "ds", splits=(("train", 32), ("val", 8)))
    for method in ("dynavit", "tome", "evit"):
        assert run_cli(["--shards", root / "ds", "--out", root / method, "--method", method, *COMMON]) == 0
    return root


_FLOPS: dict = {}


def flops_all() -> dict:
    """`dynatrain flops --method all --k 50` for the runs' model (once per module)."""
    if not _FLOPS:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "flops.json"
        assert run_cli(["flops", "--model", "vit_tiny_patch16_224", "--k", "100,50", "--method", "all",
                        "--model-kwargs", json.dumps({**MODEL_KWARGS, "num_classes": 4}), "--json", path]) == 0
        _FLOPS.update(json.loads(path.read_text()))
        assert _FLOPS["rows"][0]["K"] == 50 or _FLOPS["rows"][1]["K"] == 50
        _FLOPS["rows"] = [r for r in _FLOPS["rows"] if r["K"] == 50]
    return _FLOPS


def run_budget(run) -> dict:
    """The budget a run recorded (config.json), checked equal to its summary.json's."""
    budget = json.loads((run / "config.json").read_text())["run"]["budget"]
    assert json.loads((run / "summary.json").read_text())["budget"] == budget
    return budget


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_methods_train_at_the_budget_and_compare_tabulates_them(runs, tmp_path):
    meta = build_meta_model("vit_tiny_patch16_224", num_classes=4, **MODEL_KWARGS)
    dyna = count_macs(meta, 50)
    records = {m: metrics(runs / m)[-1] for m in ("dynavit", "tome", "evit")}
    assert records["dynavit"]["method_param"] == "K=50"
    r = int(records["tome"]["method_param"].split()[0].removeprefix("r="))
    keep = float(records["evit"]["method_param"].split()[0].removeprefix("keep_rate="))
    # the chosen parameters land within 5 % of Dyna-ViT's exact MACs at K=50
    assert abs(count_tome_macs(meta, r) / dyna - 1) < 0.05
    assert abs(count_evit_macs(meta, keep) / dyna - 1) < 0.05
    assert all(rec["k"] == 50 for rec in records.values())

    out = tmp_path / "table"
    assert run_cli(["compare", runs / "dynavit", runs / "tome", runs / "evit", "--out", out, "--batch-size", 4,
                    "--steps", 1, "--repeats", 1]) == 0
    rows = {row["method"]: row for row in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"dynavit", "tome", "evit"}
    assert float(rows["dynavit"]["gmacs"]) == pytest.approx(dyna / 1e9)
    assert float(rows["tome"]["gmacs"]) == pytest.approx(count_tome_macs(meta, r) / 1e9)
    for method, row in rows.items():
        assert float(row["best_acc1"]) == max(m["acc1"] for m in metrics(runs / method))
        assert float(row["infer_img_s"]) > 0
    md = (out / "compare.md").read_text()
    # three grouped rows (one run each, so no std) and three per-run rows under their header
    assert md.count("\n| ") == 3 + 1 + 3 and "as each run recorded it" in md and "†" not in md
    assert md.count("n = 1, no std") == 3
    # one parameter per run, everywhere: the run's record, compare's table and `dynatrain flops`
    table = flops_all()
    for method in ("dynavit", "tome", "evit"):
        budget = run_budget(runs / method)
        assert rows[method]["budget_source"] == "recorded"
        assert rows[method]["parameter"] == budget["described"]
        assert float(rows[method]["gmacs"]) == pytest.approx(budget["macs"] / 1e9, rel=1e-12)
    assert table["budgets"][0]["tome"]["r"] == run_budget(runs / "tome")["param"] == r
    assert table["budgets"][0]["tome"]["macs"] == run_budget(runs / "tome")["macs"]
    assert table["budgets"][0]["evit"]["keep_rate"] == run_budget(runs / "evit")["param"] == keep
    assert table["budgets"][0]["evit"]["macs"] == run_budget(runs / "evit")["macs"]
    assert table["rows"][0]["macs"] == run_budget(runs / "dynavit")["macs"] == dyna


def test_compare_groups_seeds_of_a_method_into_mean_and_std(runs, tmp_path):
    """Runs of one method at one recorded parameter (different --seed) become one row: best top-1
    mean ± sample std over the runs, checked against statistics.mean/stdev of their metrics.jsonl."""
    import statistics

    for seed in (1, 2):
        assert run_cli(["--shards", runs / "ds", "--out", tmp_path / f"tome-s{seed}", "--method", "tome",
                        "--seed", seed, *COMMON]) == 0
    tome_runs = [runs / "tome", tmp_path / "tome-s1", tmp_path / "tome-s2"]
    out = tmp_path / "table"
    assert run_cli(["compare", *tome_runs, runs / "dynavit", "--out", out, "--batch-size", 2, "--steps", 1,
                    "--repeats", 2]) == 0
    per_run = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["run"] for r in per_run] == ["tome", "tome-s1", "tome-s2", "dynavit"]
    assert [r["seed"] for r in per_run[1:3]] == ["1", "2"]
    groups = list(csv.DictReader(open(out / "compare_groups.csv")))
    assert [(g["method"], g["n"]) for g in groups] == [("tome", "3"), ("dynavit", "1")]
    tome, dyna = groups
    best = [max(m["acc1"] for m in metrics(r)) for r in tome_runs]
    assert float(tome["acc1_mean"]) == pytest.approx(statistics.mean(best))
    assert float(tome["acc1_std"]) == pytest.approx(statistics.stdev(best))
    assert tome["parameter"] == run_budget(runs / "tome")["described"] == run_budget(tome_runs[1])["described"]
    assert float(tome["gmacs"]) == pytest.approx(run_budget(runs / "tome")["macs"] / 1e9)
    train = [statistics.mean(m["images_per_s"] for m in metrics(r)) for r in tome_runs]
    assert float(tome["train_img_s"]) == pytest.approx(statistics.mean(train))
    # the group's inference range spans its runs' ranges, its median lies inside
    mins = [float(r["infer_img_s_min"]) for r in per_run[:3]]
    maxs = [float(r["infer_img_s_max"]) for r in per_run[:3]]
    assert float(tome["infer_img_s_min"]) == pytest.approx(min(mins))
    assert float(tome["infer_img_s_max"]) == pytest.approx(max(maxs))
    assert min(mins) <= float(tome["infer_img_s"]) <= max(maxs)
    assert dyna["acc1_std"] == "" and float(dyna["acc1_mean"]) == max(m["acc1"] for m in metrics(runs / "dynavit"))
    md = (out / "compare.md").read_text()
    assert f"| tome | {tome['parameter']} | 3 (" in md and f"± {statistics.stdev(best):.1f} |" in md


def test_compare_rematches_a_run_without_a_record_and_says_so(runs, tmp_path):
    import shutil

    old = tmp_path / "old-tome"
    shutil.copytree(runs / "tome", old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["run"]["budget"]  # what a run written before budgets were recorded looks like
    (old / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "table"
    assert run_cli(["compare", old, "--out", out, "--batch-size", 2, "--steps", 1, "--repeats", 1]) == 0
    row = next(csv.DictReader(open(out / "compare.csv")))
    assert row["budget_source"] == "re-matched" and row["parameter"] == run_budget(runs / "tome")["described"]
    assert "† re-matched" in (out / "compare.md").read_text()


def test_method_argument_errors_exit_2(tmp_path, capsys):
    make_tiny_dataset(tmp_path / "ds", splits=(("train", 16), ("val", 8)))
    for extra in (["--select", "random"], ["--eval-k", "25"]):
        capsys.readouterr()
        assert run_cli(["--shards", tmp_path / "ds", "--out", tmp_path / "r", "--method", "tome", *COMMON,
                        *extra]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamicvit", "tnt", "cropr", "svit"])
def test_learned_methods_train_at_the_budget_and_save_their_heads(runs, method, tmp_path):
    import torch

    from dynavit.trainer.analysis.compare import method_macs
    from dynavit.trainer.model import make_heads

    run = tmp_path / method
    assert run_cli(["--shards", runs / "ds", "--out", run, "--method", method, *COMMON]) == 0
    record = metrics(run)[-1]
    assert record["method"] == method and record["k"] == 50
    name, value = record["method_param"].split()[0].split("=")
    param = int(value) if name == "r" else float(value)
    meta = build_meta_model("vit_tiny_patch16_224", num_classes=4, **MODEL_KWARGS)
    macs = method_macs(meta, method, 50, param, make_heads(meta, method, 4))
    assert abs(macs / count_macs(meta, 50) - 1) < 0.05  # within 5 % of Dyna-ViT's MACs at K=50
    budget = run_budget(run)  # the record, `flops --method all` and compare agree
    assert budget["param"] == param and budget["macs"] == macs and budget["counter"] == "dynavit.trainer.methods.macs/1"
    learned = {(e["method"], e["k"]): e for e in flops_all()["learned"]}
    assert learned[(method, 50)]["param"] == param and learned[(method, 50)]["macs"] == macs
    out = tmp_path / "table"
    assert run_cli(["compare", run, "--out", out, "--batch-size", 2, "--steps", 1, "--repeats", 1]) == 0
    row = next(csv.DictReader(open(out / "compare.csv")))
    assert row["parameter"] == budget["described"] and row["budget_source"] == "recorded"
    assert float(row["gmacs"]) == pytest.approx(macs / 1e9, rel=1e-12)
    last = torch.load(run / "last.pt", weights_only=True)
    heads = make_heads(build_meta_model("vit_tiny_patch16_224", num_classes=4, **MODEL_KWARGS), method, 4)
    assert set(last["method_state"]) == set(heads.state_dict())  # the heads are saved beside the backbone
    timm_model = __import__("timm").create_model("vit_tiny_patch16_224", num_classes=4, **MODEL_KWARGS)
    timm_model.load_state_dict(last["model"], strict=True)  # and the backbone stays plain timm
    assert run_cli(["--resume", run, "--epochs", 2]) == 0  # heads are restored on resume
    assert [m["epoch"] for m in metrics(run)] == [1, 2]


def test_compare_flags_a_method_at_its_limit(runs, tmp_path):
    """A budget the method cannot reach (EViT on 6 blocks: its only keep layer is the 4th, so
    even keep_rate 0.001 costs more than Dyna-ViT at K=50) is flagged in compare.csv,
    compare_groups.csv and compare.md, as `dynatrain flops` flags it; a matched one is not."""
    from dynavit.trainer.methods.budget import EVIT_STEP

    shallow = {**MODEL_KWARGS, "depth": 6}
    args = [a if a != json.dumps(MODEL_KWARGS) else json.dumps(shallow) for a in COMMON]
    assert run_cli(["--shards", runs / "ds", "--out", tmp_path / "evit6", "--method", "evit", *args]) == 0
    meta = build_meta_model("vit_tiny_patch16_224", num_classes=4, **shallow)
    # the reference: EViT's cheapest keep rate on this model still costs more than Dyna-ViT at K=50
    assert count_evit_macs(meta, EVIT_STEP) > count_macs(meta, 50)
    assert run_budget(tmp_path / "evit6")["at_limit"] and not run_budget(runs / "tome")["at_limit"]
    out = tmp_path / "table"
    assert run_cli(["compare", tmp_path / "evit6", runs / "tome", "--out", out, "--batch", 2, "--steps", 1,
                    "--repeats", 1]) == 0
    per_run = {r["run"]: r["at_limit"] for r in csv.DictReader(open(out / "compare.csv"))}
    assert per_run == {"evit6": "True", "tome": "False"}
    groups = {g["method"]: g["at_limit"] for g in csv.DictReader(open(out / "compare_groups.csv"))}
    assert groups == {"evit": "True", "tome": "False"}
    md = (out / "compare.md").read_text().splitlines()
    flagged = [ln for ln in md if ln.startswith("|") and "limit: cannot go lower" in ln]
    assert len(flagged) == 2 and all("evit" in ln for ln in flagged)  # its group row and its run row
    assert any(ln.startswith("limit: cannot go lower:") for ln in md)
