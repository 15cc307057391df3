import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynavit.manifests import (
    MANIFEST_SCHEMA,
    DatasetInfo,
    FormatError,
    TarWriter,
    iter_tar_samples,
    npy_bytes,
    npy_load,
    read_dataset_info,
    read_manifest,
    read_shards,
    sha256_file,
    validate_dataset,
    write_manifest,
    write_shards,
)
from tiny_dataset import make_tiny_dataset


@pytest.fixture()
def dataset(tmp_path):
    out = tmp_path / "ds"
    info = make_tiny_dataset(out)
    assert validate_dataset(out) == []
    return out, info


def test_manifest_round_trip_through_pyarrow(tmp_path):
    rows = [
        {"split": "train", "key": "0000000000", "shard": 0, "label": 3, "class_name": "c3", "source": "a/b.jpg",
         "orig_width": 500, "orig_height": 375, "status": "ok", "error": None, "sha256": "ab" * 32,
         "image_offset": 512, "image_bytes": 1234},
        {"split": "train", "key": "0000000001", "shard": 0, "label": None, "class_name": None, "source": "a/c.jpg",
         "orig_width": None, "orig_height": None, "status": "failed", "error": "empty file", "sha256": None,
         "image_offset": None, "image_bytes": None},
    ]
    write_manifest(tmp_path, rows)
    table = pq.read_table(tmp_path / "manifest.parquet")  # plain pyarrow, not our reader
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert table.to_pylist() == rows
    assert read_manifest(tmp_path).to_pylist() == rows


def test_manifest_writer_rejects_wrong_types(tmp_path):
    rows = [{"split": "train", "key": "0", "shard": "zero", "label": None, "class_name": None, "source": "x",
             "orig_width": None, "orig_height": None, "status": "ok", "error": None, "sha256": None}]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        write_manifest(tmp_path, rows)
    assert not (tmp_path / "manifest.parquet").exists()


def test_dataset_info_round_trip(dataset):
    out, info = dataset
    again = read_dataset_info(out)
    assert again == info
    assert again.grid == (8, 8)
    assert json.loads((out / "dataset.json").read_text())["grid"] == [8, 8]


def test_shards_parquet_lists_every_file(dataset):
    out, _ = dataset
    rows = read_shards(out).to_pylist()
    assert [(r["split"], r["shard"]) for r in rows] == [("train", 0), ("train", 1), ("train", 2), ("val", 0), ("val", 1)]
    for r in rows:
        assert sha256_file(out / r["images"]) == (r["images_sha256"], r["images_bytes"])
        assert [e["scorer"] for e in r["index"]] == ["l2"]


def test_tar_writer_is_deterministic_and_atomic(tmp_path):
    for name in ("a.tar", "b.tar"):
        with TarWriter(tmp_path / name) as w:
            w.write("0000000000", {"jpg": b"x" * 10, "cls": b"1"})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with pytest.raises(RuntimeError):
        with TarWriter(tmp_path / "c.tar") as w:
            w.write("0000000000", {"jpg": b"x"})
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no c.tar, no temp file


def test_tar_writer_bytes_equal_tarfile(tmp_path):
    """The hand-built headers must be exactly what the standard library writes."""
    import io
    import tarfile

    members = [("0000000007", {"jpg": b"\xff" * 1000, "cls": b"3", "k70.npy": b"x" * 512}),
               ("d" * 95 + "/0000000008", {"png": b"" , "scores.npy": b"y" * 9000})]  # long name: prefix split
    with TarWriter(tmp_path / "ours.tar") as w:
        for key, m in members:
            w.write(key, m)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, m in members:
            for ext, data in m.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == buf.getvalue()
    assert [k for k, _ in iter_tar_samples(tmp_path / "ours.tar")] == [k for k, _ in members]
    # the digest taken while writing is the file's, as hashlib reads it back
    import hashlib

    assert w.digest == (hashlib.sha256(buf.getvalue()).hexdigest(), len(buf.getvalue()))


def test_joined_fragments_digest_is_the_files(tmp_path):
    """Fragments joined in order are the tar one writer makes, and join_fragments returns
    that file's (sha256, bytes) as read back."""
    import hashlib

    from dynavit.manifests.tar import join_fragments

    samples = [(f"{i:010d}", {"jpg": bytes([i]) * (300 + 97 * i), "cls": b"%d" % i}) for i in range(7)]
    with TarWriter(tmp_path / "whole.tar") as whole:
        for key, m in samples:
            whole.write(key, m)
    for name, part in (("a", samples[:3]), ("b", samples[3:])):
        with TarWriter(tmp_path / name, fragment=True) as w:
            for key, m in part:
                w.write(key, m)
    got = join_fragments([tmp_path / "a", tmp_path / "b"], tmp_path / "joined.tar")
    data = (tmp_path / "joined.tar").read_bytes()
    assert data == (tmp_path / "whole.tar").read_bytes()
    assert got == whole.digest == (hashlib.sha256(data).hexdigest(), len(data))


# --- the validator catches each violation, naming the file --------------------------------

def _shard_row(out, split="train", shard=1):
    rows = read_shards(out).to_pylist()
    return rows, next(i for i, r in enumerate(rows) if (r["split"], r["shard"]) == (split, shard))


