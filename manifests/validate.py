"""Check a dataset directory against the contract (DESIGN.md §3–5).

`validate_dataset` reports every violation it finds, each with the file it is in, instead
of stopping at the first: a user fixing a broken directory wants the whole list.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samples import ShardError, UnsafeRowError, image_shard_path, index_shard_path, moved_hint
from .io import iter_tar_samples, npy_load, read_dataset_info, read_manifest, read_shards, sha256_file
from .schema import (
    DATASET_JSON,
    MANIFEST_PARQUET,
    SCORER_NAMES,
    SHARDS_PARQUET,
    STATUS_FAILED,
    STATUS_OK,
    IMAGE_EXTS,
    DatasetInfo,
    FormatError,
    index_dtype_name,
    k_count,
)



def _check_flat(info: DatasetInfo, bad) -> None:
    """flat_patches (docs/FORMAT.md): null, or per split counts that add up."""
    fp = info.flat_patches
    if fp is None:
        return
    try:
        splits = dict(fp["splits"])
    except (KeyError, TypeError, ValueError) as e:
        bad(DATASET_JSON, f"flat_patches is malformed ({type(e).__name__}: {e})")
        return
    for split, fig in splits.items():
        try:
            _check_flat_split(info, split, fig, bad)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            bad(DATASET_JSON, f"flat_patches[{split!r}] is malformed ({type(e).__name__}: {e})")


def _check_flat_split(info: DatasetInfo, split: str, fig: dict, bad) -> None:
    if split not in info.splits:
        bad(DATASET_JSON, f"flat_patches names split {split!r}, which is not in splits")
    n, flat = int(fig["images"]), int(fig["flat"])
    if not 0 <= flat <= int(fig["patches"]) == n * info.num_patches:
        bad(DATASET_JSON, f"flat_patches[{split!r}]: {flat} flat of {fig['patches']} patches "
            f"on {n} images of {info.num_patches} patches")
    for scorer, by_k in fig["kept_flat"].items():
        if scorer not in SCORER_NAMES:
            bad(DATASET_JSON, f"flat_patches[{split!r}] names unknown scorer {scorer!r}")
        for k, v in by_k.items():
            if not 0 <= int(v) <= int(fig["kept"][scorer][k]) == n * k_count(int(k), info.num_patches):
                bad(DATASET_JSON, f"flat_patches[{split!r}][{scorer!r}] K={k}: {v} flat of "
                    f"{fig['kept'][scorer][k]} kept on {n} images")
    for w in fig["warnings"]:
        if w["scorer"] not in info.scorers or (w["better"] is not None and w["better"] not in SCORER_NAMES):
            bad(DATASET_JSON, f"flat_patches[{split!r}] warning names unknown scorers {w['scorer']!r}, "
                f"{w['better']!r}")


@dataclass(frozen=True)
class Violation:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def validate_dataset(out_dir, check_checksums: bool = True, images_root: str | None = None,
                     trust_urls: bool = False) -> list[Violation]:
    """Every violation of the contract in `out_dir`. `images_root` overrides where a user's
    WebDataset lies (dataset.json's `images_root`), for tars that moved. A URL or command
    that the folder itself names is a violation unless `trust_urls` (see image_shard_path)."""
    out_dir = Path(out_dir)
    found: list[Violation] = []

    def bad(file, message):
        found.append(Violation(str(file), message))

    try:
        info = read_dataset_info(out_dir)
    except FormatError as e:
        bad(DATASET_JSON, str(e))
        return found
    try:
        manifest = read_manifest(out_dir).to_pylist()
    except (FormatError, OSError) as e:
        bad(MANIFEST_PARQUET, str(e))
        manifest = None
    try:
        shards = read_shards(out_dir).to_pylist()
    except (FormatError, OSError) as e:
        bad(SHARDS_PARQUET, str(e))
        shards = None

    unknown = [s for s in info.scorers if s not in SCORER_NAMES]
    if unknown or not info.scorers:
        bad(DATASET_JSON, f"unknown scorer(s) {unknown or '(none)'}; valid: {', '.join(SCORER_NAMES)}")
    _check_flat(info, bad)
    for k in info.ks:
        if (k.kept, k.seq_len) != (k_count(k.k, info.num_patches), 1 + k_count(k.k, info.num_patches)):
            bad(DATASET_JSON, f"ks entry K={k.k} says kept={k.kept}, seq_len={k.seq_len}; the grid "
                f"{info.grid} gives {k_count(k.k, info.num_patches)} and {1 + k_count(k.k, info.num_patches)}")
    expected_keys: dict[tuple[str, int], list[str]] = defaultdict(list)
    labels: dict[tuple[str, str], int | None] | None = None  # (split, key) -> label of ok rows
    recorded: dict[tuple[str, str], tuple[int, int]] = {}  # (split, key) -> image (offset, bytes) of ok rows
    if manifest is not None:
        _check_manifest(info, manifest, bad)
        labels = {}
        for row in manifest:
            if row["status"] == STATUS_OK:
                expected_keys[(row["split"], row["shard"])].append(row["key"])
                labels[(row["split"], row["key"])] = row["label"]
                if row["image_offset"] is not None:
                    recorded[(row["split"], row["key"])] = (row["image_offset"], row["image_bytes"])
    if shards is None:
        return found

    shard_counts = Counter(row["split"] for row in shards)
    for split, counts in info.splits.items():
        if shard_counts.get(split, 0) != counts.shards:
            bad(SHARDS_PARQUET, f"split {split!r}: {shard_counts.get(split, 0)} shard rows, dataset.json says {counts.shards}")
    seen_shards = set()
    for row in shards:
        ident = (row["split"], row["shard"])
        if ident in seen_shards:
            bad(SHARDS_PARQUET, f"shard {ident} listed twice")
        seen_shards.add(ident)
        keys = _check_shard(out_dir, info, row, bad, check_checksums, labels, images_root, trust_urls, recorded)
        if keys is not None and manifest is not None:
            want = expected_keys.get(ident, [])
            if keys != want:
                bad(row["images"], f"keys in shard differ from the manifest's ok rows for {ident} "
                    f"({len(keys)} in shard, {len(want)} in manifest)")
    if manifest is not None:
        for ident in sorted(set(expected_keys) - seen_shards):
            bad(MANIFEST_PARQUET, f"{len(expected_keys[ident])} ok rows point at shard {ident}, which is not in {SHARDS_PARQUET}")
    return found


def _check_manifest(info: DatasetInfo, rows: list[dict], bad) -> None:
    # A user's tar may repeat a key (dynaprep fails the repeats); ours never do.
    counted = [r for r in rows if r["status"] == STATUS_OK] if info.external_images else rows
    keys = Counter((r["split"], r["key"]) for r in counted)
    for (split, key), n in keys.items():
        if n > 1:
            bad(MANIFEST_PARQUET, f"key {key!r} appears {n} times in split {split!r}")
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        counts[r["split"]][r["status"]] += 1
        if r["status"] not in (STATUS_OK, STATUS_FAILED):
            bad(MANIFEST_PARQUET, f"{r['split']}/{r['key']}: status {r['status']!r} is not ok|failed")
        elif r["status"] == STATUS_FAILED and not r["error"]:
            bad(MANIFEST_PARQUET, f"{r['split']}/{r['key']}: failed row without an error message")
        if "." in r["key"]:
            bad(MANIFEST_PARQUET, f"{r['split']}/{r['key']}: key contains a dot")
        if (r["image_offset"] is None) != (r["image_bytes"] is None) or (r["image_offset"] or 0) < 0 \
                or (r["image_bytes"] or 0) < 0:
            bad(MANIFEST_PARQUET, f"{r['split']}/{r['key']}: image_offset {r['image_offset']} / image_bytes "
                f"{r['image_bytes']}: both null or both non-negative")
        if r["label"] is not None and info.classes and not 0 <= r["label"] < len(info.classes):
            bad(MANIFEST_PARQUET, f"{r['split']}/{r['key']}: label {r['label']} outside 0..{len(info.classes) - 1}")
    for split in sorted(set(counts) | set(info.splits)):
        c, want = counts.get(split, Counter()), info.splits.get(split)
        if want is None:
            bad(DATASET_JSON, f"split {split!r} is in the manifest but not in dataset.json")
        elif (c[STATUS_OK], c[STATUS_FAILED]) != (want.ok, want.failed):
            bad(MANIFEST_PARQUET, f"split {split!r}: {c[STATUS_OK]} ok / {c[STATUS_FAILED]} failed rows, "
                f"dataset.json says {want.ok} / {want.failed}")
        elif want.ok == 0:  # nothing to train or evaluate on is not a valid dataset
            bad(MANIFEST_PARQUET, f"split {split!r} has 0 usable samples ({want.failed} failed; "
                "`dynaprep show`/manifest.parquet give the reasons)")


def _check_file(path, rel: str, size: int, digest: str, bad, check_checksums: bool) -> Path | None:
    """`path`: where shard `rel` (as shards.parquet names it) was found, already checked to
    be under the dataset folder or the images root."""
    path = Path(path)
    if not path.is_file():
        bad(rel, "missing shard file")
        return None
    if check_checksums:
        actual, actual_size = sha256_file(path)
        if (actual, actual_size) != (digest, size):
            bad(rel, f"checksum mismatch (sha256 {actual[:12]}…/{actual_size} B, shards.parquet says {digest[:12]}…/{size} B)")
    return path


def _check_shard(out_dir, info: DatasetInfo, row: dict, bad, check_checksums: bool,
                 labels: dict | None = None, images_root: str | None = None,
                 trust_urls: bool = False, recorded: dict | None = None) -> list[str] | None:
    """Check one shard pair; return the keys it holds in order (None if unreadable).

    `labels` ((split, key) -> the manifest's label) checks each sample's `.cls` member
    against manifest.parquet: a trainer reads the label from the tar, not the manifest.
    `recorded` ((split, key) -> the manifest's image offset and size) checks them against
    where tarfile finds the sample's image member: the trainer reads there.

    With external images (the user's WebDataset) the image tar may hold samples that failed
    at indexing, so the index keys must be an in-order subsequence of the image keys and
    they, not the image keys, are what the shard holds."""
    try:
        where = image_shard_path(out_dir, info, row, images_root, trust_urls=trust_urls)
    except UnsafeRowError as e:
        bad(SHARDS_PARQUET, str(e))
        return None
    except ShardError as e:
        bad(row["images"], str(e))
        where = None
    if where is not None and info.external_images and not Path(where).is_file():
        bad(row["images"], moved_hint(where, images_root or info.images_root))
        where = None
    shown = where if info.external_images else row["images"]  # ours: named as shards.parquet names it
    images = where and _check_file(where, shown, row["images_bytes"], row["images_sha256"], bad, check_checksums)
    image_keys = None
    if images is not None:
        try:
            image_keys, seen, where = [], set(), {}
            for key, members in iter_tar_samples(images, where):
                repeated = key in seen  # a user's tar: the first copy is the sample
                seen.add(key)
                image_keys.append(key)
                if repeated and info.external_images:
                    continue
                if not info.external_images and not any(ext in members for ext in IMAGE_EXTS):
                    bad(row["images"], f"sample {key!r} has no image member (has {sorted(members)})")
                # A user's tar holds a .cls only when labels come from it (img2dataset: json/txt).
                from_cls = not info.external_images or info.labels.get("from") in ("cls", "auto")
                if labels is not None and from_cls and (row["split"], key) in labels:
                    _check_label(key, members.get("cls"), labels[(row["split"], key)], row["images"], bad)
                if recorded and (row["split"], key) in recorded:
                    _check_offset(key, where[key], recorded[(row["split"], key)], row["images"], bad)
        except Exception as e:  # a truncated tar raises tarfile/EOF errors of several kinds
            bad(row["images"], f"unreadable tar: {e}")
            image_keys = None

    scorers = [entry["scorer"] for entry in row["index"]]
    if sorted(scorers) != sorted(info.scorers):
        bad(SHARDS_PARQUET, f"shard {row['split']}/{row['shard']}: index scorers {scorers}, dataset.json says {info.scorers}")
    held = None if info.external_images else image_keys
    for entry in row["index"]:
        try:
            index_path = index_shard_path(out_dir, entry["path"], row)
        except UnsafeRowError as e:
            bad(SHARDS_PARQUET, str(e))
            continue
        path = _check_file(index_path, entry["path"], entry["bytes"], entry["sha256"], bad, check_checksums)
        index_keys = _check_index_shard(path, entry["path"], info, bad) if path is not None else None
        if index_keys is None or image_keys is None:
            continue
        if info.external_images:
            held = held if held is not None else index_keys
            if not _in_order_subsequence(index_keys, image_keys):
                bad(entry["path"], "keys are not an in-order subsequence of the image shard's keys")
        elif index_keys != image_keys:
            first = next((i for i, (a, b) in enumerate(zip(index_keys, image_keys)) if a != b),
                         min(len(index_keys), len(image_keys)))
            bad(entry["path"], f"key order differs from the image shard at position {first} "
                f"({len(index_keys)} samples here, {len(image_keys)} in the image shard)")
    if held is not None and len(held) != row["count"]:
        where = row["index"][0]["path"] if info.external_images else row["images"]
        bad(where, f"{len(held)} samples, shards.parquet says {row['count']}")
    return held


def _check_offset(key: str, found: dict, want: tuple[int, int], rel: str, bad) -> None:
    """The image member (the first of IMAGE_EXTS, as every reader picks it) must be at the
    offset and of the size manifest.parquet records."""
    by_ext = {ext.lower(): at for ext, at in reversed(list(found.items()))}
    ext = next((e for e in IMAGE_EXTS if e in by_ext), None)
    got = by_ext.get(ext)
    if got != tuple(want):
        bad(rel, f"sample {key!r}: manifest.parquet records its image at offset {want[0]}, {want[1]} bytes; "
            f"the tar has it at {f'offset {got[0]}, {got[1]} bytes' if got else 'no image member'}")


def _check_label(key: str, cls: bytes | None, want: int | None, rel: str, bad) -> None:
    if cls is None:
        if want is not None:
            bad(rel, f"sample {key!r}: no .cls member, manifest.parquet says label {want}")
        return
    try:
        got = int(cls.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        got = cls[:20]
    if got != want:
        bad(rel, f"sample {key!r}: .cls says {got!r}, manifest.parquet says label {want!r}")


def _in_order_subsequence(sub: list[str], full: list[str]) -> bool:
    it = iter(full)
    return all(any(key == other for other in it) for key in sub)


def _check_index_shard(path: Path, rel: str, info: DatasetInfo, bad) -> list[str] | None:
    n = info.num_patches
    dtype = np.dtype(index_dtype_name(n))
    try:
        index_keys = []
        for key, members in iter_tar_samples(path):
            index_keys.append(key)
            _check_index_sample(key, members, info, n, dtype, rel, bad)
    except Exception as e:
        bad(rel, f"unreadable tar: {e}")
        return None
    return index_keys


def _check_index_sample(key, members, info: DatasetInfo, n: int, dtype, rel: str, bad) -> None:
    scores = members.get("scores.npy")
    if scores is None:
        bad(rel, f"sample {key!r}: no scores.npy")
    else:
        arr = npy_load(scores)
        if arr.dtype != np.float16 or arr.shape != info.grid:
            bad(rel, f"sample {key!r}: scores.npy is {arr.dtype}{list(arr.shape)}, expected float16{list(info.grid)}")
    previous = None  # K descending: every set must contain the next smaller one (one ranking)
    for k in sorted(info.ks, key=lambda k: -k.k):
        data = members.get(f"k{k.k}.npy")
        if data is None:
            bad(rel, f"sample {key!r}: no k{k.k}.npy")
            continue
        idx = npy_load(data)
        want = k_count(k.k, n)
        if idx.dtype != dtype:
            bad(rel, f"sample {key!r}: k{k.k}.npy dtype {idx.dtype}, expected {dtype}")
        if idx.ndim != 1 or len(idx) != want:
            bad(rel, f"sample {key!r}: k{k.k}.npy has shape {list(idx.shape)}, expected [{want}]")
            continue
        if len(idx) and (int(idx.max()) >= n):
            bad(rel, f"sample {key!r}: k{k.k}.npy index {int(idx.max())} out of range 0..{n - 1}")
        if np.any(np.diff(idx.astype(np.int64)) <= 0):
            bad(rel, f"sample {key!r}: k{k.k}.npy not strictly increasing")
        if previous is not None and not np.isin(idx, previous[1]).all():
            bad(rel, f"sample {key!r}: k{k.k}.npy is not a subset of k{previous[0]}.npy (sets must nest)")
        previous = (k.k, idx)
