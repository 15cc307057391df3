"""`dynaprep index` end to end on fixture datasets in each real layout.

Shards are read back with plain `webdataset` and manifests with `pyarrow`, never with the
code that wrote them; scores and selections are recomputed from the stored (PNG) pixels.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

import fixtures_data as fd
from dynavit.manifests import validate_dataset
from dynavit.pipeline.cli import main
from dynavit.pipeline.saliency import score_patches
from dynavit.pipeline.topk import select_topk

DYNAPREP = str(Path(sys.executable).with_name("dynaprep"))
SMALL = ["--image-size", "64", "--patch-size", "16", "--format", "png", "--workers", "1", "--no-progress"]


def run(*args, ok=True):
    if args and args[0] == "index" and "--scorer" not in args:  # these tests check the paper's l2
        args = (*args, "--scorer", "l2")
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def read_manifest(out):
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


def read_split(out, split, scorer="l2"):
    """Every sample of a split through webdataset's own reader, image and index shards zipped."""
    shards = pq.read_table(Path(out) / "shards.parquet").to_pylist()
    root = json.loads((Path(out) / "dataset.json").read_text()).get("images_root")  # wds: the user's tars
    samples = []
    for row in (r for r in shards if r["split"] == split):
        images = Path(root) / row["images"] if root else Path(out) / row["images"]
        index = Path(out) / next(e["path"] for e in row["index"] if e["scorer"] == scorer)
        a = list(wds.WebDataset(str(images), shardshuffle=False).decode("rgb8"))
        b = list(wds.WebDataset(str(index), shardshuffle=False).decode())
        if root:  # the user's tar may also hold samples that failed
            a = [x for x in a if x["__key__"] in {y["__key__"] for y in b}]
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
        samples += [(x, y) for x, y in zip(a, b)]
    return samples


def check_scores_and_selection(out, ks=(70, 50, 25), scorers=("l2",), patch=16):
    for split in {r["split"] for r in read_manifest(out)}:
        for scorer in scorers:
            for img, idx in read_split(out, split, scorer):
                pixels = img.get("png", img.get("jpg"))[None]
                want = score_patches(np.ascontiguousarray(pixels), patch, scorer)
                np.testing.assert_array_equal(idx["scores.npy"], want[0].astype(np.float16))
                for k in ks:
                    np.testing.assert_array_equal(idx[f"k{k}.npy"], select_topk(want, k)[0])


def accounted(out, expected_sources):
    rows = read_manifest(out)
    assert sorted(r["source"] for r in rows) == sorted(expected_sources)
    for split in {r["split"] for r in rows}:
        ok_keys = [r["key"] for r in rows if r["split"] == split and r["status"] == "ok"]
        assert sorted(s["__key__"] for s, _ in read_split(out, split)) == sorted(ok_keys)
    return rows


def test_imagefolder_every_input_once(tmp_path, imagefolder_ds):
    out = tmp_path / "out"
    run("index", "--data", "imagenet", "--src", imagefolder_ds["root"], "--out", out, "--shard-size", "3", *SMALL)
    expected = [rel for split in imagefolder_ds["samples"].values() for rel, _ in split]
    rows = accounted(out, expected)
    assert all(r["status"] == "ok" for r in rows)
    by_source = {r["source"]: r for r in rows}
    for rel, cls in imagefolder_ds["samples"]["train"]:
        assert by_source[rel]["class_name"] == cls
        assert by_source[rel]["label"] == imagefolder_ds["classes"].index(cls)
    for img, _ in read_split(out, "val"):
        assert img["png"].shape == (64, 64, 3)
        assert by_source[next(r["source"] for r in rows if r["key"] == img["__key__"] and r["split"] == "val")]["label"] == img["cls"]
    check_scores_and_selection(out)
    assert validate_dataset(out) == []
    assert run("verify", out).exit_code == 0


