"""Issue 11, pipeline side: what the fault probes found, each as a regression test.

A dead pool worker must not hang `dynaprep index`; symlink loops must not duplicate images;
unreadable folders must not lose images silently; killed writers' temp files must go; run
failures are one line, not a traceback; CIFAR meta files re-pickled by Python 3 load; empty
class folders are reported; `verify` checks labels and catches flipped bytes.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fixtures_data as fd
from dynavit.manifests import validate_dataset
from dynavit.pipeline import index as index_mod
from dynavit.pipeline import unit as unit_mod
from dynavit.pipeline.cli import main
from dynavit.pipeline.sources import SourceError, open_source
from dynavit.pipeline.sources.cifar100 import restricted_load

DYNAPREP = str(Path(sys.executable).with_name("dynaprep"))
SMALL = ["--image-size", "64", "--patch-size", "16", "--k", "50", "--format", "png", "--workers", "1",
         "--no-progress"]
DEMO = ["index", "--data", "demo", "-o", "n_train=12", "-o", "n_val=4", "--shard-size", "4", *SMALL]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows(out):
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


def tmp_files(out):
    return sorted(p.name for p in Path(out).rglob("*.tmp"))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. a dead worker

def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_worker_exits_1_naming_the_shard_then_resume_finishes(tmp_path):
    out = tmp_path / "out"
    job = [DYNAPREP, "index", "--data", "demo", "-o", "n_train=300", "-o", "n_val=20", "--shard-size", "10",
           "--image-size", "64", "--k", "50", "--workers", "2", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        parts = out / ".dynaprep" / "parts"
        workers, deadline = [], time.time() + 90
        while proc.poll() is None and time.time() < deadline:
            workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
            if len(workers) == 2 and parts.exists() and any(parts.glob("*.shard.parquet")):
                break  # both workers run and shards are being written
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) == 2, "the run ended before the kill"
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
        killed_at = time.time()
        stdout, stderr = proc.communicate(timeout=45)  # the old multiprocessing.Pool waited forever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for pid in workers:  # the hung run's workers, started by this test
                if "spawn_main" in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
    assert time.time() - killed_at < 20
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    (line,) = error_lines(stderr)
    m = re.fullmatch(rf"Error: worker process {workers[0]} was killed by SIGKILL .*(while writing shard "
                     r"(train|val)/(\d{6})|between two shards); the other workers were stopped\. Run again with "
                     r"--resume to finish", line)
    assert m, line  # (a kill can land between two shards: rare, and then no shard was cut)
    if m[2]:
        assert not (parts / f"{m[2]}-{m[3]}.shard.parquet").exists()  # that shard really was cut
    assert not (out / "dataset.json").exists()
    for pid in workers:  # the other worker was stopped, not left running
        assert "spawn_main" not in _cmdline(pid)
    done = len(list(parts.glob("*.shard.parquet")))
    assert 0 < done < 32
    resumed = subprocess.run([*job, "--resume", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} already done" in resumed.stdout
    assert validate_dataset(out) == []
    assert len(rows(out)) == 320
    assert tmp_files(out) == []  # the killed worker's temp tars are gone


def test_os_error_in_a_pool_worker_is_one_line_naming_the_shard(tmp_path):
    out = tmp_path / "out"
    job = ["index", "--data", "demo", "-o", "n_train=8", "-o", "n_val=8", "--shard-size", "4", *SMALL[:-3],
           "--no-progress", "--out", out]
    assert invoke(*job, "--workers", "1").exit_code == 0
    # Make the val shards undoable for real: their folder is now a file (mkdir fails in the worker).
    shutil.rmtree(out / "val")
    for p in (out / ".dynaprep" / "parts").glob("val-*"):
        p.unlink()
    (out / "dataset.json").unlink()
    (out / "val").write_bytes(b"in the way")
    result = invoke(*job, "--workers", "2", "--resume")
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result.output.split("dynaprep index")[0])
    assert re.fullmatch(r"Error: shard val/00000[01] failed: .*; fix that and run again with --resume", line), line
    (out / "val").unlink()
    assert invoke(*job, "--workers", "1", "--resume").exit_code == 0
    assert validate_dataset(out) == []


# ------------------------------------------------------------------ 2. symlink loops

def _tree_with_links(root: Path) -> dict:
    ds = fd.make_imagefolder(root, classes=("a", "b"), per_class=2, size=(40, 40), val_per_class=1,
                             extras=False)
    os.makedirs(root / "train" / "a" / "sub")
    fd._write(str(root / "train" / "a" / "sub" / "deep.JPEG"), fd.jpeg_bytes(np.full((40, 40, 3), 7, np.uint8)))
    os.symlink("..", root / "train" / "a" / "sub" / "loop")          # train/a/sub/loop -> train/a
    os.symlink("../../train", root / "train" / "b" / "up")           # into the split: b would list a
    os.symlink("../b/b_0.JPEG", root / "train" / "a" / "link.JPEG")  # one file, two paths
    return ds


def test_symlink_loop_lists_every_image_once(tmp_path):
    ds = _tree_with_links(tmp_path / "src")
    src = open_source("imagefolder", ds["root"])
    train = list(src.entries("train"))
    assert train == [("train/a/a_0.JPEG", 0), ("train/a/a_1.JPEG", 0), ("train/a/sub/deep.JPEG", 0),
                     ("train/b/b_0.JPEG", 1), ("train/b/b_1.JPEG", 1)]
    w = "\n".join(src.warnings())
    assert "2 symlinked folders lead to a folder listed already" in w and "train/a/sub/loop -> train/a" in w
    assert "1 symlinked files point at images listed already" in w and "train/a/link.JPEG -> train/b/b_0.JPEG" in w
    # End to end: five train rows, each image once.
    out = tmp_path / "out"
    result = invoke("index", "--data", "imagefolder", "--src", ds["root"], "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert sorted(r["source"] for r in rows(out) if r["split"] == "train") == [t[0] for t in train]
    assert "symlink loop" in result.output
    assert validate_dataset(out) == []


def test_a_class_folder_that_is_a_link_to_another_is_not_listed_twice(tmp_path):
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=2, size=(40, 40), val_per_class=0,
                             extras=False)
    os.symlink("a", tmp_path / "src" / "train" / "c")
    src = open_source("imagefolder", ds["root"])
    assert [label for _, label in src.entries("train")] == [0, 0, 1, 1]
    assert any("train/c: empty class folder" in p for p in src.problems())


# ------------------------------------------------------------------ 3. unreadable folders

@pytest.fixture()
def locked_tree(tmp_path, monkeypatch):
    """A tree where train/a/locked cannot be listed: os.scandir raises what the kernel
    returns for a chmod 000 folder (tests run as root, who could read it)."""
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=2, size=(40, 40), val_per_class=1,
                             extras=False)
    locked = tmp_path / "src" / "train" / "a" / "locked"
    fd._write(str(locked / "hidden_0.JPEG"), fd.jpeg_bytes(np.zeros((40, 40, 3), np.uint8)))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).rstrip("/") == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return ds


def test_unreadable_folder_is_a_failed_row_and_strict_fails(tmp_path, locked_tree):
    src = open_source("imagefolder", locked_tree["root"])
    entries = src.entries("train")
    assert ("train/a/locked/", 0, "unreadable folder: Permission denied") in entries
    out = tmp_path / "out"
    result = invoke("index", "--data", "imagefolder", "--src", locked_tree["root"], "--out", out, "--strict", *SMALL)
    assert result.exit_code == 1, result.output
    (row,) = [r for r in rows(out) if r["status"] == "failed"]
    assert (row["source"], row["label"], row["error"]) == ("train/a/locked/", 0, "unreadable folder: Permission denied")
    assert "--strict: 1 inputs failed" in result.output
    assert validate_dataset(out) == []


def test_unreadable_split_folder_is_one_line_exit_2(tmp_path, monkeypatch):
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a",), per_class=1, size=(40, 40), extras=False)
    val = os.path.join(ds["root"], "val")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == val:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), val)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SourceError, match=f"cannot list {val}: Permission denied"):
        open_source("imagefolder", ds["root"])
    out = tmp_path / "out"
    result = invoke("index", "--data", "imagefolder", "--src", ds["root"], "--out", out, *SMALL)
    assert result.exit_code == 2 and f"cannot list {val}: Permission denied" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()


def test_unreadable_folder_in_another_layout_is_one_line_exit_2(tmp_path, tinyimagenet_ds, monkeypatch):
    images = os.path.join(tinyimagenet_ds["root"], "train", fd.TINY_WNIDS[0], "images")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == images:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), images)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    result = invoke("index", "--data", "tinyimagenet", "--src", tinyimagenet_ds["root"], "--out", out, *SMALL)
    assert result.exit_code == 2, result.output
    assert f"cannot read the dataset: Permission denied: {images}" in result.output
    assert not out.exists()


def _drop_dac():
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for the child (PR_CAPBSET_DROP): root
    then obeys file modes like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_plain_user(cmd, **kw):
    return subprocess.run(cmd, preexec_fn=_drop_dac if os.geteuid() == 0 else None, capture_output=True,
                          text=True, **kw)


def test_chmod_000_for_real(tmp_path):
    """The same with real permissions: a child process without root's DAC override."""
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=2, size=(40, 40), val_per_class=1,
                             extras=False)
    locked = tmp_path / "src" / "train" / "a" / "locked"
    fd._write(str(locked / "hidden_0.JPEG"), fd.jpeg_bytes(np.zeros((40, 40, 3), np.uint8)))
    locked.chmod(0)
    try:
        try:
            probe = _as_plain_user([sys.executable, "-c", f"import os; os.listdir({str(locked)!r})"])
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot drop root's file-permission override here: {e}")
        if probe.returncode == 0:
            pytest.skip("the child can still list a chmod 000 folder")
        out = tmp_path / "out"
        result = _as_plain_user([DYNAPREP, "index", "--data", "imagefolder", "--src", ds["root"], "--out", str(out),
                                 "--strict", *SMALL], timeout=120)
        assert result.returncode == 1, result.stderr
        failed = [r for r in rows(out) if r["status"] == "failed"]
        assert [(r["source"], r["error"]) for r in failed] == [("train/a/locked/", "unreadable folder: Permission denied")]
        # An unreadable split folder: one line, exit 2, nothing written.
        (tmp_path / "src" / "val").chmod(0)
        result = _as_plain_user([DYNAPREP, "index", "--data", "imagefolder", "--src", ds["root"], "--out",
                                 str(tmp_path / "out2"), *SMALL], timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"cannot list {tmp_path / 'src' / 'val'}: Permission denied" in result.stderr
        assert not (tmp_path / "out2").exists()
    finally:
        locked.chmod(0o755)
        (tmp_path / "src" / "val").chmod(0o755)


# ------------------------------------------------------------------ 4. stale temp files

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_merge_manifests_and_resume_remove_temp_files_of_dead_writers_only(tmp_path):
    out = tmp_path / "out"
    assert invoke(*DEMO, "--out", out).exit_code == 0
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another rank
    try:
        dead = _dead_pid()
        stale = [out / f".manifest.parquet.{dead}.tmp", out / "train" / f".images-000001.tar.{dead}.tmp"]
        live = out / "val" / f".images-000000.tar.{writer.pid}.tmp"
        for p in (*stale, live):
            p.write_bytes(b"half written")
        result = invoke("merge-manifests", out)
        assert result.exit_code == 0, result.output
        assert tmp_files(out) == [live.name]  # its writer is alive: it may be writing it right now
        for p in stale:
            p.write_bytes(b"half written")
        assert invoke(*DEMO, "--out", out, "--resume").exit_code == 0
        assert tmp_files(out) == [live.name]
    finally:
        writer.kill()
        writer.wait()
    assert invoke("merge-manifests", out).exit_code == 0
    assert tmp_files(out) == []
    assert validate_dataset(out) == []


def test_killed_merge_manifests_leaves_nothing_after_the_next_merge(tmp_path):
    out = tmp_path / "out"
    assert invoke(*DEMO, "--out", out).exit_code == 0
    (out / "dataset.json").unlink()
    # A real merge-manifests killed while writing manifest.parquet's temp file.
    code = ("import os, signal, pyarrow.parquet as pq\n"
            "real = pq.write_table\n"
            "def write(table, where, *a, **k):\n"
            "    real(table, where, *a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "pq.write_table = write\n"
            "from dynavit.pipeline.cli import main\n"
            f"main(['merge-manifests', {str(out)!r}])\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert tmp_files(out)  # what the issue found
    assert invoke("merge-manifests", out).exit_code == 0
    assert tmp_files(out) == []
    assert validate_dataset(out) == []


# ------------------------------------------------------------------ 5. one-line errors

def test_disk_full_during_prep_is_one_line_exit_1(tmp_path, monkeypatch):
    real, calls = unit_mod.write_table_atomic, []

    def full(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # the second shard's manifest part
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(unit_mod, "write_table_atomic", full)
    out = tmp_path / "out"
    result = invoke(*DEMO, "--out", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = error_lines(result.output)
    assert re.fullmatch(r"Error: shard train/000001 failed: No space left on device \(.*train-000001\.manifest"
                        r"\.parquet\); fix that and run again with --resume", line), line
    monkeypatch.setattr(unit_mod, "write_table_atomic", real)
    assert invoke(*DEMO, "--out", out, "--resume").exit_code == 0
    assert validate_dataset(out) == [] and tmp_files(out) == []


def test_disk_full_while_merging_is_one_line_exit_1(tmp_path, monkeypatch):
    import dynavit.manifests.io as mio

    out = tmp_path / "out"
    assert invoke(*DEMO, "--out", out).exit_code == 0
    (out / "dataset.json").unlink()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "manifest.parquet"))

    monkeypatch.setattr(mio, "write_table_atomic", full)
    result = invoke("merge-manifests", out)
    assert result.exit_code == 1, result.output
    assert error_lines(result.output) == [f"Error: No space left on device: {out / 'manifest.parquet'}"]


@pytest.mark.parametrize("args,message", [
    (["--mean", "nan,nan,nan"], "finite"),
    (["--std", "inf,1,1"], "finite"),
    (["--std", "0.2,0,0.2"], "std must be positive"),
    (["--std", "-1,1,1"], "std must be positive"),
    (["--mean", "1,2"], "three comma-separated"),
])
def test_bad_mean_std_exit_2_and_create_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke(*DEMO, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
    # and the same through the API: refused before --out is touched
    cfg = index_mod.IndexConfig(data="demo", src=None, out=str(out), ks=[50], mean=(float("nan"),) * 3)
    with pytest.raises(index_mod.RunError, match="finite"):
        index_mod.run_index(cfg, open_source("demo", None, n_train=2, n_val=0), progress_bar=False)
    assert not out.exists()


def test_out_under_a_regular_file_is_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke(*DEMO, "--out", tmp_path / "afile" / "sub")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'afile'} is not a directory" in result.output
    assert "Traceback" not in result.output and (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------ 6. CIFAR meta re-pickled by Python 3

def test_cifar_meta_repickled_by_python3_loads(tmp_path):
    ds = fd.make_cifar100(tmp_path / "c", n_train=3, n_test=2)
    meta = {b"fine_label_names": [n.encode() for n in fd.CIFAR_FINE], b"coarse_label_names": [b"x"]}
    repickled = pickle.dumps(meta, protocol=2)
    assert b"_codecs\nencode" in repickled  # how Python 3 writes bytes at protocol 2
    assert restricted_load(repickled) == meta
    batch = {b"data": np.arange(3072, dtype=np.uint8)[None] % 251, b"fine_labels": [3], b"batch_label": b"b"}
    got = restricted_load(pickle.dumps(batch, protocol=2))
    assert got[b"batch_label"] == b"b" and (got[b"data"] == batch[b"data"]).all()
    with open(os.path.join(ds["root"], "meta"), "wb") as f:
        f.write(repickled)
    assert open_source("cifar100", ds["root"]).classes() == fd.CIFAR_FINE


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("evil", [
    _Reduce(__import__("codecs").encode, "abc", "rot13"),       # another codec
    _Reduce(__import__("codecs").encode, b"abc", "zlib_codec"),  # not a str
    _Reduce(__import__("codecs").decode, "x", "latin1"),         # another _codecs function
    _Reduce(os.system, "true"),
])
def test_restricted_unpickler_admits_only_latin1_encode(evil):
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        restricted_load(pickle.dumps(evil, protocol=2))


# ------------------------------------------------------------------ 7. empty class folders

def test_empty_class_folder_warns_and_strict_exits_1(tmp_path):
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=2, size=(40, 40), val_per_class=1,
                             extras=False)
    os.makedirs(tmp_path / "src" / "train" / "c")
    (tmp_path / "src" / "train" / "c" / "notes.txt").write_text("no images")
    src = open_source("imagefolder", ds["root"])
    assert src.classes() == ["a", "b", "c"]
    src.entries("train")
    assert src.problems() == ["train/c: empty class folder (no images): class 2 has no train samples"]
    assert src.problems()[0] in src.warnings()
    out = tmp_path / "out"
    result = invoke("index", "--data", "imagefolder", "--src", ds["root"], "--out", out, *SMALL)
    assert result.exit_code == 0 and "warning: train/c: empty class folder" in result.output
    strict = invoke("index", "--data", "imagefolder", "--src", ds["root"], "--out", tmp_path / "s", "--strict",
                    *SMALL)
    assert strict.exit_code == 1 and "--strict: 1 dataset problems" in strict.output, strict.output
    # non-image files alone are not a problem
    shutil.rmtree(tmp_path / "src" / "train" / "c")
    assert open_source("imagefolder", ds["root"]).problems() == []


# ------------------------------------------------------------------ 8. verify: labels, flipped bytes

def _rewrite_member(tar_path: Path, name: str, change) -> None:
    """Rewrite one member of a tar in place, same sizes (header checksum kept valid)."""
    raw = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tf:
        m = tf.getmember(name)
        data = tf.extractfile(m).read()
    new = change(data)
    assert len(new) == len(data)
    raw[m.offset_data:m.offset_data + len(new)] = new
    tar_path.write_bytes(bytes(raw))


def _jpg_dataset(tmp_path):
    ds = fd.make_imagefolder(tmp_path / "src", classes=("a", "b", "c"), per_class=3, size=(64, 64), val_per_class=0,
                             extras=False)
    out = tmp_path / "out"
    args = [a if a != "png" else "jpg" for a in SMALL]
    assert invoke("index", "--data", "imagefolder", "--src", ds["root"], "--out", out, *args).exit_code == 0
    assert validate_dataset(out) == []
    return out, out / "train" / "images-000000.tar"


def test_verify_compares_cls_with_the_manifest(tmp_path):
    out, tar = _jpg_dataset(tmp_path)
    with tarfile.open(tar) as tf:
        cls = [m.name for m in tf.getmembers() if m.name.endswith(".cls")]
        key = cls[0].split(".")[0]
        label = int(tf.extractfile(cls[0]).read())
    _rewrite_member(tar, cls[0], lambda b: str((label + 1) % 3).encode())
    found = [str(v) for v in validate_dataset(out, check_checksums=False)]
    assert found == [f"train/images-000000.tar: sample {key!r}: .cls says {(label + 1) % 3}, "
                     f"manifest.parquet says label {label}"]
    result = invoke("verify", out, "--no-checksums")
    assert result.exit_code == 1 and key in result.output


def test_verify_catches_a_jpeg_with_flipped_bytes_by_checksum(tmp_path):
    out, tar = _jpg_dataset(tmp_path)
    with tarfile.open(tar) as tf:
        jpg = next(m.name for m in tf.getmembers() if m.name.endswith(".jpg"))

    def flip(b):
        mid = len(b) // 2
        return b[:mid] + bytes(x ^ 0xFF for x in b[mid:mid + 16]) + b[mid + 16:]

    _rewrite_member(tar, jpg, flip)
    found = [str(v) for v in validate_dataset(out)]
    assert len(found) == 1 and found[0].startswith("train/images-000000.tar: checksum mismatch")
    assert invoke("verify", out).exit_code == 1
    # Without checksums the tar is still well-formed: verify does not decode images.
    assert validate_dataset(out, check_checksums=False) == []


def test_flipped_bytes_in_a_source_jpeg_may_decode(tmp_path):
    """Documents the limit: a source JPEG with bytes flipped mid-stream often still decodes
    (to wrong pixels) and becomes an ok row; only some flips break the entropy-coded stream
    badly enough for PIL to raise (then it is a failed row). The manifest's sha256 is of the
    bytes as read, so nothing downstream can tell either."""
    from dynavit.pipeline.decode import DecodeError, load_image

    good = fd.jpeg_bytes(fd._pattern(1, (64, 64)))
    ref = load_image(good, 64, "squash", 1.0, 16).rgb
    outcomes = []
    for frac, n in ((0.5, 8), (0.5, 64), (0.8, 1), (0.8, 8), (0.3, 8)):
        at = int(len(good) * frac)
        bad = good[:at] + bytes(x ^ 0x55 for x in good[at:at + n]) + good[at + n:]
        try:
            rgb = load_image(bad, 64, "squash", 1.0, 16).rgb
            outcomes.append("garbage" if not np.array_equal(rgb, ref) else "same")
        except DecodeError as e:
            outcomes.append(f"failed: {e}")
    assert any(o.startswith("failed: truncated or corrupt image") for o in outcomes), outcomes
    assert "garbage" in outcomes, outcomes  # silently wrong pixels: not detectable without the original


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killing_the_main_process_stops_its_workers(tmp_path):
    """kill -9 of dynaprep itself: its workers notice they lost their parent and exit (they
    used to index on forever, re-parented to init), and the resource tracker follows."""
    out = tmp_path / "out"
    job = [DYNAPREP, "index", "--data", "demo", "-o", "n_train=2000", "-o", "n_val=20", "--shard-size", "10",
           "--image-size", "64", "--k", "50", "--workers", "2", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(job, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.time() + 90
        while proc.poll() is None and time.time() < deadline:
            children = _children(proc.pid)
            workers = [c for c in children if "spawn_main" in _cmdline(c)]
            if len(workers) == 2 and (out / ".dynaprep" / "parts").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) == 2, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_cmdline(c) for c in children):
            time.sleep(0.2)
        left = [c for c in children if _cmdline(c)]
    finally:
        for pid in children:  # started by this test: never left behind, whatever happened
            if _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert left == [], [_cmdline(c) for c in left]
