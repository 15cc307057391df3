"""Image offsets in manifest.parquet (issue 25): written by dynaprep, read by the loader
instead of a header scan, checked by verify and on every read.

References are independent of the code under test: `tarfile`'s own member offsets,
`webdataset`'s bytes for a key, pyarrow for the manifest, and call counts of `os.pread`
and of the header scanner.
"""
from __future__ import annotations

import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

from dynavit.manifests import io as mio
from dynavit.manifests import samples as msamples
from dynavit.manifests import shards as mshards
from dynavit.manifests import validate_dataset
from dynavit.manifests.schema import MANIFEST_SCHEMA
from dynavit.pipeline.cli import main as dynaprep_main
from dynavit.trainer.data import DataError, build_loader
from tiny_dataset import make_tiny_dataset


def tar_offsets(path) -> dict:
    """key -> (data offset, size) of its png/jpg member, as tarfile finds it."""
    with tarfile.open(path) as tf:
        return {m.name.partition(".")[0]: (m.offset_data, m.size) for m in tf.getmembers()
                if m.name.endswith((".png", ".jpg"))}


def count_calls(monkeypatch, module, name) -> dict:
    calls = {"n": 0}
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# --- the loader's start ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """The same 3 shards of train, with 10 and with 100 samples per shard."""
    out = {}
    for per in (10, 100):
        out[per] = tmp_path_factory.mktemp(f"per{per}")
        make_tiny_dataset(out[per], splits=(("train", 3 * per), ("val", 4)), shard_size=per, image_size=16)
    return out


def test_loader_start_reads_nothing_per_sample(two_sizes, monkeypatch):
    """Building the loader costs the same reads with 30 and with 300 samples (per shard, not
    per sample), and never calls the header scanner. The scan-based start did 2 preads per
    sample: 60 vs 600."""
    preads, scans = {}, {}
    for per, ds in two_sizes.items():
        mio._read_table_cached.cache_clear()
        p = count_calls(monkeypatch, os, "pread")
        s = count_calls(monkeypatch, mshards, "scan_members")
        loader = build_loader(ds, "train", k=50, batch_size=4, train=False)
        preads[per], scans[per] = p["n"], s["n"]
        monkeypatch.undo()
        assert len(loader.table) == 3 * per
    assert scans == {10: 0, 100: 0}
    assert preads[10] == preads[100] <= 3 * 8  # a handful per shard: the last header + the index layout


def test_recorded_offsets_equal_tarfile_and_the_bytes_are_webdatasets(two_sizes):
    ds = two_sizes[10]
    table = build_loader(ds, "train", k=50, batch_size=4, train=False).table
    for s, shard in enumerate(table.shards):
        want = tar_offsets(shard.images)
        raw = {x["__key__"]: x["png"] for x in wds.WebDataset(shard.images, shardshuffle=False)}
        data = open(shard.images, "rb").read()
        mine = np.flatnonzero(table.shard == s)
        assert len(mine) == len(want) == 10
        for i in mine:
            key, off, size = table.keys[i], int(table.offset[i]), int(table.size[i])
            assert (off, size) == want[key]
            assert data[off:off + size] == raw[key]


def test_manifest_and_shards_are_read_once_per_process(two_sizes, monkeypatch):
    """A training run builds a train and a val loader (and checks labels on the manifest):
    each parquet file is read from disk once."""
    mio._read_table_cached.cache_clear()
    reads = count_calls(monkeypatch, mio.pq, "read_table")
    for split, train in (("train", True), ("val", False)):
        build_loader(two_sizes[10], split, k=50, batch_size=4, train=train)
    mio.read_manifest(two_sizes[10])
    assert reads["n"] == 2


def test_a_rewritten_manifest_is_read_again(tmp_path):
    make_tiny_dataset(tmp_path, image_size=16)
    first = mio.read_manifest(tmp_path)
    table = first.slice(0, 5)
    pq.write_table(table, tmp_path / "manifest.parquet")
    assert mio.read_manifest(tmp_path).num_rows == 5 != first.num_rows


# --- older datasets and changed shards ---------------------------------------------------------

