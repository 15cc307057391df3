"""Issue 23: hostile or broken inputs must not run commands, hang, exhaust memory or give
wrong results that exit 0.

- A dataset folder is data: a `pipe:` command or URL that shards.parquet / dataset.json
  names is never run without --trust-dataset-urls (verify, show, train); a path that leaves
  the folder is refused; a user's tar member named `../x` or `/x` is a failed row, never a
  member of our index tars.
- Special files: a FIFO named `.jpg` and a `.jpg` symlink to /dev/zero or /dev/urandom are
  failed rows (index, predict), real ones, in a subprocess with a timeout and a memory limit
  so that a regression fails instead of hanging the suite or the machine.
- Duplicate keys in a user's tar: every copy is a failed row; never one copy's image with
  another's label.
"""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from dynavit.manifests.inputs import InputFileError, read_regular
from dynavit.pipeline.cli import main as dynaprep_main

SIZE, PATCH = 32, 8
COMMON = ["--image-size", SIZE, "--patch-size", PATCH, "--k", "50", "--no-progress", "--workers", 1]
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
        json.dumps({"img_size": SIZE, "patch_size": PATCH, "embed_dim": 32, "depth": 1, "num_heads": 2}),
        "--batch-size", "2", "--workers", "0", "--epochs", "1", "--device", "cpu"]
BIN = Path(sys.executable).parent
MEMORY_LIMIT = 6 << 30  # address space of a child: a /dev/zero read fails fast instead of the OOM killer


def jpeg(seed: int, size=(40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return Path(path)


def dynaprep(*args):
    return CliRunner().invoke(dynaprep_main, [str(a) for a in args], catch_exceptions=False)


def dynatrain(*args):
    from dynavit.trainer.cli import cli

    return CliRunner().invoke(cli, ["train", *[str(a) for a in args]], catch_exceptions=False)


def run_limited(cmd, timeout=180):
    """A CLI in a child process with a timeout and an address-space cap."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})


def manifest(out) -> list[dict]:
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def wds_dataset(tmp_path_factory):
    """A user's tar (6 labelled samples in 2 classes) indexed in place."""
    root = tmp_path_factory.mktemp("hostile")
    tars = root / "tars"
    tars.mkdir()
    members = []
    for i in range(6):
        members += [(f"s{i}.jpg", jpeg(i)), (f"s{i}.cls", str(i % 2).encode())]
    write_tar(tars / "00000.tar", members)
    out = root / "ds"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tars / '00000.tar'}", "--src",
                      f"val={tars / '00000.tar'}", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    return out, tars


def _copy(ds, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy)
    return copy


def _rewrite_shards(ds: Path, change) -> None:
    table = pq.read_table(ds / "shards.parquet")
    rows = table.to_pylist()
    for row in rows:
        change(row)
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), ds / "shards.parquet")


# --- 1. a dataset folder must not run commands ---------------------------------------------------

@pytest.mark.parametrize("where", ["shards.parquet", "dataset.json"])
def test_dataset_folder_cannot_run_a_command(wds_dataset, tmp_path, monkeypatch, where):
    ds, tars = wds_dataset
    copy = _copy(ds, tmp_path)
    marker = tmp_path / "PWNED"
    if where == "shards.parquet":
        def change(row):
            row["images"] = f"pipe:touch {marker}; cat {tars / '00000.tar'}"
        _rewrite_shards(copy, change)
    else:
        info = json.loads((copy / "dataset.json").read_text())
        info["images_root"] = f"pipe:touch {marker}; cat {tars}"
        (copy / "dataset.json").write_text(json.dumps(info))
    monkeypatch.setenv("DYNAVIT_CACHE", str(tmp_path / "cache"))

    verify = dynaprep("verify", copy, "--no-checksums")
    assert verify.exit_code == 1 and "--trust-dataset-urls" in verify.output, verify.output
    show = dynaprep("show", copy, "--out", tmp_path / "show.png", "--split", "train")
    assert show.exit_code != 0 and "--trust-dataset-urls" in show.output, show.output
    train = dynatrain("--shards", copy, "--k", 50, "--out", tmp_path / "run", *TINY)
    assert train.exit_code != 0 and "--trust-dataset-urls" in str(train.output) + str(train.exception)
    assert not marker.exists()
    assert not (tmp_path / "show.png").exists()

    # The control: with the opt-in, the command is what runs (so the refusal above is what stopped it).
    trusted = dynaprep("verify", copy, "--no-checksums", "--trust-dataset-urls")
    assert marker.exists(), trusted.output


@pytest.mark.parametrize("field, value", [("index", "../elsewhere.tar"), ("index", "/etc/passwd"),
                                          ("images", "../../../etc/passwd")])
