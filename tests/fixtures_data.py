"""Builders of small datasets in each REAL on-disk layout (no downloads).

Plain functions, usable from any test.  Each returns a dict with at least `root` (the
folder to pass as --src) and what the dataset should contain, in key order, so that tests
can compare a source's output against ground truth rather than against itself.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- image helpers


def _pattern(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A distinct, cheap-to-encode RGB image (w, h) = size."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(30, 226, size=3, dtype=np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return img


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------- ImageFolder / ImageNet

IMAGENET_WNIDS = ("n01440764", "n01443537", "n02102040")


def make_imagefolder(root, classes=IMAGENET_WNIDS, per_class=4, size=(500, 375),
                     val_per_class=2, extras=True) -> dict:
    """ImageNet-style SRC/train/<wnid>/<wnid>_<i>.JPEG and SRC/val/<wnid>/ILSVRC2012_val_*.JPEG.

    extras adds what real trees contain: a non-image file in a class folder, a hidden file,
    a lower-case .png, and a devkit folder next to the splits."""
    root = str(root)
    samples = {"train": [], "val": []}
    n = 0
    for ci, c in enumerate(sorted(classes)):
        for i in range(per_class):
            rel = f"train/{c}/{c}_{i}.JPEG"
            _write(os.path.join(root, rel), jpeg_bytes(_pattern(n, size)))
            samples["train"].append((rel, c))
            n += 1
        for i in range(val_per_class):
            rel = f"val/{c}/ILSVRC2012_val_{ci * val_per_class + i + 1:08d}.JPEG"
            _write(os.path.join(root, rel), jpeg_bytes(_pattern(n, size)))
            samples["val"].append((rel, c))
            n += 1
    if extras:
        c0 = sorted(classes)[0]
        rel = f"train/{c0}/{c0}_extra.png"
        _write(os.path.join(root, rel), png_bytes(Image.fromarray(_pattern(999, (40, 30)))))
        samples["train"] = sorted(samples["train"][:per_class] + [(rel, c0)]) + samples["train"][per_class:]
        _write(os.path.join(root, f"train/{c0}/README.txt"), b"not an image\n")
        _write(os.path.join(root, f"train/{c0}/.DS_Store"), b"\0\0")
        _write(os.path.join(root, "ILSVRC2012_devkit_t12/data/meta.txt"), b"devkit\n")
    return {"root": root, "classes": sorted(classes), "samples": samples}


# ---------------------------------------------------------------- CIFAR-100 (python version)

CIFAR_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
              "bicycle", "bottle"] + [f"fine_{i:03d}" for i in range(10, 100)]
CIFAR_COARSE = ["aquatic_mammals", "fish"] + [f"coarse_{i:02d}" for i in range(2, 20)]


def _py2_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the CIFAR files: str/bytes as
    BINSTRING opcodes (read back as bytes with encoding='bytes') and numpy's reconstruct
    function under its numpy 1.x name numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2str
    dispatch[str] = save_py2str

    def save_global(self, obj, name=None):
        if obj is _py2_reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def make_cifar100(root, n_train=20, n_test=10, seed=0) -> dict:
    """root/cifar-100-python/{train,test,meta} as in cifar-100-python.tar.gz."""
    root = str(root)
    base = os.path.join(root, "cifar-100-python")
    rng = np.random.default_rng(seed)
    out = {"root": base, "parent": root, "classes": list(CIFAR_FINE), "splits": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        names = [f"image_{split}_{i}.png".encode() for i in range(n)]
        d = {b"filenames": names, b"batch_label": f"{split}ing batch 1 of 1".encode(),
             b"fine_labels": fine, b"coarse_labels": coarse, b"data": data}
        _write(os.path.join(base, split), py2_pickle(d))
        out["splits"][split] = (data, fine)
    meta = {b"fine_label_names": [n.encode() for n in CIFAR_FINE],
            b"coarse_label_names": [n.encode() for n in CIFAR_COARSE]}
    _write(os.path.join(base, "meta"), py2_pickle(meta))
    return out


# ---------------------------------------------------------------- Tiny ImageNet

TINY_WNIDS = ("n02124075", "n01443537", "n04067472")  # wnids.txt is not sorted in the release
TINY_WORDS = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus",
              "n04067472": "reel", "n00001740": "entity"}


def make_tinyimagenet(root, wnids=TINY_WNIDS, per_class=3, n_val=6, n_test=2, size=(64, 64)) -> dict:
    """root/tiny-imagenet-200/ like the release: wnids.txt, words.txt (with more wnids than
    used), train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt, val/images +
    val_annotations.txt, test/images."""
    base = os.path.join(str(root), "tiny-imagenet-200")
    _write(os.path.join(base, "wnids.txt"), "".join(f"{w}\n" for w in wnids).encode())
    _write(os.path.join(base, "words.txt"),
           "".join(f"{w}\t{n}\n" for w, n in TINY_WORDS.items()).encode())
    srt = sorted(wnids)
    samples = {"train": [], "val": [], "test": []}
    n = 0
    for w in srt:
        boxes = []
        for i in range(per_class):
            rel = f"train/{w}/images/{w}_{i}.JPEG"
            _write(os.path.join(base, rel), jpeg_bytes(_pattern(n, size)))
            samples["train"].append((f"tiny-imagenet-200/{rel}", w))
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
            n += 1
        _write(os.path.join(base, f"train/{w}/{w}_boxes.txt"), "".join(boxes).encode())
    ann = []
    for i in range(n_val):
        w = wnids[i % len(wnids)]
        fn = f"val_{i}.JPEG"
        _write(os.path.join(base, "val/images", fn), jpeg_bytes(_pattern(n, size)))
        ann.append(f"{fn}\t{w}\t0\t4\t60\t62\n")
        samples["val"].append((f"tiny-imagenet-200/val/images/{fn}", w))
        n += 1
    _write(os.path.join(base, "val/val_annotations.txt"), "".join(ann).encode())
    samples["val"].sort()
    for i in range(n_test):
        fn = f"test_{i}.JPEG"
        _write(os.path.join(base, "test/images", fn), jpeg_bytes(_pattern(n, size)))
        samples["test"].append((f"tiny-imagenet-200/test/images/{fn}", None))
        n += 1
    return {"root": base, "parent": str(root), "classes": srt, "words": TINY_WORDS, "samples": samples}


# ---------------------------------------------------------------- PASCAL VOC2012

def voc_xml(image_id: str, objects, size=(500, 375)) -> bytes:
    """An annotation in VOC2012's format; objects: (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = [f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
             "\t<source>\n\t\t<database>The VOC2008 Database</database>\n"
             "\t\t<annotation>PASCAL VOC2008</annotation>\n\t\t<image>flickr</image>\n\t</source>\n"
             f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
             "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"]
    for name, (x0, y0, x1, y1), difficult in objects:
        part = ""
        if name == "person":  # person boxes carry body-part boxes that must not be read as objects
            part = ("\t\t<part>\n\t\t\t<name>head</name>\n\t\t\t<bndbox>\n\t\t\t\t<xmin>1</xmin>"
                    "<ymin>1</ymin><xmax>400</xmax><ymax>300</ymax>\n\t\t\t</bndbox>\n\t\t</part>\n")
        parts.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<occluded>0</occluded>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
            f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n"
            f"\t\t<difficult>{int(difficult)}</difficult>\n{part}\t</object>\n")
    parts.append("</annotation>\n")
    return "".join(parts).encode()


