"""Typed schemas of the on-disk contract (docs/FORMAT.md).

`dataset.json` is a dataclass (`DatasetInfo`); the two Parquet manifests are pyarrow
schemas, so a column that drifts in type is caught at write time, not by the trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

DATASET_JSON = "dataset.json"
# Every saliency scorer (docs/FORMAT.md defines each): the Numba kernels, their torch twins
# and the CLIs take the names from here, and a dataset.json naming another is invalid (the
# name becomes part of its index shards' file names).
SCORER_NAMES = ("l2", "sobel", "entropy", "contrast", "distinct")
# What `dynaprep index` scores with when --scorer is not given. Not the paper's l2: on real
# scans and photos l2 kept flat background and trained worse than random patches, entropy
# beat random at K=50 and K=25 on every set (docs/BENCHMARKS.md, "Scorers on real data").
# l2 stays selectable by name (--scorer l2) and is what the paper's numbers use.
DEFAULT_SCORER = "entropy"
MANIFEST_PARQUET = "manifest.parquet"
SHARDS_PARQUET = "shards.parquet"

# Member suffixes of a sample (docs/FORMAT.md), the one place that names them.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "gif", "bmp", "tif", "tiff")  # webdataset's own image extensions, then what folders and predict also read (decoded with PIL)
CLS_EXT = "cls"  # integer label as ASCII
SCORES_EXT = "scores.npy"  # float16 [Gh, Gw]


def k_ext(k_percent: int) -> str:
    """Suffix of the kept-index array for K (e.g. "k70.npy")."""
    return f"k{int(k_percent)}.npy"


STATUS_OK = "ok"
STATUS_FAILED = "failed"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        # The work unit the input belongs to; failed rows keep it so a re-run knows which
        # shard to redo. Not a guarantee that the sample is inside that shard.
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("sha256", pa.string()),
        # Where the sample's image member lies in its image shard (ours, or the user's tar
        # indexed in place): byte offset of the member's data (its 512-byte tar header sits
        # just before it) and its length. The trainer reads by these instead of scanning the
        # tar's headers. Null on failed rows, on a compressed user tar (not readable by
        # offset), and in datasets written before the columns existed (the reader then scans).
        pa.field("image_offset", pa.int64()),
        pa.field("image_bytes", pa.int64()),
    ]
)
# The offset columns are the last ones, so a manifest without them (written by an older
# dynaprep) is this schema minus those fields; manifests.io reads it with them null.
OFFSET_COLUMNS = ("image_offset", "image_bytes")
MANIFEST_SCHEMA_NO_OFFSETS = pa.schema([f for f in MANIFEST_SCHEMA if f.name not in OFFSET_COLUMNS])

INDEX_FILE_TYPE = pa.struct(
    [
        pa.field("scorer", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

SHARDS_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        # Relative to the dataset directory, or absolute for images kept in the user's own
        # WebDataset (`--data wds`: only index shards are written).
        pa.field("images", pa.string(), nullable=False),
        pa.field("images_bytes", pa.int64(), nullable=False),
        pa.field("images_sha256", pa.string(), nullable=False),
        pa.field("index", pa.list_(INDEX_FILE_TYPE), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ]
)


@dataclass
class SplitCounts:
    ok: int = 0
    failed: int = 0
    shards: int = 0


@dataclass
class KInfo:
    k: int  # percent of patches kept
    kept: int  # max(1, floor(k·N/100)) patches
    seq_len: int  # kept + prefix tokens (CLS) of a standard ViT


@dataclass
class DatasetInfo:
    """`dataset.json`. Written last: its presence means the directory is complete."""

    dataset: str
    source: str
    image_size: tuple[int, int]  # (H, W) of every stored image
    patch_size: int
    scorers: list[str]
    ks: list[KInfo]
    classes: list[str]
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    resize: dict[str, Any] = field(default_factory=lambda: {"policy": "center-crop", "crop_pct": 0.875})
    image_format: str = "jpg"
    quality: int | None = 95
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    external_images: bool = False
    # external_images: the folder or URL prefix the image shards lie under; shards.parquet
    # names each relative to it (absolute paths: datasets written before the field existed).
    # A trainer may override it (`--images-root`) when the tars have moved.
    images_root: str | None = None
    # Which patches top-K may keep: {"policy": "none"} (the paper's plain scores) or
    # {"policy": "pad-aware", ...}: constant letterbox borders never win (pipeline/padding.py).
    padding: dict[str, Any] = field(default_factory=lambda: {"policy": "none"})
    # Share of flat patches (no variation) each scorer keeps vs a random selection, per split,
    # and warnings where a scorer keeps markedly more (docs/FORMAT.md, pipeline/flatness.py).
    # None: not measured (datasets written before the field existed).
    flat_patches: dict[str, Any] | None = None
    # Where labels come from: {"from": "source"} (the layout: folders, annotations), or for
    # a wds the `label` option: "auto"/"cls" (the .cls member), "txt", "json:FIELD", "none".
    labels: dict[str, Any] = field(default_factory=lambda: {"from": "source"})
    # Write order of the splits: {"policy": "shuffle", "seed": S} or {"policy": "source"}
    # (datasets written before this field existed were in source order).
    order: dict[str, Any] = field(default_factory=lambda: {"policy": "source"})
    shard_size: int = 1000
    tool_version: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def k_values(self) -> list[int]:
        return [k.k for k in self.ks]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        d["image_size"] = list(self.image_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetInfo":
        version = d.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"unknown format_version {version!r}: this dynavit reads {list(SUPPORTED_FORMAT_VERSIONS)}"
            )
        d = dict(d)
        d.pop("grid", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"dataset.json has unknown fields {unknown}")
        try:
            d["image_size"] = tuple(int(v) for v in d["image_size"])
            d["mean"] = tuple(float(v) for v in d.get("mean", cls.mean))
            d["std"] = tuple(float(v) for v in d.get("std", cls.std))
            d["ks"] = [KInfo(**k) for k in d["ks"]]
            d["splits"] = {name: SplitCounts(**c) for name, c in d.get("splits", {}).items()}
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"dataset.json is malformed: {e}") from None


class FormatError(ValueError):
    """The on-disk data does not follow the contract (or a version this reader knows)."""


def key_for(ordinal: int) -> str:
    """Keys are the sample's ordinal in its split, zero-padded (decimal, no dots)."""
    return f"{ordinal:010d}"


