"""Issue 15: `dynaprep index --executor ray` — same units, same bytes, bounded retries.

The Ray tests share one local Ray (num_cpus=2) started once for this module; the CLI finds it
initialised and uses it. One test runs `dynaprep` in a subprocess, which starts (and, killed,
loses) its own local Ray. Failures are injected through `ray_executor.UNIT_HOOK`, a closure
that travels with each task to the Ray worker (cloudpickle sends closures by value).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynavit.manifests import validate_dataset
from dynavit.pipeline import ray_executor
from dynavit.pipeline.cli import main
from test_index import DEMO_JOB, _tree

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='Ray is not installed (pip install "dynavit[ray]")')
DYNAPREP = str(Path(sys.executable).with_name("dynaprep"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "dynavit[ray]")')
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """DEMO_JOB written by the process pool: what every Ray run must equal byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "out"
    result = invoke(*DEMO_JOB, "--out", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    return _tree(out)


def _hook(counter_dir: str, shard: str, failures: int | None):
    """A hook that records every attempt of every unit (one byte per attempt, in a file per
    unit) and raises in `shard` on its first `failures` attempts (None: on every attempt)."""
    def hook(unit):
        import os

        path = os.path.join(counter_dir, f"{unit.split}-{unit.index:06d}")
        with open(path, "ab") as f:
            f.write(b"x")
        attempt = os.path.getsize(path)
        if f"{unit.split}/{unit.index:06d}" == shard and (failures is None or attempt <= failures):
            raise RuntimeError(f"injected failure, attempt {attempt}")
    return hook


def _attempts(counter_dir: Path) -> dict:
    return {p.name: p.stat().st_size for p in counter_dir.iterdir()}


# ------------------------------------------------------------------ without Ray

def test_ray_options_need_executor_ray(tmp_path):
    for extra in (["--ray-address", "auto"], ["--max-retries", "3"]):
        result = invoke(*DEMO_JOB, "--out", tmp_path / "out", *extra)
        assert result.exit_code == 2 and "need --executor ray" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_ray_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = invoke(*DEMO_JOB, "--out", tmp_path / "out", "--executor", "ray")
    assert result.exit_code == 2, result.output
    assert lines(result.output) == ['Error: --executor ray needs Ray, which is not installed: '
                                    'pip install "dynavit[ray]"']
    assert not (tmp_path / "out").exists()


@needs_ray
def test_ray_address_nothing_answers_at_is_one_line_exit_2(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke(*DEMO_JOB, "--out", tmp_path / "out", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert result.exit_code == 2, result.output
    (line,) = lines(result.output)
    assert line.startswith(f"Error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ on a local Ray

@needs_ray
@pytest.mark.ray
def test_ray_output_is_byte_identical_to_processes(tmp_path, local_ray, reference):
    out = tmp_path / "out"
    result = invoke(*DEMO_JOB, "--out", out, "--executor", "ray", "--progress")
    assert result.exit_code == 0, result.output
    assert _tree(out) == reference  # every tar, manifest.parquet and shards.parquet
    assert validate_dataset(out) == []
    # The same summary as the processes executor, and a bar fed by the tasks' counter actor.
    assert re.search(r"dynaprep index: 12 shards written, 0 already done \(120 ok, 0 failed, [\d.]+ img/s\)",
                     result.output), result.output
    assert "120/120" in result.output
    # A resume of a finished run submits nothing and starts no Ray task.
    again = invoke(*DEMO_JOB, "--out", out, "--executor", "ray", "--resume")
    assert again.exit_code == 0 and "0 shards written, 12 already done" in again.output


@needs_ray
@pytest.mark.ray
def test_task_failing_twice_is_retried_and_the_run_succeeds(tmp_path, local_ray, reference, monkeypatch):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setattr(ray_executor, "UNIT_HOOK", _hook(str(attempts), "train/000001", failures=2))
    out = tmp_path / "out"
    result = invoke(*DEMO_JOB, "--out", out, "--executor", "ray", "--max-retries", "2")
    assert result.exit_code == 0, result.output
    counts = _attempts(attempts)
    assert counts.pop("train-000001") == 3  # failed, failed, succeeded
    assert len(counts) == 11 and set(counts.values()) == {1}
    assert _tree(out) == reference  # the failed attempts left nothing behind
    assert not list(out.rglob("*.tmp"))


@needs_ray
@pytest.mark.ray
def test_task_failing_always_exits_1_naming_the_shard_then_resume_finishes(tmp_path, local_ray, reference,
                                                                           monkeypatch):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setattr(ray_executor, "UNIT_HOOK", _hook(str(attempts), "train/000004", failures=None))
    out = tmp_path / "out"
    result = invoke(*DEMO_JOB, "--out", out, "--executor", "ray", "--max-retries", "1")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    # Ray itself may print "(raylet) Task _task failed. There are N retries remaining ..." with
    # the worker's stack, asynchronously (deduplicated a few seconds later); ours is one line.
    (line,) = [x for x in lines(result.output) if x.startswith("Error:")]
    assert line == ("Error: shard train/000004 failed after 2 attempts: RuntimeError: injected failure, attempt 2; "
                    "the other shards were written: fix that and run again with --resume"), line
    assert _attempts(attempts)["train-000004"] == 2  # bounded: 1 + --max-retries
    parts = out / ".dynaprep" / "parts"
    assert len(list(parts.glob("*.shard.parquet"))) == 11 and not (parts / "train-000004.shard.parquet").exists()
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(ray_executor, "UNIT_HOOK", None)  # "fixed"
    resumed = invoke(*DEMO_JOB, "--out", out, "--executor", "ray", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "1 shard written, 11 already done" in resumed.output
    assert _tree(out) == reference


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@needs_ray
@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_driver_then_resume_is_byte_identical(tmp_path, local_ray):
    """SIGKILL the driver (with its own local Ray) mid-run; `--resume` finishes the job."""
    job = [*DEMO_JOB[:4], "n_train=300", *DEMO_JOB[5:]]
    ref = tmp_path / "ref"
    assert invoke(*job, "--out", ref, "--workers", "1").exit_code == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([DYNAPREP, *job, "--out", str(out), "--executor", "ray", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts, family, workers = out / ".dynaprep" / "parts", [], set()
    try:
        deadline = time.time() + 90
        while proc.poll() is None and time.time() < deadline:
            family = sorted(set(family) | set(_descendants(proc.pid)))
            workers |= {p for p in family if _cmdline(p).startswith("ray::dynaprep-unit")}
            if parts.exists() and len(list(parts.glob("*.shard.parquet"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Its Ray task workers stop with it. (Ray 2.60 leaves its dashboard and runtime-env
        # agents running after a SIGKILLed head: those are Ray's, and killed below.)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        left = [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in family:  # processes of the run this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert workers and left == [], f"Ray workers of the killed driver still alive: {left}"
    done = len(list(parts.glob("*.shard.parquet")))  # units in flight may have finished meanwhile
    assert 0 < done < 33, "kill landed outside the run; the test proves nothing"
    assert not (out / "dataset.json").exists()
    resumed = invoke(*job, "--out", out, "--executor", "ray", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"{done} already done" in resumed.output
    assert _tree(out) == _tree(ref)
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["ok"] == 300