BILLION_LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
                  b' <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">\n]>\n'
                  b"<annotation><object><name>&lol2;</name></object></annotation>\n")

# (id, split, objects or raw XML bytes, expected class or None=excluded or "error", has_jpeg)
VOC_SPEC = [
    ("2008_000001", "train", [("person", (10, 10, 100, 200), 0)], "person", True),
    ("2008_000002", "train", [("person", (10, 10, 50, 50), 0), ("car", (1, 1, 300, 200), 0)], "car", True),
    # the larger dog is difficult, so the smaller, non-difficult cat wins
    ("2008_000003", "train", [("dog", (1, 1, 400, 300), 1), ("cat", (5, 5, 50, 50), 0)], "cat", True),
    # all difficult: the largest of them
    ("2008_000004", "train", [("cat", (1, 1, 20, 20), 1), ("bicycle", (1, 1, 90, 90), 1)], "bicycle", True),
    ("2008_000005", "train", [("aeroplane", (1, 1, 400, 300), 0), ("chair", (1, 1, 50, 50), 0)], None, True),
    # equal areas (10x20 and 20x10): the earlier object wins; non-target larger object ignored
    ("2008_000006", "train", [("sofa", (1, 1, 400, 300), 0), ("dog", (1, 1, 10, 20), 0),
                              ("car", (1, 1, 20, 10), 0)], "dog", True),
    ("2008_000007", "train", b"<annotation><object><name>cat</name>", "error", True),
    ("2008_000008", "train", BILLION_LAUGHS, "error", True),
    ("2008_000009", "train", [("car", (1, 1, 40, 40), 0)], "error", False),  # JPEG missing
    ("2008_000010", "val", [("dog", (1, 1, 40, 40), 0), ("person", (1, 1, 30, 50), 0)], "dog", True),
    ("2008_000011", "val", [("boat", (1, 1, 40, 40), 0)], None, True),
    ("2008_000012", "val", [("person", (3.5, 2.0, 100.5, 80.0), 0)], "person", True),
]