@pytest.mark.parametrize("name", ["cifar100", "tinyimagenet", "voc5"])
def test_other_layouts(tmp_path, name, cifar100_ds, tinyimagenet_ds, voc_ds):
    ds = {"cifar100": cifar100_ds, "tinyimagenet": tinyimagenet_ds, "voc5": voc_ds}[name]
    size = ["--image-size", "32", "--patch-size", "8"] if name == "cifar100" else []
    out = tmp_path / "out"
    args = [*SMALL, *size] if size else SMALL
    run("index", "--data", name, "--src", ds["root"], "--out", out, "--shard-size", "4", "--k", "50,25",
        "--scorer", "l2,entropy", *args)
    rows = read_manifest(out)
    assert len({(r["split"], r["key"]) for r in rows}) == len(rows)
    if name == "cifar100":
        expected = {split: len(labels) for split, (_, labels) in ds["splits"].items()}
    else:
        expected = {split: len(v) for split, v in ds["samples"].items()}
    assert {s: sum(r["split"] == s for r in rows) for s in expected} == expected
    assert len(rows) == sum(expected.values())
    check_scores_and_selection(out, ks=(50, 25), scorers=("l2", "entropy"), patch=8 if size else 16)
    assert validate_dataset(out) == []


def test_wds_writes_only_index_shards(tmp_path):
    ds = fd.make_wds(tmp_path / "user", n_shards=2, per_shard=3, size=(64, 64))
    # A third shard whose middle sample has no image: it fails, yet stays in the user's tar.
    odd = fd.make_tar(Path(ds["root"]) / "00002.tar", [
        ("000020000.jpg", fd.jpeg_bytes(np.zeros((64, 64, 3), np.uint8))), ("000020000.cls", b"1"),
        ("000020001.txt", b"a caption"), ("000020001.cls", b"2"),
        ("000020002.jpg", fd.jpeg_bytes(np.zeros((64, 64, 3), np.uint8))), ("000020002.cls", b"3"),
    ])
    ds["tars"].append(odd)
    ds["samples"].append([("000020000", 1), ("000020002", 3)])
    ds["pattern"] = ds["pattern"].replace("00001}", "00002}")
    before = {p: Path(p).read_bytes() for p in ds["tars"]}
    out = tmp_path / "out"
    # --no-pad-aware: the synthetic patterns sit on flat backgrounds that look like a letterbox,
    # and this test compares with the paper's plain selection (padding: tests/test_wds_inplace.py)
    run("index", "--data", "wds", "--src", ds["pattern"], "--out", out, "--k", "50", "--no-pad-aware", *SMALL)
    assert not list(out.rglob("images-*.tar"))
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    root = json.loads((out / "dataset.json").read_text())["images_root"]
    assert [str(Path(root) / r["images"]) for r in shards] == [str(Path(p).resolve()) for p in ds["tars"]]
    assert {p: Path(p).read_bytes() for p in ds["tars"]} == before  # user's shards untouched
    keys = [s["__key__"] for s, _ in read_split(out, "train")]
    assert keys == [k for shard in ds["samples"] for k, _ in shard]
    check_scores_and_selection(out, ks=(50,))
    failed = [r for r in read_manifest(out) if r["status"] == "failed"]
    assert [(r["key"], r["source"]) for r in failed] == [("000020001", "00002.tar#000020001")]
    assert "no image member" in failed[0]["error"]
    # No classes_file: the label values stand in for names, so a trainer knows there are 5.
    assert __import__("json").loads((out / "dataset.json").read_text())["classes"] == ["0", "1", "2", "3", "4"]
    assert validate_dataset(out) == []


def test_bad_inputs_become_failed_rows(tmp_path):
    src = tmp_path / "src"
    bad = fd.make_bad_images(src / "train" / "odd")
    fd.make_imagefolder(tmp_path / "good", classes=("odd",), per_class=2, extras=False, val_per_class=0)
    shutil.copytree(tmp_path / "good" / "train" / "odd", src / "train" / "odd", dirs_exist_ok=True)
    out = tmp_path / "out"
    result = run("index", "--data", "imagefolder", "--src", src, "--out", out, *SMALL)
    rows = {Path(r["source"]).name: r for r in read_manifest(out)}
    assert set(bad) <= set(rows)
    for name, (_, reason) in bad.items():
        if reason is None:
            assert rows[name]["status"] == "ok", rows[name]
        else:
            assert rows[name]["status"] == "failed" and rows[name]["error"].startswith(reason), rows[name]
    n_failed = sum(r["status"] == "failed" for r in rows.values())
    assert f"{n_failed} failed" in result.output
    assert validate_dataset(out) == []
    strict = run("index", "--data", "imagefolder", "--src", src, "--out", tmp_path / "strict", "--strict", *SMALL, ok=False)
    assert strict.exit_code == 1