def image_shard_name(split: str, shard: int) -> str:
    return f"{split}/images-{shard:06d}.tar"


def index_shard_name(split: str, scorer: str, shard: int) -> str:
    return f"{split}/topk-{scorer}-{shard:06d}.tar"


def k_count(k_percent: int, n: int) -> int:
    """Patches kept at K percent of n (docs/FORMAT.md 'Top-K'): max(1, floor(K·n/100)), exact integers.
    The one definition; everything that needs a kept count calls it."""
    if isinstance(k_percent, bool) or not isinstance(k_percent, int) and not hasattr(k_percent, "__index__"):
        raise ValueError(f"K must be an integer percentage in 1..100, got {k_percent!r}")
    k = int(k_percent)
    if not 1 <= k <= 100:
        raise ValueError(f"K must be in 1..100, got {k_percent!r}")
    if n < 1:
        raise ValueError(f"grid must have at least one patch, got n={n}")
    return max(1, k * int(n) // 100)


def seq_len(k_percent: int, n: int, num_prefix: int = 1) -> int:
    """Model sequence length S: kept patches + prefix tokens (1 CLS, plus any registers).
    Equals 1 + floor(K·n/100) for a plain ViT except when that floor is 0: one patch is
    still kept, so S=2."""
    return num_prefix + k_count(k_percent, n)


def index_dtype_name(n: int) -> str:
    return "uint8" if n <= 256 else "uint16"