def make_voc(root, spec=VOC_SPEC, size=(120, 90)) -> dict:
    """root/VOCdevkit/VOC2012/{JPEGImages,Annotations,ImageSets/Main/{train,val}.txt}."""
    base = os.path.join(str(root), "VOCdevkit", "VOC2012")
    lists = {"train": [], "val": []}
    samples = {"train": [], "val": []}
    for n, (image_id, split, objs, expected, has_jpeg) in enumerate(spec):
        xml = objs if isinstance(objs, bytes) else voc_xml(image_id, objs)
        _write(os.path.join(base, "Annotations", f"{image_id}.xml"), xml)
        if has_jpeg:
            _write(os.path.join(base, "JPEGImages", f"{image_id}.jpg"), jpeg_bytes(_pattern(n, size)))
        lists[split].append(image_id)
        if expected is not None:
            samples[split].append((f"VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg", expected))
    # an image in no list, and the per-class lists that the real ImageSets/Main holds
    _write(os.path.join(base, "JPEGImages", "2008_999999.jpg"), jpeg_bytes(_pattern(1, size)))
    for split, ids in lists.items():
        _write(os.path.join(base, "ImageSets", "Main", f"{split}.txt"),
               "".join(f"{i}\n" for i in ids).encode())
        _write(os.path.join(base, "ImageSets", "Main", f"car_{split}.txt"),
               "".join(f"{i} -1\n" for i in ids).encode())
    return {"root": str(root), "voc": base, "samples": samples}


# ---------------------------------------------------------------- WebDataset (img2dataset-like)