def test_an_old_dataset_without_offsets_scans_with_a_notice_and_reads_the_same(tmp_path, caplog):
    new, old = tmp_path / "new", tmp_path / "old"
    make_tiny_dataset(new, image_size=16)
    make_tiny_dataset(old, image_size=16, offsets=False)
    assert "image_offset" not in pq.read_schema(old / "manifest.parquet").names
    assert mio.read_manifest(old)["image_offset"].null_count == mio.read_manifest(old).num_rows
    with caplog.at_level(logging.WARNING):
        loader = build_loader(old, "train", k=50, batch_size=4)
    notices = [r.getMessage() for r in caplog.records if "notice" in r.getMessage()]
    assert len(notices) == 1 and "older dynaprep" in notices[0] and "\n" not in notices[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reference = build_loader(new, "train", k=50, batch_size=4)
    assert not caplog.records
    assert np.array_equal(loader.table.offset, reference.table.offset)
    for a, b in zip(loader, reference):
        assert a.keys == b.keys and torch_equal(a.images, b.images) and torch_equal(a.keep_idx, b.keep_idx)
    assert validate_dataset(old) == []


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_an_old_dataset_still_trains(tmp_path, caplog):
    import json

    import torch

    from dynavit.trainer.cli import main as train_main

    make_tiny_dataset(tmp_path / "old", offsets=False)
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exc, caplog.at_level(logging.WARNING):
            train_main(["train", "--shards", str(tmp_path / "old"), "--k", "50", "--out", str(tmp_path / "run"),
                        "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs),
                        "--batch-size", "8", "--workers", "0", "--epochs", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    assert exc.value.code == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    notices = [r.getMessage() for r in caplog.records if "notice" in r.getMessage()]
    assert len(notices) == 1 and "older dynaprep" in notices[0]  # one line for the run, not per loader


def test_a_shard_whose_samples_moved_is_scanned_and_still_read(tmp_path, caplog):
    """A shard rewritten after indexing with one image longer: every later sample moved. The
    last-header check notices, the shard is scanned (as before offsets existed) and read
    right; verify names the moved samples."""
    make_tiny_dataset(tmp_path, image_size=16)
    path = tmp_path / "train/images-000000.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == "0000000003.png":
                data += b"\0" * 2000  # trailing bytes after IEND: PIL still decodes it
            m.size = len(data)
            tf.addfile(m, __import__("io").BytesIO(data))
    with caplog.at_level(logging.WARNING):
        loader = build_loader(tmp_path, "train", k=50, batch_size=4, train=False)
    assert any("changed since indexing" in r.getMessage() for r in caplog.records)
    want = tar_offsets(path)
    got = {loader.table.keys[i]: (int(loader.table.offset[i]), int(loader.table.size[i]))
           for i in np.flatnonzero(loader.table.shard == 0)}
    assert got == want
    assert sum(len(b) for b in loader) == 24
    problems = [v.message for v in validate_dataset(tmp_path, check_checksums=False)]
    assert any("'0000000009': manifest.parquet records its image at offset" in p for p in problems)


def test_a_member_changed_in_place_is_caught_when_read(tmp_path):
    """The last sample is where it was, so no scan; sample 3's header now names another key:
    reading it is a one-line DataError naming the shard, the key and the offset; with
    skip_bad_samples only that sample is left out."""
    make_tiny_dataset(tmp_path, image_size=16)
    path = tmp_path / "val/images-000000.tar"
    offset = tar_offsets(path)["0000000003"][0]
    data = bytearray(path.read_bytes())
    header = bytearray(data[offset - 512:offset])
    header[:14] = b"0000000077.png"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[offset - 512:offset] = header
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        list(build_loader(tmp_path, "val", k=50, batch_size=4, train=False))
    msg = str(e.value)
    assert "images-000000.tar" in msg and "'0000000003'" in msg and "0000000077.png" in msg \
        and str(offset) in msg and "\n" not in msg
    loader = build_loader(tmp_path, "val", k=50, batch_size=4, train=False, skip_bad_samples=True)
    assert sum(len(b) for b in loader) == 11 and loader.skipped == 1


def test_verify_checks_recorded_offsets(tmp_path):
    make_tiny_dataset(tmp_path, image_size=16)
    assert validate_dataset(tmp_path) == []
    table = pq.read_table(tmp_path / "manifest.parquet")
    offsets = table["image_offset"].to_pylist()
    offsets[2] += 512
    table = table.set_column(MANIFEST_SCHEMA.get_field_index("image_offset"), MANIFEST_SCHEMA.field("image_offset"),
                             pa.array(offsets, pa.int64()))
    pq.write_table(table, tmp_path / "manifest.parquet")
    problems = [str(v) for v in validate_dataset(tmp_path)]
    assert len(problems) == 1 and "'0000000002': manifest.parquet records its image at offset" in problems[0]


# --- dynaprep writes them ----------------------------------------------------------------------

def test_dynaprep_offsets_are_those_of_the_joined_tar(tmp_path):
    """One unit cut into pieces written by 2 workers: the offsets are those of the joined
    tar (tarfile's), and manifest.parquet is byte-identical to one worker's."""
    job = ["index", "--data", "demo", "-o", "n_train=64", "-o", "n_val=4", "--shard-size", "64",
           "--image-size", "32", "--patch-size", "16", "--k", "50", "--scorer", "l2", "--no-progress"]
    for workers in (1, 2):
        result = CliRunner().invoke(dynaprep_main, [*job, "--out", str(tmp_path / f"w{workers}"),
                                                    "--workers", str(workers)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "w1/manifest.parquet").read_bytes() == (tmp_path / "w2/manifest.parquet").read_bytes()
    rows = [r for r in pq.read_table(tmp_path / "w2/manifest.parquet").to_pylist() if r["split"] == "train"]
    want = tar_offsets(tmp_path / "w2/train/images-000000.tar")
    assert len(rows) == len(want) == 64 and rows[-1]["image_offset"] > os.path.getsize(
        tmp_path / "w2/train/images-000000.tar") // 2  # past the first piece
    assert {r["key"]: (r["image_offset"], r["image_bytes"]) for r in rows} == want


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_read_check_accepts_every_tar_dialect_and_catches_another_member(tmp_path, fmt):
    """The header before each member's data (as tarfile places it: long and non-ASCII names
    in GNU/pax extension records) passes for its own key and size, fails for another key
    or size. A user's tar may be any dialect."""
    long_name = ("d" * 60 + "/" + "k" * 60) if fmt == tarfile.USTAR_FORMAT else "k" * 150
    names = ["a.jpg", f"{long_name}.jpg", "üüüüü.png", "x/y.png"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, __import__("io").BytesIO(b"abc"))
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == names
    for m in members:
        key = m.name.rsplit(".", 1)[0]  # webdataset's key: no other dot in these names
        header = data[m.offset_data - 512:m.offset_data]
        assert msamples.member_problem(header, key, 3) is None, (fmt, m.name)
        assert "bytes" in msamples.member_problem(header, key, 4)
    a = data[members[0].offset_data - 512:members[0].offset_data]
    assert "'a.jpg'" in msamples.member_problem(a, "b", 3)
    assert msamples.member_problem(bytes(512), "a", 3) == "no tar member header there"