def test_shard_paths_outside_their_folder_are_refused(wds_dataset, tmp_path, field, value):
    ds, tars = wds_dataset
    copy = _copy(ds, tmp_path)
    shutil.copy(next(copy.rglob("topk-*.tar")), tmp_path / "elsewhere.tar")  # a real shard, outside

    def change(row):
        if field == "index":
            row["index"] = [{**e, "path": value} for e in row["index"]]
        else:
            row["images"] = value  # the user's tar, relative to its images root
    _rewrite_shards(copy, change)
    verify = dynaprep("verify", copy, "--no-checksums")
    assert verify.exit_code == 1
    assert f"{value!r}, which is outside" in verify.output, verify.output
    train = dynatrain("--shards", copy, "--k", 50, "--out", tmp_path / "run", *TINY)
    assert train.exit_code != 0 and f"{value!r}, which is outside" in str(train.output) + str(train.exception)
    assert not (tmp_path / "run").exists()


def test_tar_member_names_that_leave_the_folder_are_failed_rows(tmp_path):
    members = []
    for i, key in enumerate(["ok0", "../evil", "ok1", "sub/../../evil2", "/abs/evil3", "ok2"]):
        members += [(f"{key}.jpg", jpeg(i)), (f"{key}.cls", b"0")]
    tar = write_tar(tmp_path / "bad.tar", members)
    out = tmp_path / "out"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in manifest(out)}
    names = [n for t in out.rglob("topk-*.tar") for n in tarfile.open(t).getnames()]
    assert names and all(".." not in n.split("/") and not n.startswith("/") for n in names)
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"ok0", "ok1", "ok2"}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 3 and all("unsafe member name" in r["error"] for r in failed)


# --- 2. special files -------------------------------------------------------------------------

def _special_folder(root: Path) -> Path:
    """imagefolder layout: two real JPEGs per class, plus a FIFO, links to /dev/zero and
    /dev/urandom, and a file over a 5000-byte cap, all named .jpg."""
    src = root / "src"
    for c in ("a", "b"):
        (src / "train" / c).mkdir(parents=True)
        for i in range(2):
            (src / "train" / c / f"{i}.jpg").write_bytes(jpeg(i + (10 if c == "b" else 0)))
    os.mkfifo(src / "train" / "a" / "fifo.jpg")
    os.symlink("/dev/zero", src / "train" / "a" / "zero.jpg")
    os.symlink("/dev/urandom", src / "train" / "b" / "random.jpg")
    (src / "train" / "b" / "big.jpg").write_bytes(jpeg(99, size=(400, 400)) + bytes(6000))
    return src


def test_read_regular_refuses_special_files_and_caps_size(tmp_path):
    src = _special_folder(tmp_path)
    with pytest.raises(InputFileError, match="FIFO"):
        read_regular(src / "train" / "a" / "fifo.jpg")
    with pytest.raises(InputFileError, match="character device"):
        read_regular(src / "train" / "a" / "zero.jpg")
    with pytest.raises(InputFileError, match="cap"):
        read_regular(src / "train" / "b" / "big.jpg", limit=5000)
    data = (src / "train" / "a" / "0.jpg").read_bytes()
    assert read_regular(src / "train" / "a" / "0.jpg") == data


def test_index_fails_special_files_as_rows_without_hanging(tmp_path):
    src = _special_folder(tmp_path)
    out = tmp_path / "out"
    proc = run_limited([BIN / "dynaprep", "index", "--data", "imagefolder", "--src", src, "--out", out,
                        "--max-file-bytes", 5000, *COMMON])
    assert proc.returncode == 0, proc.stderr
    failed = sorted(r["error"] for r in manifest(out) if r["status"] == "failed")
    assert len(failed) == 4, failed
    assert sum("FIFO" in e for e in failed) == 1
    assert sum("character device" in e for e in failed) == 2
    assert sum("cap (--max-file-bytes)" in e for e in failed) == 1
    assert sum(r["status"] == "ok" for r in manifest(out)) == 4