def _add(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_wds(root, n_shards=3, per_shard=4, size=(64, 48), n_classes=5) -> dict:
    """img2dataset-like output: root/{00000..}.tar with {key}.jpg, {key}.cls, {key}.json,
    keys "<shard:05d><index:04d>", plus the .parquet / _stats.json files img2dataset writes."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    tars, samples = [], []
    for s in range(n_shards):
        path = os.path.join(root, f"{s:05d}.tar")
        keys = []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                label = (s * per_shard + i) % n_classes
                _add(tf, f"{key}.jpg", jpeg_bytes(_pattern(s * 1000 + i, size)))
                _add(tf, f"{key}.cls", str(label).encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                keys.append((key, label))
        _write(os.path.join(root, f"{s:05d}.parquet"), b"PAR1")
        _write(os.path.join(root, f"{s:05d}_stats.json"), b"{}")
        tars.append(path)
        samples.append(keys)
    return {"root": root, "tars": tars, "samples": samples,
            "pattern": os.path.join(root, "{00000..%05d}.tar" % (n_shards - 1))}


def make_tar(path, members) -> str:
    """A tar with the given (name, bytes) members, in order."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with tarfile.open(str(path), "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            _add(tf, name, data)
    return str(path)


# ---------------------------------------------------------------- bad and odd images

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but carries almost no data (nothing is allocated)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def make_bad_images(d) -> dict:
    """Corrupt and odd-mode files.  Returns name -> (path, expected): expected is the start
    of the DecodeError reason, or None for files that must decode.

    Contents of the valid ones (all 64×64 unless said):
    - mode_RGBA.png: left half opaque red, right half fully transparent (stored black)
    - mode_P_transparent.png: left half palette blue, right half the transparent index (black)
    - mode_P.png: palette image, all green
    - mode_LA.png: left half black opaque, right half transparent
    - mode_L.jpg: gray 128;  mode_1.png: left half black, right half white
    - mode_CMYK.jpg: CMYK (0, 255, 255, 0) = red
    - mode_I16.png: 16-bit gray, column c has value c * 1040 (0 .. 65520)
    - exif_rot6.jpg: stored 64 wide × 32 high, gray with a red 16×16 block at the stored
      top-left, EXIF orientation 6 (display = stored rotated 90° clockwise: 32×64, red block
      at the top-right)
    """
    d = str(d)
    os.makedirs(d, exist_ok=True)
    out = {}

    def put(name, data, expected):
        out[name] = (_write(os.path.join(d, name), data), expected)

    good = jpeg_bytes(_pattern(7, (64, 64)))
    put("empty.jpg", b"", "empty file")
    put("truncated.jpg", jpeg_bytes(_pattern(8, (256, 256)))[:1500], "truncated or corrupt image")
    put("truncated.png", png_bytes(Image.fromarray(_pattern(9, (128, 128))))[:300],
        "truncated or corrupt image")
    put("text.jpg", b"this is not a JPEG, just text\n", "not an image")
    put("tiny.png", png_bytes(Image.new("RGB", (8, 8), (200, 10, 10))), "image too small")
    put("bomb.png", _png_header_only(20000, 20000), "decompression bomb")
    # between 1x and 2x PIL's limit (PIL only warns there)
    put("bomb_warn.png", _png_header_only(10000, 10000), "decompression bomb")
    put("good.jpg", good, None)

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)
    put("mode_RGBA.png", png_bytes(Image.fromarray(rgba, "RGBA")), None)

    p = Image.new("P", (64, 64), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 32, 64))
    put("mode_P_transparent.png", png_bytes(p, transparency=0), None)
    pg = Image.new("P", (64, 64), 0)
    pg.putpalette([0, 200, 0] + [0] * 765)
    put("mode_P.png", png_bytes(pg), None)

    la = np.zeros((64, 64, 2), np.uint8)
    la[:, :32, 1] = 255
    put("mode_LA.png", png_bytes(Image.fromarray(la, "LA")), None)
    put("mode_L.jpg", jpeg_bytes(np.full((64, 64), 128, np.uint8)), None)
    one = Image.new("1", (64, 64), 0)
    one.paste(1, (32, 0, 64, 64))
    put("mode_1.png", png_bytes(one), None)

    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    put("mode_CMYK.jpg", buf.getvalue(), None)

    i16 = np.tile((np.arange(64, dtype=np.uint16) * 1040)[None, :], (64, 1))
    put("mode_I16.png", png_bytes(Image.fromarray(i16)), None)

    rot = np.full((32, 64, 3), 128, np.uint8)
    rot[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rot6.jpg", jpeg_bytes(rot, quality=95, exif=exif.tobytes()), None)
    return out
