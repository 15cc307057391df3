"""dynatrain under faults: killed checkpoint writes, a corrupt last.pt, a torn metrics line,
a data error on a rank other than 0 under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynavit.manifests import TarWriter, iter_tar_samples
from dynavit.trainer.cli import main
from dynavit.trainer.data import build_loader
from tiny_dataset import make_tiny_dataset

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS),
        "--batch-size", "8", "--workers", "0", "--k", "50"]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "ds"
    make_tiny_dataset(out, splits=(("train", 32), ("val", 8)))
    return out


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


@pytest.fixture(scope="module")
def one_epoch_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    assert run_cli(["--shards", dataset, "--out", run, "--epochs", 1, *TINY]) == 0
    return run


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_resume_removes_temp_files_of_killed_checkpoint_writes(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "r")
    dead = run / ".last.pt.999999999.tmp"  # a writer that no longer exists
    dead.write_bytes(b"\0" * 4096)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = run / f".best.pt.{writer.pid}.tmp"  # a writer still running: not ours to delete
        live.write_bytes(b"x")
        assert run_cli(["--resume", run, "--epochs", 2]) == 0
        assert not dead.exists() and live.exists()
    finally:
        writer.kill()
        writer.wait()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_a_corrupt_last_pt_is_one_line_exit_2(one_epoch_run, tmp_path, capsys):
    run = copy_run(one_epoch_run, tmp_path / "r")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # a torn write
    capsys.readouterr()
    assert run_cli(["--resume", run, "--epochs", 2]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt" in err and "unreadable checkpoint" in err, err


def test_resume_with_a_checkpoint_of_an_unknown_version_is_refused(one_epoch_run, tmp_path, capsys):
    import torch

    run = copy_run(one_epoch_run, tmp_path / "r")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ckpt, "version": 99}, run / "last.pt")
    capsys.readouterr()
    assert run_cli(["--resume", run, "--epochs", 2]) == 2
    assert "checkpoint version 99" in capsys.readouterr().err


def test_resume_drops_a_torn_metrics_line_with_a_warning(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert run_cli(["--resume", run, "--epochs", 2]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_a_data_error_on_rank_1_reaches_the_user(dataset, tmp_path):
    # Corrupt one image that rank 1 reads in its first batch of epoch 0.
    ds = tmp_path / "ds"
    make_tiny_dataset(ds, splits=(("train", 32), ("val", 8)))
    loader = build_loader(ds, "train", k=50, batch_size=8, rank=1, world_size=2, seed=42)
    victim = loader.table.keys[int(loader.batches(0)[0][0])]
    for tar in sorted((ds / "train").glob("images-*.tar")):
        samples = list(iter_tar_samples(tar))
        if any(k == victim for k, _ in samples):
            with TarWriter(tar) as w:
                for k, members in samples:
                    w.write(k, {**members, "png": b"not a png"} if k == victim else members)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "dynavit.trainer.cli", "--shards", str(ds), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error (rank 1/2)")]
    assert len(lines) == 1 and victim in lines[0] and "images-" in lines[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_an_uninterrupted_run(dataset, tmp_path):
    import signal
    import time

    import torch

    args = ["--shards", str(dataset), "--epochs", "3", *TINY, "--workers", "2", "--select", "random"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run([str(VENV_BIN / "dynatrain"), *args, "--out", str(straight)], env=env, check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(VENV_BIN / "dynatrain"), *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "last.pt").exists():  # epoch 1 checkpointed
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, mid epoch 2
    proc.wait()
    assert len((killed / "metrics.jsonl").read_text().splitlines()) < 3
    subprocess.run([str(VENV_BIN / "dynatrain"), "--resume", str(killed)], env=env, check=True,
                   capture_output=True, timeout=300)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "last.pt", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
