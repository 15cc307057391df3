"""dynatrain end to end on a tiny dataset: CLI, outputs, resume, DDP, argument errors."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tiny_dataset import make_tiny_dataset

from dynavit.trainer.cli import main
from dynavit.trainer.config import ConfigError, TrainConfig
from dynavit.trainer.model import load_weights
from tiny_vits import one_thread  # noqa: F401,E402 (autouse: this module on one intra-op thread)

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS),
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3"]
METRIC_FIELDS = {"epoch", "train_loss", "val_loss", "acc1", "acc5", "epoch_seconds", "images_per_s",
                 "seq_len", "k", "eval_k", "lr", "skipped"}
# Values that must be identical between an interrupted and an uninterrupted run.
DETERMINISTIC = ("epoch", "train_loss", "val_loss", "acc1", "acc5", "lr", "seq_len", "steps")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """48 train samples in shards of 10 (uneven: 10,10,10,10,8), 16 val, 4 classes, 8×8 grid."""
    out = tmp_path_factory.mktemp("tiny") / "ds"
    make_tiny_dataset(out, splits=(("train", 48), ("val", 16)))
    return out


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_vit(num_classes=4):
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **MODEL_KWARGS)


@pytest.mark.slow
def test_smoke_two_epochs(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["--shards", dataset, "--k", 50, "--out", run, "--epochs", 2, *TINY]) == 0
    assert "done: best acc1" in capsys.readouterr().out

    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "best.pt"}
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["k"] == 50 and config["dataset"]["num_classes"] == 4
    assert {"torch", "timm", "python"} <= set(config["versions"])

    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert METRIC_FIELDS <= set(m)
        assert m["seq_len"] == 1 + 32 and m["k"] == m["eval_k"] == 50
        assert m["steps"] == 6 and m["train_images"] == 48 and m["val_images"] == 16
        assert 0 <= m["acc1"] <= m["acc5"] <= 100
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == best["best_epoch"]
    fresh = tiny_vit()
    fresh.load_state_dict(last["model"], strict=True)
    fresh.load_state_dict(best["model"], strict=True)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["per_class_acc1"]) == {f"class{i}" for i in range(4)}


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(dataset, tmp_path):
    # --step-epochs 1 decays the LR at the epoch boundary: the scheduler state must survive.
    common = ["--shards", dataset, "--k", 50, "--sched", "step", "--step-epochs", 1, "--gamma", 0.5, *TINY]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli([*common, "--out", straight, "--epochs", 2]) == 0
    assert run_cli([*common, "--out", interrupted, "--epochs", 1]) == 0
    assert run_cli(["--out", interrupted, "--resume", "--epochs", 2]) == 0  # a bare --resume: the run in --out

    a, b = read_metrics(straight), read_metrics(interrupted)
    assert len(a) == len(b) == 2
    for ma, mb in zip(a, b):
        for key in DETERMINISTIC:
            assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(interrupted / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resume_after_crash_mid_run(dataset, tmp_path, monkeypatch):
    """A cosine schedule depends on --epochs, so the realistic case: a 2-epoch run dies after
    epoch 1 and `--resume RUN` alone finishes it (also: warmup, random selection, workers)."""
    import dynavit.trainer.train as train_module

    common = ["--shards", dataset, "--k", 25, "--select", "random", "--sched", "cosine",
              "--warmup-epochs", 0.5, "--epochs", 2, *TINY, "--workers", 2]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_cli([*common, "--out", straight]) == 0

    save = train_module.save_checkpoint

    def save_then_crash(path, ckpt):
        save(path, ckpt)
        if path.name == "last.pt" and ckpt.epoch == 1:
            raise RuntimeError("simulated crash after epoch 1")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([str(a) for a in [*common, "--out", crashed]])
    monkeypatch.undo()
    assert len(read_metrics(crashed)) == 1
    assert run_cli(["--resume", crashed]) == 0

    a, b = read_metrics(straight), read_metrics(crashed)
    assert len(a) == len(b) == 2
    for ma, mb in zip(a, b):
        for key in DETERMINISTIC:
            assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(crashed / "last.pt", weights_only=True)["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ddp_two_ranks_uneven_shards(dataset, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "dynavit.trainer.cli", "--shards", str(dataset), "--k", "50", "--out", str(run),
           "--epochs", "1", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (m,) = read_metrics(run)
    # 5 shards over 2 ranks (3 vs 2 shards) but 48 // (2 × 8) = 3 steps on each rank.
    assert m["steps_per_rank"] == [3, 3]
    assert m["train_images"] == 48
    assert m["val_images"] == 16  # every val sample once, across ranks
    assert json.loads((run / "config.json").read_text())["run"]["world_size"] == 2
    assert proc.stdout.count("done: best acc1") == 1  # only rank 0 prints


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--k", 100],                                     # dense
    ["--k", 50, "--select", "random", "--eval-k", 100],
    ["--k", 25, "--select", "center"],
])
def test_selection_paths(dataset, tmp_path, args):
    run = tmp_path / "run"
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, *args, *TINY]) == 0
    (m,) = read_metrics(run)
    expected_s = {100: 65, 50: 33, 25: 17}
    assert m["seq_len"] == expected_s[m["k"]]
    assert m["eval_seq_len"] == expected_s[m["eval_k"]]


@pytest.mark.slow
def test_input_size_crop_any_k(dataset, tmp_path):
    # A 24-px crop of the 32-px images: a 6×6 window whose top-K is re-selected from
    # scores.npy, so K=70 works although only 50 and 25 were indexed.
    run = tmp_path / "run"
    kwargs = {k: v for k, v in MODEL_KWARGS.items() if k != "img_size"}
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, "--k", 70, "--image-size", 24,
                    *TINY, "--model-kwargs", json.dumps(kwargs)]) == 0
    (m,) = read_metrics(run)
    assert m["seq_len"] == 1 + 36 * 70 // 100


def test_train_subcommand_and_bf16_on_cpu(dataset, tmp_path):
    run = tmp_path / "run"
    assert run_cli(["train", "--shards", dataset, "--k", 25, "--out", run, "--epochs", 1,
                    "--amp", "bf16", "--sched", "cosine", "--warmup-epochs", 0.5, "--clip-grad", 1.0,
                    "--label-smoothing", 0.1, *TINY]) == 0
    (m,) = read_metrics(run)
    assert m["train_loss"] == m["train_loss"]  # not NaN


@pytest.mark.parametrize("case", ["no_dir", "not_dataset", "bad_k", "bad_eval_k", "bad_scorer",
                                  "bad_select", "fp16_cpu", "bad_model", "bad_kwargs", "patch_mismatch"])
def test_bad_arguments_exit_2_and_write_nothing(dataset, tmp_path, capsys, case):
    run = tmp_path / "run"
    args = {"--shards": dataset, "--k": 50, "--out": run}
    extra = []
    if case == "no_dir":
        args["--shards"] = tmp_path / "missing"
    elif case == "not_dataset":
        (tmp_path / "empty").mkdir()
        args["--shards"] = tmp_path / "empty"
    elif case == "bad_k":
        args["--k"] = 70
    elif case == "bad_eval_k":
        extra = ["--eval-k", 10]
    elif case == "bad_scorer":
        extra = ["--scorer", "sobel"]
    elif case == "bad_select":
        extra = ["--select", "best"]
    elif case == "fp16_cpu":
        extra = ["--amp", "fp16", "--device", "cpu"]
    elif case == "bad_model":
        extra = ["--model", "no_such_model"]
    elif case == "bad_kwargs":
        extra = ["--model-kwargs", "[1, 2]"]
    elif case == "patch_mismatch":
        extra = ["--model-kwargs", json.dumps({**MODEL_KWARGS, "patch_size": 8})]
    argv = [x for kv in args.items() for x in kv] + TINY + extra  # click keeps an option's last value
    capsys.readouterr()
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:"), err
    assert not run.exists()


def test_non_empty_out_refused_unless_overwrite(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    assert run_cli(["--shards", dataset, "--k", 50, "--out", run, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_resume_of_missing_run_is_an_argument_error(tmp_path, capsys):
    assert run_cli(["--resume", tmp_path / "nope"]) == 2
    assert "not a resumable run" in capsys.readouterr().err


def test_help_lists_every_option_and_subcommands(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    from dynavit.trainer.cli import cli
    options = {p.name: p.opts[0] for p in cli.commands["train"].params if not getattr(p, "hidden", False)}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options and options[f.name] in text, f.name  # --input-size is spelled --image-size
    assert "Commands:" in text and "train" in text


def test_a_batch_larger_than_the_split_names_batch_size(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["--shards", dataset, "--k", 50, "--out", run, *TINY, "--batch-size", 64]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'--batch-size'" in err and "48 usable samples" in err, err
    assert not run.exists()


def test_a_bare_resume_needs_out(capsys):
    assert run_cli(["--resume", "--epochs", 2]) == 2
    assert "a bare --resume continues the run in --out" in capsys.readouterr().err


def test_checkpoint_option_starts_from_local_weights(dataset, tmp_path, capsys):
    weights = tmp_path / "in21k-style.pth"
    torch.save(tiny_vit(num_classes=10).state_dict(), weights)
    run = tmp_path / "run"
    assert run_cli(["--shards", dataset, "--k", 50, "--out", run, "--epochs", 1, "--checkpoint", weights, *TINY]) == 0
    assert "dropped head.weight, head.bias" in capsys.readouterr().out


def test_load_weights_drops_mismatched_head(tmp_path):
    source = tiny_vit(num_classes=10)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = tiny_vit(num_classes=4)
    notes = []
    load_weights(target, str(path), notes.append)
    assert any("classifier" in n for n in notes)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.head.weight.shape == (4, 64)

    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError):
        load_weights(tiny_vit(), str(path), notes.append)
