"""Multi-node training on one machine: torchrun 2 nodes × 1 process over a loopback c10d
rendezvous (gloo on CPU), against the 1 node × 2 processes run and against --resume.

Two torchrun agents on 127.0.0.1 behave like two nodes: each has LOCAL_RANK 0, they find each
other only through the rendezvous store, and they share --out as nodes share a filesystem.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_train import TINY, VENV_BIN, read_metrics
from loopback import serve_directory
from tiny_dataset import make_tiny_dataset

TIMEOUT_S = 150  # per launch: a hung rendezvous or collective fails the test instead of the suite


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """44 train samples in shards of 10 (uneven: 10,10,10,10,4), 8 val, 4 classes."""
    out = tmp_path_factory.mktemp("tiny") / "ds"
    make_tiny_dataset(out, splits=(("train", 44), ("val", 8)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc: torchrun starts each worker in its own
    session, so killing the agent's process group would not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(nodes: int, args: list, log_dir: Path) -> list[subprocess.CompletedProcess]:
    """`dynatrain ARGS` as 1 node × 2 processes (nodes=1) or 2 torchrun agents × 1 process
    meeting at a c10d rendezvous on 127.0.0.1 (nodes=2). Every process is killed on exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    module = ["-m", "dynavit.trainer.cli", *[str(a) for a in args]]
    torchrun = str(VENV_BIN / "torchrun")
    if nodes == 1:
        cmds = [[torchrun, "--standalone", "--nnodes", "1", "--nproc-per-node", "2", *module]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        # is_host: on one machine both agents match the endpoint's host; the first node hosts
        # the store, as with Slurm's first node.
        cmds = [[torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode-test",
                 "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=60", *module]
                for node in range(2)]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    try:
        for i, cmd in enumerate(cmds):
            log = open(log_dir / f"node{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        results = []
        for p, log, cmd in zip(procs, logs, cmds):
            log.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, log.read(), ""))
        for r in results:
            assert r.returncode == 0, "\n".join(x.stdout[-3000:] for x in results)
        return results
    finally:
        for p in procs:
            kill_tree(p)
        for log in logs:
            log.close()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        for key in ("epoch", "train_loss", "val_loss", "acc1", "lr", "steps", "steps_per_rank"):
            assert x[key] == y[key], key
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_two_nodes_match_one_node_and_resume(dataset, tmp_path):
    """Three launches (each worker spends ~10 s CPU importing timm, so no more): an uninterrupted
    2-node run; a 1-node × 2-process run stopped after epoch 1; that run resumed on 2 nodes.
    Epoch 1 of the two layouts must agree exactly, and the resumed run must end on the
    uninterrupted run's weights, which also needs the 1-node epoch-1 checkpoint to equal the
    2-node one (a resumed run starts from nothing else)."""
    common = ["--shards", dataset, "--k", 50, "--sched", "step", "--step-epochs", 1, "--gamma", 0.5,
              "--seed", 3, *TINY]
    two_nodes, resumed = tmp_path / "two_nodes", tmp_path / "resumed"

    results = launch(2, [*common, "--out", two_nodes, "--epochs", 2], tmp_path / "log_two")
    metrics = read_metrics(two_nodes)
    assert [m["epoch"] for m in metrics] == [1, 2]
    # Uneven shards (10,10,10,10,4), 44 samples: 44 // (2 ranks × 8) = 2 steps on each rank,
    # the 12-sample tail left out.
    assert all(m["steps_per_rank"] == [2, 2] for m in metrics)
    assert all(m["train_images"] == 32 and m["val_images"] == 8 for m in metrics)
    assert json.loads((two_nodes / "config.json").read_text())["run"]["world_size"] == 2
    assert sum(r.stdout.count("done: best acc1") for r in results) == 1  # global rank 0 only

    # Same seed, same world size: rank r reads the same samples in the same order whichever
    # node it runs on, and a 2-rank gloo all-reduce sums a + b in either layout, so the
    # results are bit-identical, not merely close.
    launch(1, [*common, "--out", resumed, "--epochs", 1], tmp_path / "log_one")
    (one,) = read_metrics(resumed)
    for key in ("train_loss", "val_loss", "acc1", "lr", "steps", "steps_per_rank"):
        assert one[key] == metrics[0][key], key

    # The job rescheduled onto two nodes: --resume continues to the uninterrupted run's weights.
    launch(2, ["--resume", resumed, "--epochs", 2], tmp_path / "log_resume")
    assert_same_run(two_nodes, resumed)


@pytest.mark.slow
def test_stream_over_http_two_ranks_equal_steps(dataset, tmp_path):
    """--stream in a real 2-process DDP run (torchrun, gloo), the image tars over a loopback
    http server and absent from the folder the ranks read: 5 uneven shards (10,10,10,10,4)
    give the ranks 3 and 2 whole shards, yet both take 44 // (2 × 8) = 2 steps per epoch
    (unequal steps would hang the all-reduce, and metrics record every rank's count)."""
    import shutil

    light = tmp_path / "light"
    shutil.copytree(dataset, light, ignore=shutil.ignore_patterns("images-*.tar"))

    with serve_directory(dataset) as url:
        run = tmp_path / "run"
        results = launch(1, ["--shards", light, "--images-root", url, "--stream", "--stream-buffer", 8, "--k", 50,
                             "--seed", 3, *TINY, "--workers", 1, "--epochs", 2, "--out", run], tmp_path / "log")
    metrics = read_metrics(run)
    assert [m["steps_per_rank"] for m in metrics] == [[2, 2], [2, 2]]
    assert all(m["train_images"] == 32 and m["val_images"] == 8 for m in metrics)
    assert sum(r.stdout.count("distinct classes per batch of 8") for r in results) == 2  # rank 0, each epoch
