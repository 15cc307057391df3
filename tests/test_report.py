"""`dynatrain report`: table values equal the metrics they came from, CSV round-trips,
plots exist, per-class metrics are right, and a real run's confusion matrix agrees with
the accuracy the trainer logged for best.pt."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from dynavit.trainer.cli import main
from dynavit.trainer.analysis.report import build_report, confusion_matrix, load_run, per_class_metrics, predict

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
PNGS = ("acc_vs_time.png", "acc_vs_k.png", "curves.png")


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def fake_run(root: Path, name: str, k: int, seq_len: int, epochs: list[dict], **config) -> Path:
    """A run directory shaped like dynatrain's (config.json + metrics.jsonl), no weights."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"k": k, "eval_k": None, "model": "vit_small_patch16_224", "scorer": "l2", "select": "saliency",
           "shards": str(root / "dataset"), **config}
    (run / "config.json").write_text(json.dumps({"config": cfg, "run": {"val_split": "val", "seq_len": seq_len}}))
    lines = []
    for i, e in enumerate(epochs, start=1):
        lines.append(json.dumps({"epoch": i, "train_loss": 2.0 / i, "val_loss": 1.5 / i, "seq_len": seq_len,
                                 "k": k, "eval_k": k, "lr": 1e-4, "skipped": 0, **e}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def ep(acc1, acc5, sec, ips):
    return {"acc1": acc1, "acc5": acc5, "epoch_seconds": sec, "images_per_s": ips}


@pytest.fixture
def sweep(tmp_path):
    runs = tmp_path / "runs"
    return [
        fake_run(runs, "k25", 25, 50, [ep(40.0, 70.0, 10.0, 300.0), ep(55.5, 80.25, 12.0, 280.0),
                                       ep(51.0, 81.0, 11.0, 290.0)]),
        fake_run(runs, "k70", 70, 138, [ep(60.0, 85.0, 30.0, 100.0), ep(66.0, 88.0, 31.0, 98.0)]),
        # a tie at the best acc1: the earliest epoch counts (as best.pt does)
        fake_run(runs, "k50", 50, 99, [ep(62.0, 86.0, 20.0, 150.0), ep(62.0, 90.0, 22.0, 140.0),
                                       ep(61.0, 91.0, 21.0, 145.0)]),
    ]


def test_speedup_from_medians_and_a_warning_on_a_large_spread(tmp_path):
    """One epoch slowed by other load (90 s among 30 s ones) moved the mean speed-up; the
    median's does not move, and the report warns about that run."""
    import statistics

    runs = tmp_path / "runs"
    dense = [ep(60.0, 85.0, s, 100.0) for s in (40.0, 41.0, 39.0)]
    noisy = [ep(55.0, 80.0, s, 300.0) for s in (10.0, 30.0, 11.0, 10.5)]
    rs = [fake_run(runs, "k100", 100, 197, dense), fake_run(runs, "k25", 25, 50, noisy)]
    result = build_report(rs, tmp_path / "report", confusion=False)
    k100, k25 = result["rows"]
    assert k25["sec_per_epoch"] == statistics.median([10.0, 30.0, 11.0, 10.5])
    assert k25["speedup"] == pytest.approx(40.0 / statistics.median([10.0, 30.0, 11.0, 10.5]))
    assert (k25["sec_per_epoch_min"], k25["sec_per_epoch_max"]) == (10.0, 30.0)
    assert k25["epoch_spread"] == pytest.approx(20.0 / 10.75)
    assert [w for w in result["warnings"] if w.startswith("k25: epoch times range 10.0–30.0 s")]
    assert not [w for w in result["warnings"] if w.startswith("k100")]


def test_sweep_table_equals_metrics(sweep, tmp_path):
    out = tmp_path / "report"
    result = build_report(sweep, out, confusion=False)
    rows = result["rows"]
    assert [r["k"] for r in rows] == [70, 50, 25]  # K descending
    assert [r["run"] for r in rows] == ["k70", "k50", "k25"]
    assert [r["seq_len"] for r in rows] == [138, 99, 50]

    k70, k50, k25 = rows
    assert (k70["best_acc1"], k70["acc5_at_best"], k70["best_epoch"]) == (66.0, 88.0, 2)
    assert (k50["best_acc1"], k50["acc5_at_best"], k50["best_epoch"]) == (62.0, 86.0, 1)
    assert (k25["best_acc1"], k25["acc5_at_best"], k25["best_epoch"]) == (55.5, 80.25, 2)
    assert k70["sec_per_epoch"] == pytest.approx(30.5) and k70["images_per_s"] == pytest.approx(99.0)
    assert k50["sec_per_epoch"] == pytest.approx(21.0) and k50["images_per_s"] == pytest.approx(145.0)
    assert k25["sec_per_epoch"] == pytest.approx(11.0) and k25["images_per_s"] == pytest.approx(290.0)
    assert [r["epochs"] for r in rows] == [2, 3, 3]
    assert k25["final_acc1"] == 51.0
    assert k70["speedup"] == pytest.approx(1.0) and k25["speedup"] == pytest.approx(30.5 / 11.0)

    # sweep.csv parses back to the same values
    with open(out / "sweep.csv", newline="") as f:
        parsed = list(csv.DictReader(f))
    assert [p["run"] for p in parsed] == ["k70", "k50", "k25"]
    for p, r in zip(parsed, rows):
        for name in ("k", "seq_len", "best_epoch", "epochs"):
            assert int(p[name]) == r[name]
        for name in ("best_acc1", "acc5_at_best", "sec_per_epoch", "images_per_s", "speedup"):
            assert float(p[name]) == r[name]
        assert p["cm_acc1"] == "" and p["model"] == "vit_small_patch16_224"

    md = (out / "sweep.md").read_text()
    assert "| 70 | 138 | 66.00 | 88.00 | 2/2 | 30.50 | 3% | 99.0 | 1.00× | k70 |" in md
    assert "| 25 | 50 | 55.50 | 80.25 | 2/3 | 11.00 | 18% | 290.0 | 2.77× | k25 |" in md
    assert result["warnings"] == []  # every spread under 25 %
    for name in PNGS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
        assert (out / name).stat().st_size > 5000
    assert not list(out.glob("confusion-*")) and not list(out.glob(".*tmp"))


def test_cli_warns_without_weights_and_rejects_bad_runs(sweep, tmp_path, capsys):
    out = tmp_path / "r"
    # confusion on by default: these runs have no best.pt, so a warning, not a failure
    assert run_cli(["report", *sweep, "--out", out]) == 0
    captured = capsys.readouterr()
    assert "best top-1 66.00% at K=70" in captured.out
    assert captured.err.count("no confusion matrix") == 3
    assert (out / "sweep.md").is_file() and all((out / n).is_file() for n in PNGS)

    bad_out = tmp_path / "bad"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["report", sweep[0], empty, "--out", bad_out]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not bad_out.exists()
    (empty / "config.json").write_text("{}")
    (empty / "metrics.jsonl").write_text("")
    assert run_cli(["report", empty, "--out", bad_out]) == 2
    assert not bad_out.exists()


def test_truncated_line_and_duplicate_names(tmp_path):
    a = fake_run(tmp_path / "a", "run", 50, 99, [ep(10.0, 20.0, 1.0, 2.0), ep(30.0, 40.0, 3.0, 4.0)])
    b = fake_run(tmp_path / "b", "run", 25, 50, [ep(5.0, 6.0, 1.0, 2.0)])
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "acc1": 99')  # cut short by a crash
    assert len(load_run(b).metrics) == 1
    result = build_report([a, b], tmp_path / "out", confusion=False)
    assert [r["run"] for r in result["rows"]] == ["a-run", "b-run"]
    assert result["rows"][1]["best_acc1"] == 5.0
    assert any("skipped 1" in w for w in result["warnings"])


def test_per_class_metrics_hand_computed():
    y_true = [0] * 6 + [1] * 6
    y_pred = [0, 0, 0, 0, 0, 1] + [0, 0, 1, 1, 1, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, [[5, 1, 0], [2, 3, 1], [0, 0, 0]])
    m = per_class_metrics(cm)
    # class 0: tp 5, predicted 7, true 6
    assert m[0]["precision"] == pytest.approx(5 / 7) and m[0]["recall"] == pytest.approx(5 / 6)
    assert m[0]["f1"] == pytest.approx(10 / 13) and (m[0]["support"], m[0]["predicted"]) == (6, 7)
    # class 1: tp 3, predicted 4, true 6
    assert m[1]["precision"] == pytest.approx(0.75) and m[1]["recall"] == pytest.approx(0.5)
    assert m[1]["f1"] == pytest.approx(0.6) and m[1]["support"] == 6
    # class 2: never true, predicted once: 0/1 precision, 0/0 recall -> 0
    assert m[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 0], 3)


@pytest.mark.slow
def test_real_run_confusion_matches_logged_accuracy(tmp_path, capsys):
    from tiny_dataset import make_tiny_dataset

    ds = tmp_path / "ds"
    make_tiny_dataset(ds, splits=(("train", 32), ("val", 12)))
    run = tmp_path / "runs" / "k50"
    assert run_cli(["--shards", ds, "--k", 50, "--out", run, "--epochs", 1, "--model", "vit_tiny_patch16_224",
                    "--model-kwargs", json.dumps(MODEL_KWARGS), "--batch-size", 8, "--workers", 0,
                    "--lr", "1e-3"]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    y_true, y_pred, classes = predict(run)
    assert classes == [f"class{i}" for i in range(4)]
    np.testing.assert_array_equal(np.sort(y_true), np.sort(np.arange(12) % 4))  # every val sample once
    assert 100.0 * (y_true == y_pred).mean() == pytest.approx(logged[0]["acc1"])

    out = tmp_path / "report"
    capsys.readouterr()
    assert run_cli(["report", run, "--out", out, "--device", "cpu"]) == 0
    for name in (*PNGS, "sweep.md", "sweep.csv", "confusion-k50.png", "per_class-k50.csv"):
        assert (out / name).stat().st_size > 100, name
    with Image.open(out / "confusion-k50.png") as im:
        assert im.format == "PNG"
    with open(out / "sweep.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["best_acc1"]) == logged[0]["acc1"] == pytest.approx(float(row["cm_acc1"]))
    assert int(row["k"]) == 50 and int(row["seq_len"]) == 1 + 32
    with open(out / "per_class-k50.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [p["class_name"] for p in per_class] == classes
    assert [int(p["support"]) for p in per_class] == [3, 3, 3, 3]
    assert sum(int(p["predicted"]) for p in per_class) == 12
    cm = confusion_matrix(y_true, y_pred, 4)
    for c, p in enumerate(per_class):
        assert float(p["recall"]) == pytest.approx(cm[c, c] / 3)


def test_missing_matplotlib_is_one_line(sweep, tmp_path, no_matplotlib, capsys):
    out = tmp_path / "r"
    assert run_cli(["report", *sweep, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "install dynavit[viz]" in err and err.strip().count("\n") == 0
    assert not out.exists()
