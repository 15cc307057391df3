"""dynavit.pipeline.sources on fixture datasets built in each real on-disk layout."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from dynavit.pipeline.sources import SOURCES, SourceError, open_source
from dynavit.pipeline.sources.base import RawSample, WorkUnit
from dynavit.pipeline.sources.cifar100 import restricted_load
from dynavit.pipeline.sources.voc import AnnotationError, label_from_xml
from dynavit.pipeline.sources.wds import TAR_ERROR_KEY

import fixtures_data as fd


def read_split(source, split, shard_size):
    units = source.units(split, shard_size)
    out = []
    for i, u in enumerate(units):
        assert isinstance(u, WorkUnit) and u.split == split and u.index == i
        pickle.loads(pickle.dumps(u))  # units travel to worker processes
        got = list(source.read_unit(u))
        if u.count is not None:
            assert len(got) == u.count
        out.extend(got)
    return units, out


def check_enumeration(source, split, expected_sources):
    """Every input exactly once, keys unique and in order, same result for any shard size."""
    runs = {}
    for shard_size in (3, 1000, 1):
        units, samples = read_split(source, split, shard_size)
        assert all(isinstance(s, RawSample) for s in samples)
        keys = [s.key for s in samples]
        assert len(set(keys)) == len(keys)
        assert keys == sorted(keys)
        assert all("." not in k for k in keys)
        assert [s.source for s in samples] == list(expected_sources)
        if source.external_images:
            continue
        assert keys == [f"{i:010d}" for i in range(len(keys))]
        assert len(units) == -(-len(keys) // shard_size)
        for u in units:  # unit i holds ordinals [i*s, (i+1)*s)
            ks = [s.key for s in source.read_unit(u)]
            assert ks == [f"{j:010d}" for j in range(u.index * shard_size,
                                                     min((u.index + 1) * shard_size, len(keys)))]
        runs[shard_size] = [(s.key, s.source, s.label, s.error) for s in samples]
    if runs:
        assert runs[3] == runs[1000] == runs[1]
    return samples


def test_registry_and_unknown_names():
    assert set(SOURCES) == {"imagenet", "imagefolder", "cifar100", "tinyimagenet", "voc5", "voc-seg", "wds", "demo"}
    with pytest.raises(ValueError, match="valid: cifar100, demo, imagefolder"):
        open_source("mnist", "/x")
    with pytest.raises(ValueError, match="n_train"):
        open_source("demo", None, n_trian=3)


@pytest.mark.parametrize("name", ["imagenet", "imagefolder", "cifar100", "tinyimagenet", "voc5", "wds"])
def test_missing_src_is_source_error(tmp_path, name):
    with pytest.raises(SourceError) as ei:
        open_source(name, str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(ei.value)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------ imagefolder / imagenet

@pytest.mark.parametrize("name", ["imagenet", "imagefolder"])
def test_imagefolder(imagefolder_ds, name):
    src = open_source(name, imagefolder_ds["root"])
    assert src.splits() == ["train", "val"]
    assert src.classes() == imagefolder_ds["classes"]
    for split in ("train", "val"):
        exp = imagefolder_ds["samples"][split]
        samples = check_enumeration(src, split, [rel for rel, _ in exp])
        for s, (rel, cname) in zip(samples, exp):
            assert s.ok and s.class_name == cname and src.classes()[s.label] == cname
            with open(os.path.join(imagefolder_ds["root"], rel), "rb") as f:
                assert s.data == f.read()
    w = " ".join(src.warnings())
    assert "2 non-image files" in w and "ILSVRC2012_devkit_t12" in w


def test_imagefolder_failed_read_is_sample_not_exception(tmp_path):
    ds = fd.make_imagefolder(tmp_path / "if", per_class=2, val_per_class=1, extras=False)
    src = open_source("imagefolder", ds["root"])
    units = src.units("train", 100)
    victim = ds["samples"]["train"][1][0]
    os.remove(os.path.join(ds["root"], victim))
    got = list(src.read_unit(units[0]))
    assert len(got) == 6
    assert got[1].error == "missing file" and got[1].data is None and got[1].source == victim
    assert all(s.ok for i, s in enumerate(got) if i != 1)


def test_imagefolder_layout_errors(tmp_path):
    ds = fd.make_imagefolder(tmp_path / "a", per_class=1, val_per_class=1, extras=False)
    os.makedirs(os.path.join(ds["root"], "val", "n09999999"))
    with pytest.raises(SourceError, match="n09999999"):
        open_source("imagenet", ds["root"])
    # raw ImageNet val: images directly in val/
    ds = fd.make_imagefolder(tmp_path / "b", per_class=1, val_per_class=0, extras=False)
    fd._write(os.path.join(ds["root"], "val", "ILSVRC2012_val_00000001.JPEG"), b"x")
    with pytest.raises(SourceError, match="valprep"):
        open_source("imagenet", ds["root"])
    # a flat test/ folder is an unlabeled split
    shutil.rmtree(os.path.join(ds["root"], "val"))
    fd._write(os.path.join(ds["root"], "test", "ILSVRC2012_test_00000001.JPEG"), b"x")
    src = open_source("imagenet", ds["root"])
    assert src.splits() == ["train", "test"]
    (s,) = [s for u in src.units("test", 10) for s in src.read_unit(u)]
    assert s.label is None and s.class_name is None and s.source == "test/ILSVRC2012_test_00000001.JPEG"
    os.makedirs(tmp_path / "c")
    with pytest.raises(SourceError, match="no split folders"):
        open_source("imagefolder", str(tmp_path / "c"))


def test_imagefolder_unit_for_unknown_split(imagefolder_ds):
    src = open_source("imagefolder", imagefolder_ds["root"])
    with pytest.raises(SourceError, match="no split 'test'"):
        src.units("test", 10)
    with pytest.raises(ValueError):
        src.units("train", 0)


# ------------------------------------------------------------------ cifar100

@pytest.mark.parametrize("which", ["root", "parent"])
def test_cifar100(cifar100_ds, which):
    src = open_source("cifar100", cifar100_ds[which])
    assert src.splits() == ["train", "test"]
    assert src.classes() == fd.CIFAR_FINE and len(src.classes()) == 100
    prefix = "" if which == "root" else "cifar-100-python/"
    for split, (data, fine) in cifar100_ds["splits"].items():
        samples = check_enumeration(src, split, [f"{prefix}{split}#{i}" for i in range(len(fine))])
        for i, s in enumerate(samples):
            assert s.ok and s.label == fine[i] and s.class_name == fd.CIFAR_FINE[fine[i]]
            assert s.data.dtype == np.uint8 and s.data.shape == (32, 32, 3)
            assert s.data.flags["C_CONTIGUOUS"]
            # R, G, B planes of the row
            assert (s.data[..., 0].ravel() == data[i, :1024]).all()
            assert (s.data[..., 1].ravel() == data[i, 1024:2048]).all()
            assert (s.data[..., 2].ravel() == data[i, 2048:]).all()


def test_cifar100_fixture_is_py2_format(cifar100_ds):
    raw = open(os.path.join(cifar100_ds["root"], "train"), "rb").read()
    assert raw[:2] == b"\x80\x02" and b"numpy.core.multiarray\n_reconstruct" in raw
    assert b"_codecs" not in raw  # Python 3's protocol-2 bytes encoding would need _codecs.encode
    d = pickle.loads(raw, encoding="bytes")
    assert set(d) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "nested"])
def test_restricted_unpickler_refuses_code(tmp_path, how):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    if how == "os.system":
        evil = _Evil(os.system, cmd)
    elif how == "builtins.eval":
        evil = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    else:  # hidden inside an otherwise valid batch dict
        evil = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [_Evil(os.system, cmd)]}
    payload = pickle.dumps(evil, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        restricted_load(payload)
    assert not marker.exists()
    # the same through the source: a crafted train file is a SourceError, nothing runs
    ds = fd.make_cifar100(tmp_path / "c", n_train=2, n_test=2)
    with open(os.path.join(ds["root"], "train"), "wb") as f:
        f.write(payload)
    src = open_source("cifar100", ds["root"])
    with pytest.raises(SourceError, match="refusing global") as ei:
        src.units("train", 10)
    assert os.path.join(ds["root"], "train") in str(ei.value)
    assert not marker.exists()


def test_cifar100_malformed(tmp_path):
    ds = fd.make_cifar100(tmp_path / "c", n_train=2, n_test=2)
    with open(os.path.join(ds["root"], "test"), "wb") as f:
        f.write(b"garbage")
    src = open_source("cifar100", ds["root"])
    with pytest.raises(SourceError, match="not a CIFAR pickle"):
        src.units("test", 10)
    with open(os.path.join(ds["root"], "test"), "wb") as f:
        f.write(fd.py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(SourceError, match="uint8"):
        src.units("test", 10)
    os.remove(os.path.join(ds["root"], "meta"))
    with pytest.raises(SourceError, match="meta"):
        open_source("cifar100", ds["root"])


# ------------------------------------------------------------------ tiny imagenet

@pytest.mark.parametrize("which", ["root", "parent"])
def test_tinyimagenet(tinyimagenet_ds, which):
    src = open_source("tinyimagenet", tinyimagenet_ds[which])
    assert src.splits() == ["train", "val", "test"]
    wnids = tinyimagenet_ds["classes"]
    assert wnids == sorted(fd.TINY_WNIDS)
    assert src.classes() == [fd.TINY_WORDS[w] for w in wnids]
    assert src.classes()[0] == "goldfish, Carassius auratus"  # n01443537 sorts first
    strip = "" if which == "parent" else "tiny-imagenet-200/"
    for split in ("train", "val", "test"):
        exp = tinyimagenet_ds["samples"][split]
        samples = check_enumeration(src, split, [rel[len(strip):] for rel, _ in exp])
        for s, (_, wnid) in zip(samples, exp):
            assert s.ok
            if wnid is None:
                assert s.label is None and s.class_name is None
            else:
                assert s.label == wnids.index(wnid) and s.class_name == fd.TINY_WORDS[wnid]
    # val_0 was annotated with wnids.txt's first line, n02124075 (Egyptian cat)
    val0 = next(s for u in src.units("val", 100) for s in src.read_unit(u))
    assert val0.source.endswith("val_0.JPEG") and val0.class_name == "Egyptian cat"


def test_tinyimagenet_val_mismatches(tmp_path):
    ds = fd.make_tinyimagenet(tmp_path / "t", per_class=1, n_val=3, n_test=0)
    os.remove(os.path.join(ds["root"], "val/images/val_1.JPEG"))           # annotated, missing
    fd._write(os.path.join(ds["root"], "val/images/val_9.JPEG"), b"\xff\xd8")  # not annotated
    src = open_source("tinyimagenet", ds["root"])
    got = {s.source: s for u in src.units("val", 2) for s in src.read_unit(u)}
    assert sorted(got) == [f"val/images/val_{i}.JPEG" for i in (0, 1, 2, 9)]
    assert got["val/images/val_1.JPEG"].error == "missing file"
    assert got["val/images/val_1.JPEG"].label is not None
    assert "val_annotations" in got["val/images/val_9.JPEG"].error
    with open(os.path.join(ds["root"], "val/val_annotations.txt"), "a") as f:
        f.write("val_5.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(SourceError, match=r"val_annotations.txt:4"):
        open_source("tinyimagenet", ds["root"]).units("val", 10)


# ------------------------------------------------------------------ voc5

def test_voc5(voc_ds):
    for src_dir in (voc_ds["root"], os.path.dirname(voc_ds["voc"]), voc_ds["voc"]):
        src = open_source("voc5", src_dir)
        assert src.splits() == ["train", "val"]
        assert src.classes() == ["bicycle", "car", "cat", "dog", "person"]
    src = open_source("voc5", voc_ds["root"])
    for split in ("train", "val"):
        exp = voc_ds["samples"][split]
        samples = check_enumeration(src, split, [rel for rel, _ in exp])
        for s, (rel, expected) in zip(samples, exp):
            if expected == "error":
                assert s.error and s.data is None
            else:
                assert s.ok and s.class_name == expected and src.classes()[s.label] == expected
    errors = {s.source.split("/")[-1]: s.error for u in src.units("train", 100)
              for s in src.read_unit(u) if s.error}
    assert errors["2008_000007.jpg"].startswith("malformed annotation XML")
    assert "DOCTYPE" in errors["2008_000008.jpg"]
    assert errors["2008_000009.jpg"] == "missing file"
    assert any("1 images show none" in w for w in src.warnings())


def test_voc_single_label_rule():
    x = fd.voc_xml
    assert label_from_xml(x("a", [("person", (1, 1, 10, 10), 0), ("car", (1, 1, 11, 10), 0)])) == 1
    # difficult objects only count when every candidate is difficult
    assert label_from_xml(x("a", [("dog", (1, 1, 500, 500), 1), ("cat", (1, 1, 5, 5), 0)])) == 2
    assert label_from_xml(x("a", [("dog", (1, 1, 500, 500), 1), ("cat", (1, 1, 5, 5), 1)])) == 3
    # ties: the earlier object wins, in either order
    assert label_from_xml(x("a", [("cat", (1, 1, 10, 20), 0), ("dog", (1, 1, 20, 10), 0)])) == 2
    assert label_from_xml(x("a", [("dog", (1, 1, 20, 10), 0), ("cat", (1, 1, 10, 20), 0)])) == 3
    # other classes are ignored, even when larger; none of the 5 -> None
    assert label_from_xml(x("a", [("horse", (1, 1, 500, 500), 0), ("bicycle", (1, 1, 3, 3), 0)])) == 0
    assert label_from_xml(x("a", [("horse", (1, 1, 500, 500), 0)])) is None
    # inclusive pixel areas: (1,1,10,19) -> 10*19 = 190 px, (1,1,1,200) -> 1*200 = 200 px
    # (xmax-xmin)*(ymax-ymin) would give 162 vs 0 and pick the car
    assert label_from_xml(x("a", [("car", (1, 1, 10, 19), 0), ("dog", (1, 1, 1, 200), 0)])) == 3
    # person part boxes are not objects (the fixture adds a huge head box to persons)
    assert label_from_xml(x("a", [("person", (1, 1, 5, 5), 0), ("cat", (1, 1, 6, 6), 0)])) == 2
    for bad in (b"<annotation>", fd.BILLION_LAUGHS,
                b'<!DOCTYPE a SYSTEM "file:///etc/passwd"><annotation/>',
                x("a", [("car", (1, 1, 10, 10), 0)]).replace(b"<xmax>10</xmax>", b"")):
        with pytest.raises(AnnotationError):
            label_from_xml(bad)


def test_voc_missing_sets(tmp_path):
    ds = fd.make_voc(tmp_path / "v")
    shutil.rmtree(os.path.join(ds["voc"], "ImageSets"))
    with pytest.raises(SourceError, match="ImageSets"):
        open_source("voc5", ds["root"])


# ------------------------------------------------------------------ wds

def _wds_expected(ds):
    return [f"{os.path.basename(t)}#{k}" for t, keys in zip(ds["tars"], ds["samples"]) for k, _ in keys]


@pytest.mark.parametrize("form", ["dir", "pattern", "glob", "single"])
def test_wds_inputs(wds_ds, form):
    tars = wds_ds["tars"]
    src_arg = {"dir": wds_ds["root"], "pattern": wds_ds["pattern"],
               "glob": os.path.join(wds_ds["root"], "*.tar"), "single": tars[1]}[form]
    src = open_source("wds", src_arg)
    assert src.external_images and src.splits() == ["train"] and src.classes() == []
    used = tars if form != "single" else [tars[1]]
    units = src.units("train", 3)
    # Shards are named relative to the common root, so moved tars are found by a new root.
    assert [os.path.join(src.images_root(), src.image_shard(u)) for u in units] == [os.path.abspath(t) for t in used]
    assert not any(os.path.isabs(src.image_shard(u)) for u in units)
    ds = dict(wds_ds, tars=used, samples=wds_ds["samples"] if form != "single" else [wds_ds["samples"][1]])
    samples = check_enumeration(src, "train", _wds_expected(ds))
    exp = [kl for keys in ds["samples"] for kl in keys]
    assert [(s.key, s.label) for s in samples] == exp
    for s in samples:
        assert s.ok and s.class_name is None and s.data[:2] == b"\xff\xd8"


def test_wds_split_subfolders_and_classes_file(tmp_path):
    a = fd.make_wds(tmp_path / "d" / "train", n_shards=2, per_shard=2)
    fd.make_wds(tmp_path / "d" / "val", n_shards=1, per_shard=3)
    fd.make_tar(tmp_path / "d" / "train" / "topk-l2-000000.tar", [("x.npy", b"")])  # our index shard
    names = tmp_path / "classes.txt"
    names.write_text("zero\none\ntwo\nthree\nfour\n")
    src = open_source("wds", str(tmp_path / "d"), classes_file=str(names))
    assert src.splits() == ["train", "val"] and src.classes()[2] == "two"
    assert [os.path.basename(src.image_shard(u)) for u in src.units("train")] == ["00000.tar", "00001.tar"]
    got = [s for u in src.units("train") for s in src.read_unit(u)]
    assert [(s.key, s.label, s.class_name) for s in got] == \
        [(k, lab, ["zero", "one", "two", "three", "four"][lab]) for keys in a["samples"] for k, lab in keys]


def test_wds_keys_and_errors(tmp_path):
    jpg = fd.jpeg_bytes(np.zeros((20, 20, 3), np.uint8))
    path = fd.make_tar(tmp_path / "odd.tar", [
        ("part1/000001.jpg", jpg), ("part1/000001.cls", b"3"),   # dir prefix kept in the key
        ("a.b/000002.JPG", jpg),                                 # dots in the dir part are fine
        ("__meta__", b"skip me"),                                # webdataset metadata
        ("000003.x.jpg", jpg),                                   # dotted basename: suffix "x.jpg"
        ("000004.txt", b"caption only"),                         # no image member
        ("000005.jpg", jpg), ("000005.cls", b"cat"),             # non-integer cls
        ("000006.jpg", jpg), ("000006.jpg", jpg),                # duplicate member
        ("000007.png", b"\x89PNG"),
        ("000008.jpg", jpg), ("000007.cls", b"1"),               # 000007 again, not adjacent
        ("README", b"no dot: not a sample"),
    ])
    src = open_source("wds", path)
    got = list(src.read_unit(src.units("train")[0]))
    by = [(s.key, s.error) for s in got]
    assert [k for k, _ in by] == ["part1/000001", "a.b/000002", "000003", "000004", "000005",
                                  "000006", "000007", "000008", "000007"]
    errs = dict(by[:-1])
    assert errs["part1/000001"] is None and got[0].label == 3 and got[0].source == "odd.tar#part1/000001"
    assert errs["a.b/000002"] is None and got[1].label is None
    assert "no image member" in errs["000003"] and "dot in its basename" in errs["000003"]
    assert "no image member" in errs["000004"]
    assert "cls is not an integer" in errs["000005"]
    assert "duplicate member" in errs["000006"]
    # A repeated key fails every copy (issue 23): no reader can pair one copy's image with
    # the other's label.
    assert "appears 2 times" in errs["000007"] and "appears 2 times" in by[-1][1]


def test_wds_truncated_tar(tmp_path, wds_ds):
    data = open(wds_ds["tars"][0], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    src = open_source("wds", str(cut))
    unit = src.units("train")[0]
    got = list(src.read_unit(unit))
    assert got[-1].key == f"{TAR_ERROR_KEY}{unit.index:06d}" and "unreadable tar" in got[-1].error
    assert all(s.ok for s in got[:-2]) and len(got) >= 2
    missing_pattern = os.path.join(wds_ds["root"], "{00000..00009}.tar")
    with pytest.raises(SourceError, match="7 of 10 shards"):
        open_source("wds", missing_pattern)


# ------------------------------------------------------------------ demo

def test_demo_deterministic_and_independent():
    src = open_source("demo", None, n_train=12, n_val=5, seed=3, image_size=64)
    assert src.splits() == ["train", "val"]
    assert src.classes() == ["disc", "square", "triangle", "cross", "ring"]
    samples = check_enumeration(src, "train", [f"demo:train:{i}" for i in range(12)])
    assert [s.label for s in samples] == [i % 5 for i in range(12)]
    assert all(s.data.shape == (64, 64, 3) and s.data.dtype == np.uint8 for s in samples)
    # a fresh source (another process) reading only unit 2 gives identical pixels
    other = open_source("demo", None, n_train=12, n_val=5, seed=3, image_size=64)
    u2 = other.units("train", 3)[2]
    for s in other.read_unit(u2):
        assert (s.data == samples[int(s.key)].data).all()
    val = [s for u in src.units("val", 10) for s in src.read_unit(u)]
    assert not any((v.data == samples[i].data).all() for i, v in enumerate(val))
    diff_seed = open_source("demo", None, n_train=12, seed=4, image_size=64)
    assert not (next(diff_seed.read_unit(diff_seed.units("train", 1)[0])).data == samples[0].data).all()


def test_demo_object_is_a_minority():
    # (speed is for benchmarks, not unit tests: ~1-2 ms per 224² image when measured)
    src = open_source("demo", None, n_train=20)
    samples = [s for u in src.units("train", 20) for s in src.read_unit(u)]
    assert samples[0].data.shape == (224, 224, 3)
    for s in samples:
        img = s.data.astype(int)
        # patches (16x16) whose colour spread is large = where the object edges are
        p = img.reshape(14, 16, 14, 16, 3).std(axis=(1, 3)).max(-1)
        assert (p > 25).mean() < 0.5
