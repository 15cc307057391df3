"""Build a small, valid dataset directory with the manifests writers alone.

Independent of `dynaprep index` on purpose: trainer and validator tests need shards whose
content they control (and can corrupt) without going through the pipeline.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dynavit.manifests import (
    DatasetInfo,
    KInfo,
    ShardPairWriter,
    SplitCounts,
    k_count,
    key_for,
    write_dataset_info,
    write_manifest,
    write_shards,
)
from dynavit.manifests.io import write_table_atomic
from dynavit.manifests.schema import MANIFEST_PARQUET, MANIFEST_SCHEMA_NO_OFFSETS, OFFSET_COLUMNS


def class_image(label: int, rng: np.random.Generator, size: int, n_classes: int) -> np.ndarray:
    """Noise with one bright square whose position encodes the label: learnable in a few steps."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    s = size // 4
    r, c = divmod(label % 16, 4)
    img[r * s:(r + 1) * s, c * s:(c + 1) * s, label % 3] = 250
    return img


def band_image(label: int, rng: np.random.Generator, size: int, n_classes: int) -> np.ndarray:
    """Noise with one bright full-width band (row label % 4, channel label // 4 % 3): the
    label survives a horizontal flip, so flip-augmented training can learn it."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    s = size // 4
    r = label % 4
    img[r * s:(r + 1) * s, :, (label // 4) % 3] = 250
    return img


PALETTE = np.array([[250, 40, 40], [40, 250, 40], [40, 40, 250], [250, 250, 40], [250, 40, 250],
                    [40, 250, 250], [250, 140, 40], [140, 40, 250], [250, 250, 250], [140, 140, 140]], np.uint8)


def color_image(label: int, rng: np.random.Generator, size: int, n_classes: int) -> np.ndarray:
    """Noise with one square of the class's palette colour at a random place: the label is
    in the colour alone, so it survives flips and crops and a tiny ViT learns it in a few
    epochs without the long plateau that position-coded labels have."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    s = size // 2
    r, c = rng.integers(0, size - s + 1, size=2)
    img[r:r + s, c:c + s] = PALETTE[label % len(PALETTE)]
    return img


def patch_std_scores(img: np.ndarray, patch: int) -> np.ndarray:
    h, w, _ = img.shape
    p = img.astype(np.float64).reshape(h // patch, patch, w // patch, patch, 3)
    return p.std(axis=(1, 3, 4))


def topk_sets(scores: np.ndarray, ks) -> dict[int, np.ndarray]:
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    return {k: np.sort(order[: k_count(k, flat.size)]) for k in ks}


def make_tiny_dataset(out, splits=(("train", 24), ("val", 12)), image_size=32, patch=4, ks=(50, 25),
                      scorers=("l2",), shard_size=10, n_classes=4, seed=0, class_sorted=False,
                      image_fn=class_image, offsets: bool = True) -> DatasetInfo:
    """`offsets=False` writes manifest.parquet without the image offset columns (an older
    dynaprep's). `class_sorted`: labels in blocks (all of class 0, then class 1, …), as ImageFolder,
    ImageNet and Tiny-ImageNet list their samples; otherwise labels cycle 0, 1, 2, …"""
    out = Path(out)
    rng = np.random.default_rng(seed)
    n = (image_size // patch) ** 2
    manifest, shards = [], []
    info = DatasetInfo(
        dataset="tiny", source="tests", image_size=(image_size, image_size), patch_size=patch,
        scorers=list(scorers), ks=[KInfo(k, k_count(k, n), 1 + k_count(k, n)) for k in ks],
        classes=[f"class{i}" for i in range(n_classes)], image_format="png", quality=None,
        shard_size=shard_size,
    )
    for split, count in splits:
        n_shards = (count + shard_size - 1) // shard_size
        for shard in range(n_shards):
            writer = ShardPairWriter(out, split, shard, scorers, ks, n, image_ext="png")
            for ordinal in range(shard * shard_size, min(count, (shard + 1) * shard_size)):
                label = int(ordinal * n_classes // count) if class_sorted else int(ordinal % n_classes)
                img = image_fn(label, rng, image_size, n_classes)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                scores = patch_std_scores(img, patch)
                offset, size = writer.add(key_for(ordinal), buf.getvalue(), label,
                                          {s: scores for s in scorers}, {s: topk_sets(scores, ks) for s in scorers})
                manifest.append({"split": split, "key": key_for(ordinal), "shard": shard, "label": label,
                                 "class_name": info.classes[label], "source": f"synthetic:{split}:{ordinal}",
                                 "orig_width": image_size, "orig_height": image_size, "status": "ok",
                                 "error": None, "sha256": None, "image_offset": offset, "image_bytes": size})
            shards.append(writer.commit())
        info.splits[split] = SplitCounts(ok=count, failed=0, shards=n_shards)
    if offsets:
        write_manifest(out, manifest)
    else:  # as a dynaprep from before the offset columns wrote it
        write_table_atomic(out / MANIFEST_PARQUET, [{k: v for k, v in r.items() if k not in OFFSET_COLUMNS}
                                                    for r in manifest], MANIFEST_SCHEMA_NO_OFFSETS)
    write_shards(out, shards)
    write_dataset_info(out, info)
    return info