def test_predict_fails_special_files_as_rows_without_hanging(tmp_path):
    import timm
    import torch

    src = _special_folder(tmp_path)
    kwargs = {"img_size": SIZE, "patch_size": PATCH, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 2}
    torch.save(timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "preds.csv"
    # A folder lists regular files and links; the FIFO is read only when named on its own.
    proc = run_limited([BIN / "dynatrain", "predict", tmp_path / "w.pt", src, src / "train" / "a" / "fifo.jpg",
                        "--out", out, "--model",
                        "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--device", "cpu",
                        "--max-file-bytes", 5000, "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = {Path(r["path"]).parent.name + "/" + Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert len(rows) == 8
    assert "FIFO" in rows["a/fifo.jpg"]["error"] and rows["a/fifo.jpg"]["status"] == "failed"
    assert "character device" in rows["a/zero.jpg"]["error"] and "character device" in rows["b/random.jpg"]["error"]
    assert "cap" in rows["b/big.jpg"]["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 4


# --- 3. duplicate keys in a user's tar ------------------------------------------------------------------------

def test_duplicate_keys_are_failed_rows_for_every_copy(tmp_path):
    members = []
    for i, (key, label) in enumerate([("a", 0), ("b", 1), ("c", 1), ("a", 1), ("d", 0), ("e", 1)]):
        members += [(f"{key}.jpg", jpeg(i)), (f"{key}.cls", str(label).encode())]
    tar = write_tar(tmp_path / "dup.tar", members)
    out = tmp_path / "out"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "--src", f"val={tar}", "--out", out,
                      *COMMON)
    assert result.exit_code == 0, result.output
    rows = [r for r in manifest(out) if r["split"] == "train"]
    assert [(r["key"], r["status"]) for r in rows] == [("a", "failed"), ("b", "ok"), ("c", "ok"), ("a", "failed"),
                                                        ("d", "ok"), ("e", "ok")]
    assert dynaprep("verify", out).exit_code == 0
    # What the trainer reads for each key is that key's own image and label (webdataset as reference).
    from dynavit.manifests import read_dataset_info
    from dynavit.manifests.samples import build_table

    table = build_table(out, read_dataset_info(out), "train", read_dataset_info(out).scorers[0])
    assert table.keys == ["b", "c", "d", "e"]
    data = tar.read_bytes()
    reference = {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False)}
    for i, key in enumerate(table.keys):
        assert data[table.offset[i]:table.offset[i] + table.size[i]] == reference[key]["jpg"]
        assert table.label[i] == int(reference[key]["cls"])


def test_class_numbers_and_names_mixed_in_one_label_field_is_one_line_exit_1(tmp_path):
    members = []
    for i, label in enumerate([0, "cat", 1, "dog", 0, 1]):
        members += [(f"s{i}.jpg", jpeg(i)), (f"s{i}.json", json.dumps({"label": label}).encode())]
    tar = write_tar(tmp_path / "mixed.tar", members)
    out = tmp_path / "out"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "-o", "label=json:label", "--out", out,
                      *COMMON)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: the labels mix class numbers and class names (e.g. 0 and 'cat')")
    assert "classes_file" in lines[-1]
    assert not (out / "dataset.json").exists()
    # With a class list, the same tar indexes: numbers are indices, names are looked up.
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ok = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "-o", "label=json:label", "-o",
                  f"classes_file={tmp_path / 'classes.txt'}", "--out", tmp_path / "ok", *COMMON)
    assert ok.exit_code == 0, ok.output
    assert [r["label"] for r in manifest(tmp_path / "ok")] == [0, 0, 1, 1, 0, 1]


