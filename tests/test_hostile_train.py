"""Issue 23, training: a diverged run exits 1 and keeps its last finite checkpoint; a resume
cannot change what the weights mean; a split whose shards all fail says which."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dynavit.trainer.cli import main
from dynavit.trainer.rundir import Checkpoint
from tiny_dataset import make_tiny_dataset

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS),
        "--batch-size", "8", "--workers", "0", "--k", "50", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ht") / "ds"
    make_tiny_dataset(out, splits=(("train", 32), ("val", 8)))
    return out


def run_cli(args, capsys=None):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


@pytest.fixture(scope="module")
def one_epoch_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("htrun") / "r"
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, *TINY]) == 0
    return run


def test_a_diverged_run_exits_1_and_keeps_its_last_finite_checkpoint(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    # Poison AdamW's second moments: sqrt of a negative is NaN, so the first step of epoch 2
    # makes every weight NaN and the loss of the next step is NaN, through the real loop.
    ckpt = Checkpoint.load(run / "last.pt")
    for state in ckpt.optimizer["state"].values():
        state["exp_avg_sq"].fill_(-1.0)
    ckpt.save(run / "last.pt")
    before = {name: (run / name).read_bytes() for name in ("best.pt", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert run_cli(["--resume", run, "--epochs", 3]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: the training loss is not finite (NaN or inf) in epoch 2")
    assert Checkpoint.load(run / "last.pt").epoch == 1
    assert all(torch.isfinite(v).all() for v in Checkpoint.load(run / "best.pt").model.values())
    assert {name: (run / name).read_bytes() for name in before} == before  # no NaN epoch logged or "best"


def test_resume_cannot_change_what_the_weights_mean(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    for option, value in (("--k", 25), ("--model-kwargs", json.dumps({**MODEL_KWARGS, "depth": 2})),
                          ("--select", "random")):
        capsys.readouterr()
        assert run_cli(["--resume", run, option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{option}'" in err[0] and "changes what the weights" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    assert run_cli(["--resume", run, "--epochs", 2]) == 0  # what may change still does


def test_a_split_whose_shards_all_fail_says_which(dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    for tar in (ds / "train").glob("images-*.tar"):
        tar.write_bytes(tar.read_bytes()[:700])  # truncated inside the first member
    assert list((ds / "train").glob("images-*.tar"))
    capsys.readouterr()
    code = run_cli(["--shards", ds, "--out", tmp_path / "run", "--epochs", 1, *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "split 'train'" in err[0] and "cannot be read" in err[0] and "images-" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, words", [({"depth": -1}, "cannot build"), ({"embed_dim": 4_000_000}, "parameters")])
def test_model_kwargs_that_cannot_build_a_model_are_one_line_exit_2(dataset, tmp_path, capsys, kwargs, words):
    args = [a if a != json.dumps(MODEL_KWARGS) else json.dumps({**MODEL_KWARGS, **kwargs}) for a in TINY]
    capsys.readouterr()
    code = run_cli(["--shards", dataset, "--out", tmp_path / "run", "--epochs", 1, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'--model-kwargs'" in err[0] and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_diskfull_while_writing_a_checkpoint_is_one_line_exit_1(dataset, tmp_path, capsys, monkeypatch):
    from dynavit.trainer import rundir

    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.Checkpoint, "save", full)
    capsys.readouterr()
    code = run_cli(["--shards", dataset, "--out", tmp_path / "run", "--epochs", 1, *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and "last.pt" in err[0], err


def test_a_run_stopped_before_its_first_checkpoint_says_to_overwrite(dataset, tmp_path, capsys, monkeypatch):
    from dynavit.trainer import rundir

    monkeypatch.setattr(rundir.Checkpoint, "save", lambda self, path: (_ for _ in ()).throw(OSError(28, "full")))
    run = tmp_path / "run"
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, *TINY]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert run_cli(["--resume", run]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, "--overwrite", *TINY]) == 0


class _Payload:
    """Unpickling this runs a command: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_checkpoint_is_refused_without_torch_advice_to_unpickle_it(dataset, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    capsys.readouterr()
    code = run_cli(["--shards", dataset, "--out", tmp_path / "run", "--checkpoint", tmp_path / "evil.pt", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "will not unpickle" in err[0], err
    assert "weights_only" not in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "evil.pt"), str(tmp_path), "--out", str(tmp_path / "p.csv"),
              "--model", "vit_tiny_patch16_224"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "will not unpickle" in err[0] and "weights_only" not in err[0]
    assert not marker.exists()


def test_a_nan_in_a_resumed_runs_config_json_is_refused(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    doc = json.loads((run / "config.json").read_text())
    doc["config"]["lr"] = float("nan")  # json writes NaN; a run folder from elsewhere may hold anything
    (run / "config.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert run_cli(["--resume", run, "--epochs", 2]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'--lr'" in err[0] and "nan" in err[0], err
    assert Checkpoint.load(run / "last.pt").epoch == 1