@pytest.mark.parametrize("args,message", [
    (["--data", "nope", "--src", "."], "'nope' is not one of"),
    (["--data", "demo", "--k", "0"], "1..100"),
    (["--data", "demo", "--k", "70,101"], "1..100"),
    (["--data", "demo", "--image-size", "100"], "not a multiple of --patch-size 16"),
    (["--data", "imagenet"], "--src is required"),
    (["--data", "imagenet", "--src", "/does/not/exist"], "/does/not/exist"),
    (["--data", "demo", "--scorer", "l3"], "unknown scorer 'l3'"),
    (["--data", "demo", "-o", "bogus=1"], "bogus"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["index", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_non_empty_out_is_refused_then_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = run("index", "--data", "demo", "--out", out, *SMALL, ok=False)
    assert result.exit_code == 2 and "not empty" in result.output
    result = run("index", "--data", "demo", "--out", out, "--overwrite", *SMALL, ok=False)
    assert result.exit_code == 2 and "does not look like a dynaprep output" in result.output
    assert (out / "precious.txt").read_text() == "mine"
    demo = ["-o", "n_train=6", "-o", "n_val=2"]
    run("index", "--data", "demo", "--out", tmp_path / "d", *demo, *SMALL)
    run("index", "--data", "demo", "--out", tmp_path / "d", "--overwrite", "--k", "50", *demo, *SMALL)
    assert [k["k"] for k in __import__("json").loads((tmp_path / "d" / "dataset.json").read_text())["ks"]] == [50]
    result = run("index", "--data", "demo", "--out", tmp_path / "d", "--resume", "--k", "25", *demo, *SMALL, ok=False)
    assert result.exit_code == 2 and "ks changed since the run started" in result.output


def test_resume_refuses_changed_inputs_and_strict_counts_earlier_failures(tmp_path):
    src = tmp_path / "src"
    fd.make_imagefolder(src, classes=("a", "b"), per_class=3, val_per_class=1, extras=False)
    (src / "train" / "a" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    run("index", "--data", "imagefolder", "--src", src, "--out", out, "--shard-size", "2", *SMALL)
    # A resumed (here: already complete) run still fails --strict for the failure it kept.
    strict = run("index", "--data", "imagefolder", "--src", src, "--out", out, "--shard-size", "2", "--resume",
                 "--strict", *SMALL, ok=False)
    assert strict.exit_code == 1 and "0 shards written" in strict.output
    (src / "train" / "a" / "a_0.JPEG").unlink()  # ordinals shift: old shards no longer match
    result = run("index", "--data", "imagefolder", "--src", src, "--out", out, "--shard-size", "2", "--resume",
                 *SMALL, ok=False)
    assert result.exit_code == 2 and "the input files changed" in result.output


def _tree(out):
    """Every output file's bytes, without dataset.json's timestamp and the run state."""
    files = {}
    for p in sorted(Path(out).rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and rel.parts[0] != ".dynaprep" and rel.name != "dataset.json":
            files[str(rel)] = p.read_bytes()
    return files


DEMO_JOB = ["index", "--data", "demo", "-o", "n_train=90", "-o", "n_val=30", "--shard-size", "10",
            "--image-size", "64", "--k", "70,25", "--scorer", "l2,sobel", "--no-progress"]


def test_workers_and_ranks_give_identical_output(tmp_path):
    run(*DEMO_JOB, "--out", tmp_path / "one", "--workers", "1")
    run(*DEMO_JOB, "--out", tmp_path / "two", "--workers", "2")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    r0 = run(*DEMO_JOB, "--out", tmp_path / "ranks", "--workers", "1", "--rank", "0", "--world-size", "2")
    assert "merge-manifests" in r0.output and not (tmp_path / "ranks" / "dataset.json").exists()
    r1 = run(*DEMO_JOB, "--out", tmp_path / "ranks", "--workers", "1", "--rank", "1", "--world-size", "2")
    assert (tmp_path / "ranks" / "dataset.json").exists(), r1.output  # the last rank to finish merges
    assert _tree(tmp_path / "one") == _tree(tmp_path / "ranks")
    (tmp_path / "ranks" / "dataset.json").unlink()
    run("merge-manifests", tmp_path / "ranks")
    assert validate_dataset(tmp_path / "ranks") == []


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    job = [DYNAPREP, *DEMO_JOB[:4], "n_train=600", *DEMO_JOB[5:], "--workers", "1"]
    subprocess.run([*job, "--out", str(ref)], check=True, capture_output=True)
    proc = subprocess.Popen([*job, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / ".dynaprep" / "parts"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if parts.exists() and len(list(parts.glob("*.shard.parquet"))) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.shard.parquet")))
    assert 0 < done_before < 63, "kill landed outside the run; test proves nothing"
    assert not (killed / "dataset.json").exists()
    result = subprocess.run([*job, "--out", str(killed), "--resume"], check=True, capture_output=True, text=True)
    assert f"{done_before} already done" in result.stdout
    assert _tree(ref) == _tree(killed)
    assert not list(killed.rglob("*.tmp"))


def test_class_sorted_source_is_written_in_a_seeded_random_order(tmp_path):
    # Folder layouts list samples class by class; the default write order must mix them.
    classes = [f"c{i}" for i in range(6)]
    ds = fd.make_imagefolder(tmp_path / "src", classes=classes, per_class=8, size=(40, 40),
                             val_per_class=1, extras=False)
    common = ["index", "--data", "imagefolder", "--src", ds["root"], "--k", "50", "--shard-size", "8", *SMALL]
    run(*common, "--out", tmp_path / "a")
    run(*common, "--out", tmp_path / "b")
    run(*common, "--out", tmp_path / "c", "--order-seed", "1")
    run(*common, "--out", tmp_path / "src-order", "--order", "source")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # same seed, same bytes

    def shard_classes(out):
        rows = [r for r in read_manifest(out) if r["split"] == "train"]
        return [len({r["label"] for r in rows if r["shard"] == s}) for s in sorted({r["shard"] for r in rows})]

    # 48 samples of 6 classes in shards of 8: in source order each shard is one class.
    assert shard_classes(tmp_path / "src-order") == [1] * 6
    assert sum(shard_classes(tmp_path / "a")) / 6 >= 3.5  # a random shard of 8 holds ~4.4 classes
    # Keys are the source ordinals whatever the order: the same input has the same key.
    by_source = {out: {r["source"]: r["key"] for r in read_manifest(tmp_path / out)} for out in ("a", "c", "src-order")}
    assert by_source["a"] == by_source["c"] == by_source["src-order"]
    keys_a = [r["key"] for r in read_manifest(tmp_path / "a") if r["split"] == "train"]
    keys_c = [r["key"] for r in read_manifest(tmp_path / "c") if r["split"] == "train"]
    assert keys_a != keys_c and sorted(keys_a) == sorted(keys_c) == [f"{i:010d}" for i in range(48)]
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["order"] == {"policy": "shuffle", "seed": 0}
    assert json.loads((tmp_path / "src-order" / "dataset.json").read_text())["order"] == {"policy": "source"}
    assert validate_dataset(tmp_path / "a") == []


def test_a_split_with_zero_usable_samples_exits_1_naming_the_reasons(tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / "train" / c).mkdir(parents=True)
        for i in range(3):
            (src / "train" / c / f"{i}.jpg").write_bytes(b"")  # empty files: every input fails
    out = tmp_path / "out"
    result = run("index", "--data", "imagefolder", "--src", src, "--out", out, *SMALL, ok=False)
    assert result.exit_code == 1
    assert "6 × empty file" in result.output and "train has 0 usable samples" in result.output
    rows = read_manifest(out)
    assert len(rows) == 6 and all(r["status"] == "failed" for r in rows)  # every input accounted for