@pytest.mark.parametrize("label", [3_000_000_000, 2 ** 62])
def test_a_huge_class_number_is_a_failed_row(tmp_path, label):
    members = []
    for i, value in enumerate([0, 1, label, 1]):
        members += [(f"s{i}.jpg", jpeg(i)), (f"s{i}.cls", str(value).encode())]
    tar = write_tar(tmp_path / "huge.tar", members)
    out = tmp_path / "out"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    rows = manifest(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert f"label {label} is not below" in rows[2]["error"]
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["0", "1"]


# --- truncated and stalled http downloads (a real loopback server) -----------------------------

class _Server:
    """A loopback http server for one tar: `mode` "truncate" sends half the body with the
    whole Content-Length then closes, `truncate_once` does so on the first request only,
    "stall" sends half then waits; ranges are not supported (a retry gets the whole body)."""

    def __init__(self, data: bytes, mode: str):
        import http.server
        import threading

        self.data, self.mode, self.requests, self.release = data, mode, 0, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                whole = server.mode == "whole" or (server.mode == "truncate_once" and server.requests > 1)
                self.wfile.write(server.data if whole else server.data[:len(server.data) // 2])
                self.wfile.flush()
                if server.mode == "stall":
                    server.release.wait(30)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/00000.tar"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _tar_bytes(tmp_path, n=8) -> bytes:
    members = []
    for i in range(n):
        members += [(f"s{i}.jpg", jpeg(i)), (f"s{i}.cls", str(i % 2).encode())]
    return write_tar(tmp_path / "src.tar", members).read_bytes()


@pytest.mark.parametrize("mode", ["truncate", "truncate_once", "stall"])
def test_a_short_http_download_is_retried_then_fails_the_unit(tmp_path, monkeypatch, mode):
    from dynavit.manifests import locations

    monkeypatch.setattr(locations, "HTTP_TIMEOUT", 2.0)
    server = _Server(_tar_bytes(tmp_path), mode)
    out = tmp_path / "out"
    try:
        result = dynaprep("index", "--data", "wds", "--src", f"train={server.url}", "--out", out, *COMMON)
    finally:
        server.stop()
    if mode == "truncate_once":  # the retry got the whole tar: every sample, the right hash
        assert result.exit_code == 0, result.output
        assert server.requests == 2
        assert [r["status"] for r in manifest(out)] == ["ok"] * 8
        row = pq.read_table(out / "shards.parquet").to_pylist()[0]
        import hashlib

        assert row["images_sha256"] == hashlib.sha256(server.data).hexdigest()
        return
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert server.url in last
    if mode == "truncate":
        assert server.requests == 1 + locations.HTTP_RETRIES
        assert f"sent {len(server.data) // 2} of {len(server.data)} bytes" in last and "truncated" in last
    else:
        assert "no data for 2 s" in last and "stalled" in last
    assert not (out / "dataset.json").exists()


def test_a_gif_in_a_users_tar_is_an_image_as_in_folders_and_predict(tmp_path):
    gif = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(gif, "GIF")
    members = [("g0.gif", gif.getvalue()), ("g0.cls", b"0")]
    for i in range(1, 4):
        members += [(f"s{i}.jpg", jpeg(i)), (f"s{i}.cls", str(i % 2).encode())]
    tar = write_tar(tmp_path / "gif.tar", members)
    out = tmp_path / "out"
    result = dynaprep("index", "--data", "wds", "--src", f"train={tar}", "--out", out, *COMMON)
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in manifest(out)] == ["ok"] * 4
    from dynavit.manifests import read_dataset_info
    from dynavit.manifests.samples import build_table

    table = build_table(out, read_dataset_info(out), "train", read_dataset_info(out).scorers[0])
    data = tar.read_bytes()
    assert data[table.offset[0]:table.offset[0] + table.size[0]] == gif.getvalue()
    assert dynaprep("verify", out).exit_code == 0


def test_a_fifo_where_a_dataset_shard_belongs_does_not_block(wds_dataset, tmp_path):
    """An index shard replaced by a FIFO (a hostile or broken dataset folder): verify and
    training answer at once (a child with a timeout: a regression cannot hang the suite)."""
    ds, _ = wds_dataset
    copy = _copy(ds, tmp_path)
    shard = next(copy.rglob("topk-*.tar"))
    shard.unlink()
    os.mkfifo(shard)
    verify = run_limited([BIN / "dynaprep", "verify", copy, "--no-checksums"], timeout=60)
    assert verify.returncode == 1 and shard.name in verify.stdout
    train = run_limited([BIN / "dynatrain", "--shards", copy, "--k", 50, "--out", tmp_path / "run", *TINY], timeout=120)
    err = train.stderr.strip().splitlines()
    assert train.returncode in (1, 2) and len(err) == 1 and "FIFO" in err[0], train.stderr


def test_a_cached_remote_tar_whose_bytes_changed_is_fetched_again(tmp_path):
    import hashlib

    from dynavit.manifests import locations

    server = _Server(_tar_bytes(tmp_path, n=2), "whole")
    try:
        expect = (hashlib.sha256(server.data).hexdigest(), len(server.data))
        path = Path(locations.fetch(server.url, expect, cache_dir=tmp_path / "cache"))
        assert path.read_bytes() == server.data and server.requests == 1
        assert locations.fetch(server.url, expect, cache_dir=tmp_path / "cache") == str(path)
        assert server.requests == 1  # an intact copy is reused
        damaged = bytearray(server.data)
        damaged[1000] ^= 0xFF  # same size, other bytes
        path.write_bytes(bytes(damaged))
        assert Path(locations.fetch(server.url, expect, cache_dir=tmp_path / "cache")).read_bytes() == server.data
        assert server.requests == 2
    finally:
        server.stop()


def test_a_fifo_as_a_datasets_own_list_file_is_one_line_exit_2(wds_dataset, tmp_path):
    _, tars = wds_dataset
    os.mkfifo(tmp_path / "classes.txt")
    proc = run_limited([BIN / "dynaprep", "index", "--data", "wds", "--src", f"train={tars / '00000.tar'}",
                        "-o", f"classes_file={tmp_path / 'classes.txt'}", "--out", tmp_path / "out", *COMMON],
                       timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "FIFO" in err[0], proc.stderr
    assert not (tmp_path / "out").exists()
