"""`dynatrain evaluate`: a run's best.pt with the stored indices and with online scoring
(DynaViT) agree on a dataset whose stored indices are the real l2 scores of the stored
(lossless PNG) pixels; online works for a K the dataset never indexed and reads no index
arrays; bad arguments exit 2 with one line, unreadable shards exit 1."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from dynavit.manifests import IndexShard
from dynavit.pipeline.cli import main as dynaprep_main
from dynavit.trainer.cli import main
from dynavit.trainer.data import build_loader, normalize, open_dataset
from dynavit.trainer.infer.evaluate import EvaluateError, evaluate_run
from dynavit.trainer.infer.online import DynaViT
from tiny_vits import one_thread  # noqa: F401,E402 (autouse: this module on one intra-op thread)

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS),
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3"]
# 96 train / 48 val generated images, 32 px, 4 px patches (8×8 grid), l2 indices at K=50,
# stored as PNG so the stored pixels are exactly the ones dynaprep scored.
DEMO = ["index", "--data", "demo", "-o", "n_train=96", "-o", "n_val=48", "--shard-size", "32",
        "--image-size", "32", "--patch-size", "4", "--k", "50", "--scorer", "l2", "--format", "png",
        "--workers", "1", "--no-progress"]


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "demo"
    result = CliRunner().invoke(dynaprep_main, [*DEMO, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "k50"
    with pytest.raises(SystemExit) as exc:
        main(["--shards", str(dataset), "--k", "50", "--scorer", "l2", "--out", str(out), "--epochs", "1",
              *TINY])
    assert exc.value.code == 0
    return out


def boundary_disagreements(dataset) -> set[str]:
    """Keys of val samples whose online l2 K=50 set differs from the stored one (float ties
    at the K boundary are the only possible cause)."""
    info = open_dataset(dataset)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=len(info.classes), **MODEL_KWARGS)
    net = DynaViT(vit, k=50, scorer="l2", mean=info.mean, std=info.std)
    loader = build_loader(dataset, "val", k=50, scorer="l2", batch_size=64, workers=0, train=False)
    differ = set()
    for batch in loader:
        online = net.keep_indices(normalize(batch.images, info.mean, info.std))
        for key, a, b in zip(batch.keys, online, batch.keep_idx):
            if not torch.equal(a, b):
                differ.add(key)
    return differ


def test_online_equals_stored(run, dataset):
    stored = evaluate_run(run, online=False, workers=0, predictions=True)
    online = evaluate_run(run, online=True, workers=0, predictions=True)
    differ = boundary_disagreements(dataset)
    n = stored["images"]
    print(f"\nstored top-1 {stored['acc1']:.4f}%  online top-1 {online['acc1']:.4f}%  "
          f"kept sets that differ: {len(differ)}/{n}")

    assert n == online["images"] == 48 and stored["keys"] == online["keys"]
    assert stored["k"] == online["k"] == 50 and stored["kept"] == online["kept"] == 32
    assert stored["seq_len"] == online["seq_len"] == 33
    assert stored["mode"] == "stored" and online["mode"] == "online" and online["scorer"] == "l2"
    # The stored evaluation is the trainer's own: it reproduces the acc1 logged for best.pt.
    assert stored["acc1"] == pytest.approx(stored["trained_acc1"], abs=1e-9)
    # Stored indices are the real l2 top-K of the stored pixels: the online sets are the same
    # except for float ties at the K boundary, and none of this dataset's samples has one.
    assert len(differ) == 0, sorted(differ)
    assert online["y_pred"] == stored["y_pred"] and online["y_true"] == stored["y_true"]
    assert online["acc1"] == stored["acc1"] and online["acc5"] == stored["acc5"]
    assert online["loss"] == pytest.approx(stored["loss"], rel=1e-5)


def test_online_reads_no_index_arrays(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("online evaluation read an index array")

    reference = evaluate_run(run, online=True, workers=0)
    monkeypatch.setattr(IndexShard, "read", refuse)
    again = evaluate_run(run, online=True, workers=0)
    assert again["acc1"] == reference["acc1"] and again["loss"] == reference["loss"]
    with pytest.raises(Exception, match="read an index array"):
        evaluate_run(run, online=False, workers=0)


def test_online_any_k_and_scorer(run, tmp_path, capsys):
    out = tmp_path / "k25.json"
    assert run_cli(["evaluate", run, "--online", "--k", 25, "--workers", 0, "--json", out]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and line.startswith("evaluate: ") and "online l2 K=25 (S=17)" in line
    r = json.loads(out.read_text())
    assert (r["k"], r["kept"], r["seq_len"], r["run_eval_k"], r["images"]) == (25, 16, 17, 50, 48)
    assert 0 <= r["acc1"] <= r["acc5"] <= 100 and np.isfinite(r["loss"])
    assert f"top-1 {r['acc1']:.2f}%" in line

    sobel = evaluate_run(run, online=True, k=25, scorer="sobel", round_to=8, workers=0)
    assert sobel["scorer"] == "sobel" and sobel["seq_len"] == 24 and sobel["kept"] == 23
    dense = evaluate_run(run, online=True, k=100, workers=0)
    assert dense["select"] == "dense" and dense["seq_len"] == 65
    assert dense["acc1"] == evaluate_run(run, online=False, k=100, workers=0)["acc1"]


@pytest.mark.parametrize("args, hint", [
    (["--k", 25], "'--k'"),                       # not indexed: only --online can do it
    (["--k", 0], "'--k'"),
    (["--split", "nope"], "'--split'"),
    (["--round-to", 8], "'--round-to'"),          # needs --online
    (["--scorer", "sobel"], "'--scorer'"),        # no stored sobel indices
    (["--scorer", "nope", "--online"], "'--scorer'"),
    (["--shards", "{tmp}"], "'--shards'"),
    (["--device", "tpu"], "'--device'"),
])
def test_bad_arguments_exit_2_with_one_line(run, tmp_path, capsys, args, hint):
    out = tmp_path / "r.json"
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    assert run_cli(["evaluate", run, "--workers", 0, "--json", out, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and hint in lines[0], captured.err
    assert captured.out == "" and not out.exists()


def test_bad_run_directories(run, tmp_path, capsys):
    assert run_cli(["evaluate", tmp_path / "missing"]) == 2
    assert "no config.json" in capsys.readouterr().err
    no_best = tmp_path / "no-best"
    no_best.mkdir()
    shutil.copy(run / "config.json", no_best / "config.json")
    assert run_cli(["evaluate", no_best]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best.pt" in err
    with pytest.raises(EvaluateError, match="best.pt"):
        evaluate_run(no_best)
    other = tmp_path / "tome"  # a run whose tokens were reduced inside the encoder
    shutil.copytree(run, other)
    meta = json.loads((other / "config.json").read_text())
    meta["config"]["method"] = "tome"
    (other / "config.json").write_text(json.dumps(meta))
    assert run_cli(["evaluate", other]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method tome" in err


def test_unreadable_shard_exits_1(run, dataset, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = broken / "val" / "images-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    for extra in ([], ["--online"]):
        assert run_cli(["evaluate", run, "--shards", broken, "--workers", 0, *extra]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "images-000001.tar" in lines[0], lines