def _rewrite_index(out, edit, split="train", shard=1):
    """Rewrite one index shard through `edit(samples) -> samples` and fix its checksum, so
    the only violation left is the one `edit` introduced."""
    rows, i = _shard_row(out, split, shard)
    entry = rows[i]["index"][0]
    path = out / entry["path"]
    samples = edit(list(iter_tar_samples(path)))
    path.unlink()
    with TarWriter(path) as w:
        for key, members in samples:
            w.write(key, members)
    entry["sha256"], entry["bytes"] = sha256_file(path)
    write_shards(out, rows)
    return entry["path"]


def _edit_k(k, fn):
    def edit(samples):
        key, members = samples[0]
        members[f"k{k}.npy"] = npy_bytes(fn(npy_load(members[f"k{k}.npy"])))
        return samples
    return edit


def _only(violations, file, text):
    assert violations, "validator found nothing"
    assert all(v.file == file for v in violations), violations
    assert any(text in v.message for v in violations), violations


def test_missing_shard(dataset):
    out, _ = dataset
    rows, i = _shard_row(out)
    (out / rows[i]["index"][0]["path"]).unlink()
    _only(validate_dataset(out), rows[i]["index"][0]["path"], "missing shard file")


def test_count_mismatch(dataset):
    out, _ = dataset
    rows, i = _shard_row(out)
    rows[i]["count"] += 1
    write_shards(out, rows)
    _only(validate_dataset(out), rows[i]["images"], "shards.parquet says 11")


def test_key_order_mismatch(dataset):
    out, _ = dataset
    rel = _rewrite_index(out, lambda s: [s[1], s[0], *s[2:]])
    _only(validate_dataset(out), rel, "key order differs from the image shard at position 0")


def test_index_out_of_range(dataset):
    out, info = dataset
    rel = _rewrite_index(out, _edit_k(50, lambda a: np.concatenate([a[:-1], [info.num_patches]]).astype(a.dtype)))
    _only(validate_dataset(out), rel, "out of range")


def test_index_not_strictly_increasing(dataset):
    out, _ = dataset
    rel = _rewrite_index(out, _edit_k(25, lambda a: np.concatenate([a[:1], a[:-1]]).astype(a.dtype)))
    _only(validate_dataset(out), rel, "not strictly increasing")


def test_wrong_length_for_k(dataset):
    out, _ = dataset
    rel = _rewrite_index(out, _edit_k(25, lambda a: a[:-1]))
    _only(validate_dataset(out), rel, "expected [16]")


def test_k_sets_not_nested(dataset):
    out, info = dataset

    def edit(samples):  # keep length, order and range, but put a patch outside K=50 into K=25
        _, members = samples[0]
        k50, k25 = npy_load(members["k50.npy"]), npy_load(members["k25.npy"])
        outside = np.setdiff1d(np.arange(info.num_patches), k50)
        members["k25.npy"] = npy_bytes(np.sort(np.concatenate([k25[1:], outside[:1]])).astype(k25.dtype))
        return samples

    rel = _rewrite_index(out, edit)
    _only(validate_dataset(out), rel, "k25.npy is not a subset of k50.npy")


def test_ks_entry_inconsistent_with_grid(dataset):
    out, _ = dataset
    d = json.loads((out / "dataset.json").read_text())
    d["ks"][0]["kept"] += 1
    (out / "dataset.json").write_text(json.dumps(d))
    _only(validate_dataset(out), "dataset.json", "ks entry K=50 says kept=33")


def test_wrong_index_dtype(dataset):
    out, _ = dataset
    rel = _rewrite_index(out, _edit_k(50, lambda a: a.astype(np.uint16)))
    _only(validate_dataset(out), rel, "dtype uint16, expected uint8")


def test_checksum_mismatch(dataset):
    out, _ = dataset
    rows, i = _shard_row(out)
    path = out / rows[i]["images"]
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload: the tar stays readable
    path.write_bytes(bytes(data))
    _only(validate_dataset(out), rows[i]["images"], "checksum mismatch")


def test_truncated_tar(dataset):
    out, _ = dataset
    rows, i = _shard_row(out)
    path = out / rows[i]["images"]
    path.write_bytes(path.read_bytes()[:1500])
    violations = validate_dataset(out)
    _only(violations, rows[i]["images"], "unreadable tar")
    assert any("checksum mismatch" in v.message for v in violations)


def test_manifest_key_not_in_shard(dataset):
    out, _ = dataset
    table = read_manifest(out).to_pylist()
    table[3]["key"] = "0000000999"
    write_manifest(out, table)
    _only(validate_dataset(out), "train/images-000000.tar", "differ from the manifest")


def test_unknown_format_version(dataset):
    out, _ = dataset
    d = json.loads((out / "dataset.json").read_text())
    d["format_version"] = 99
    (out / "dataset.json").write_text(json.dumps(d))
    _only(validate_dataset(out), "dataset.json", "unknown format_version 99")
    with pytest.raises(FormatError, match="unknown format_version 99"):
        DatasetInfo.from_dict(d)


@pytest.mark.parametrize("name", ["../../etc/evil", "canny"])
def test_unknown_scorer_name(dataset, name):
    """A scorer name becomes part of index shard file names: only the known ones are valid."""
    out, _ = dataset
    d = json.loads((out / "dataset.json").read_text())
    d["scorers"] = d["scorers"] + [name]
    (out / "dataset.json").write_text(json.dumps(d))
    found = [v for v in validate_dataset(out) if v.file == "dataset.json"]
    assert len(found) == 1 and "unknown scorer" in found[0].message and name in found[0].message


def test_not_a_dataset_directory(tmp_path):
    _only(validate_dataset(tmp_path), "dataset.json", "not a dynavit dataset directory")
