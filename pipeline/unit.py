"""One work unit of `dynaprep index`, run in a worker process (or a Ray task):
  source.read_unit -> decode/resize -> score_patches (each scorer) -> top-K for every K
  -> ShardPairWriter (image tar + index tars) -> part files in OUT/.dynaprep/parts/.
The tars are renamed into place first, then the manifest part, then the shard part, so a unit
is done exactly when its shard part exists.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynavit.manifests import (
    MANIFEST_SCHEMA,
    SHARDS_SCHEMA,
    ShardPairWriter,
    write_json_atomic,
)
from dynavit.manifests.inputs import set_max_file_bytes
from dynavit.manifests.io import write_table_atomic
from dynavit.manifests.shards import fragment_paths, join_pieces
from dynavit.manifests.schema import STATUS_FAILED, STATUS_OK

from dynavit.pipeline import flatness
from dynavit.pipeline.decode import DecodeError, encode_image, load_image
from dynavit.pipeline.padding import content_box_from_meta, detect_constant_border, map_box, mask_scores, padding_masks
from dynavit.pipeline.saliency import SCORERS, score_patches
from dynavit.pipeline.sources import open_source
from dynavit.pipeline.topk import select_topk_multi
from dynavit.pipeline.plan import BATCH, IndexConfig, _flat_part, _part, _piece, _piece_rows, _read_flat, _state


# --- one work unit (runs in a worker process) ---------------------------------------------

_worker_source = None
_progress = None
_worker_slots = None  # shared array: slot i holds the PID of the worker that took unit i


PARENT_POLL_S = 1.0


def _watch_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9, the OOM killer) is re-parented and would
    go on forever holding the source open; it exits within PARENT_POLL_S instead."""
    import threading

    def watch():  # checks at once: the parent may be gone before this worker got here
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="dynaprep-parent-watch", daemon=True).start()


def _init_worker(cfg: IndexConfig, counter, threads: int, slots=None, parent: int | None = None) -> None:
    """Each worker opens the source once (CIFAR's pickle is loaded once per process, not per unit).
    `parent`: the main process's pid, passed in (the parent may die while this worker still
    imports, and getppid() would then already be init's)."""
    global _worker_source, _progress, _worker_slots
    _watch_parent(parent or os.getppid())
    _worker_slots = slots
    set_max_file_bytes(cfg.max_file_bytes)
    _worker_source = open_source(cfg.data, cfg.src, **cfg.source_options)

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _progress = progress
    # Workers already use every core; numba's own threads on top would oversubscribe.
    import numba

    numba.set_num_threads(threads)


def _run_unit(cfg: IndexConfig, unit, slot: int) -> tuple[int, int]:
    """process_unit in a pool worker, first recording which process writes which unit, so
    that the main process can name the shard of a worker that dies."""
    _worker_slots[slot] = os.getpid()
    return process_unit(cfg, unit)


def process_unit(cfg: IndexConfig, unit, source=None, progress=None) -> tuple[int, int]:
    """Write one shard pair and its part files (or one piece of it: fragments and its
    manifest rows, see `join_unit`); return (ok, failed) counts."""
    source = source or _worker_source
    progress = progress if progress is not None else _progress
    grid_n = (cfg.image_size // cfg.patch_size) ** 2
    external = source.image_shard(unit) if source.external_images else None
    piece = _piece(cfg.out, unit) if unit.parts > 1 else None
    writer = ShardPairWriter(cfg.out, unit.split, unit.index, cfg.scorers, cfg.ks, grid_n,
                             image_ext=cfg.image_format, external_images=external, piece=piece)
    rows: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []
    seg_masks: dict[str, bytes] = {}  # voc-seg: key -> the fitted mask's PNG (KEY.mask.png)
    flat = _FlatSample(cfg)
    try:
        for raw in source.read_unit(unit):
            row = {"split": unit.split, "key": raw.key, "shard": unit.index, "label": raw.label,
                   "class_name": raw.class_name, "source": raw.source, "orig_width": None,
                   "orig_height": None, "status": STATUS_OK, "error": None, "sha256": None,
                   "image_offset": None, "image_bytes": None}
            rows.append(row)
            if raw.error is not None:
                row.update(status=STATUS_FAILED, error=raw.error)
                if progress:
                    progress(1)
                continue
            row["sha256"] = _sha256(raw.data)
            try:
                decoded = load_image(raw.data, cfg.image_size, cfg.resize, cfg.crop_pct, cfg.patch_size,
                                     keep_size=external is not None)
            except DecodeError as e:
                row.update(status=STATUS_FAILED, error=str(e))
                if progress:
                    progress(1)
                continue
            row["orig_width"], row["orig_height"] = decoded.orig_width, decoded.orig_height
            if raw.mask is not None:
                try:
                    seg_masks[raw.key] = _fitted_mask(cfg, raw.mask, decoded, len(source.classes()))
                except DecodeError as e:
                    row.update(status=STATUS_FAILED, error=str(e))
                    if progress:
                        progress(1)
                    continue
            if external is not None and raw.member is not None:  # where it is in the user's tar
                row["image_offset"], row["image_bytes"] = raw.member
            box = _content_box(cfg, decoded, raw.meta, kept=external is not None) if cfg.pad_aware else None
            pending.append((row, decoded.rgb, box))
            if len(pending) == BATCH:
                _flush(cfg, writer, pending, progress, flat, seg_masks)
        _flush(cfg, writer, pending, progress, flat, seg_masks)
        flat.measure()
        if external is not None and piece is None:
            writer.images_digest = source.image_digest(unit)
        shard_row = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if piece is not None:
        write_json_atomic(Path(f"{piece}.flat.json"), flat.counts)  # before the rows that mark it done
        write_table_atomic(_piece_rows(cfg.out, unit), rows, MANIFEST_SCHEMA)
    else:
        write_json_atomic(_flat_part(cfg.out, unit), flat.counts)
        write_table_atomic(_part(cfg.out, unit, "manifest"), rows, MANIFEST_SCHEMA)
        write_table_atomic(_part(cfg.out, unit, "shard"), [shard_row], SHARDS_SCHEMA)
    ok = sum(r["status"] == STATUS_OK for r in rows)
    return ok, len(rows) - ok


def join_unit(cfg: IndexConfig, source, pieces: list) -> None:
    """Make a unit's shard pair and part files from its finished pieces, in order: the
    same bytes as one worker writing the unit whole. Then its piece files go."""
    unit = pieces[0]
    import pyarrow.compute  # noqa: F401  (pa.compute; main process only, like _classes)

    tables = [pq.read_table(_piece_rows(cfg.out, p), schema=MANIFEST_SCHEMA) for p in pieces]
    counts = [pa.compute.sum(pa.compute.equal(t["status"], STATUS_OK)).as_py() or 0 for t in tables]
    external = source.image_shard(unit) if source.external_images else None
    if external is None:  # a piece's offsets are in its fragment: shift by the fragments before it
        tables = _shift_offsets(tables, [fragment_paths(_piece(cfg.out, p), cfg.scorers)["images"] for p in pieces])
    digest = source.image_digest(unit) if external is not None else None
    shard_row = join_pieces(cfg.out, unit.split, unit.index, cfg.scorers, [_piece(cfg.out, p) for p in pieces],
                            counts, external_images=external, images_digest=digest)
    flats = [_read_flat(Path(f"{_piece(cfg.out, p)}.flat.json")) for p in pieces]
    write_json_atomic(_flat_part(cfg.out, unit), flatness.merge_counts(flats) if None not in flats else None)
    write_table_atomic(_part(cfg.out, unit, "manifest"), pa.concat_tables(tables).combine_chunks(), MANIFEST_SCHEMA)
    write_table_atomic(_part(cfg.out, unit, "shard"), [shard_row], SHARDS_SCHEMA)
    for path in (_state(cfg.out) / "pieces").glob(f"{unit.split}-{unit.index:06d}.*"):
        path.unlink(missing_ok=True)


def _shift_offsets(tables: list, fragments: list) -> list:
    """Piece manifests with image offsets in the joined tar: piece i's plus the bytes of
    fragments 0..i-1 (fragments are joined back to back, as `join_fragments` does)."""
    out, base = [], 0
    column = MANIFEST_SCHEMA.get_field_index("image_offset")
    for table, fragment in zip(tables, fragments):
        if base:
            shifted = pa.compute.add(table["image_offset"], pa.scalar(base, pa.int64()))
            table = table.set_column(column, MANIFEST_SCHEMA.field("image_offset"), shifted)
        out.append(table)
        base += os.path.getsize(fragment)
    return out


def _content_box(cfg: IndexConfig, decoded, meta, kept: bool):
    """Where the photo is in the final image (None: no border). img2dataset's json says
    exactly where its letterbox is, in the stored image; that box, carried through the
    resize, is used when the final image really shows a border, else the detector's box."""
    found = detect_constant_border(decoded.rgb)
    h, w = decoded.rgb.shape[:2]
    if found == (0, 0, w, h):
        return None
    ow, oh = decoded.orig_width, decoded.orig_height
    from_meta = content_box_from_meta(meta, ow, oh) if meta else None
    if from_meta is not None:
        return map_box(from_meta, ow, oh, cfg.image_size, cfg.resize, cfg.crop_pct,
                       keep_size=kept and (ow, oh) == (w, h))
    return found


def _fitted_mask(cfg: IndexConfig, data: bytes, decoded, num_classes: int) -> bytes:
    """The sample's mask under its image's resize plan, as PNG bytes (pipeline/seg_mask.py)."""
    from dynavit.pipeline.seg_mask import encode_mask, fit_mask, read_mask

    mask = fit_mask(read_mask(data, num_classes), cfg.image_size, cfg.resize, cfg.crop_pct,
                    cfg.patch_size, (decoded.orig_width, decoded.orig_height))
    return encode_mask(mask)


def _sha256(data) -> str:
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


_batch = np.empty((0, 0, 0, 3), np.uint8)


def _batch_buffer(n: int, shape: tuple) -> np.ndarray:
    """A reused [n, H, W, 3] array to stack a batch into: a fresh 10 MB array per batch
    cost its page faults (~90 µs per image, more than scoring it)."""
    global _batch
    if _batch.shape[1:] != shape or len(_batch) < n:
        _batch = np.empty((max(n, BATCH), *shape), np.uint8)
    return _batch[:n]


def _flush(cfg: IndexConfig, writer: ShardPairWriter, pending: list, progress, flat=None,
           seg_masks: dict | None = None) -> None:
    """Score a batch of decoded images, select every K from one ranking, write in key order
    (with its mask member, voc-seg); add the batch's sampled images to the flat-patch counts."""
    if not pending:
        return
    batch = np.stack([rgb for _, rgb, _ in pending], out=_batch_buffer(len(pending), pending[0][1].shape))
    boxes = [box for _, _, box in pending]
    masks = padding_masks(boxes, cfg.image_size, cfg.patch_size) if any(b is not None for b in boxes) else None
    scores, indices = {}, {}
    for scorer in cfg.scorers:
        scores[scorer] = score_patches(batch, cfg.patch_size, scorer, cfg.mean, cfg.std)
        # Stored scores stay the paper's; only the choice ranks padding last (--pad-aware).
        ranked = scores[scorer] if masks is None else mask_scores(scores[scorer], masks)
        indices[scorer] = select_topk_multi(ranked, cfg.ks)
    if flat is not None:
        flat.add(batch, pending, indices, masks)
    external = writer.external_images is not None
    for i, (row, rgb, _) in enumerate(pending):
        image = None if external else encode_image(rgb, cfg.image_format, cfg.quality)
        where = writer.add(row["key"], image, row["label"],
                           {s: scores[s][i] for s in cfg.scorers},
                           {s: {k: indices[s][k][i] for k in cfg.ks} for s in cfg.scorers},
                           extra=_mask_member(seg_masks, row["key"]))
        if where is not None:  # our image tar (a piece: in its fragment; join_unit shifts it)
            row["image_offset"], row["image_bytes"] = where
    if progress is not None:
        progress(len(pending))
    pending.clear()


def _mask_member(seg_masks: dict | None, key: str) -> dict | None:
    if not seg_masks or key not in seg_masks:
        return None
    from dynavit.pipeline.seg_mask import MASK_EXT
    return {MASK_EXT: seg_masks.pop(key)}


class _FlatSample:
    """The flat-patch counts of a unit (pipeline/flatness.py). The sampled images (one in
    SAMPLE_EVERY) are kept until a batch is full and measured together: scoring a handful
    per call cost ~3× per image in kernel call overhead."""

    def __init__(self, cfg: IndexConfig):
        self.cfg, self.counts = cfg, flatness.empty_counts()
        self.rgb, self.masks, self.kept = [], [], []

    def add(self, batch, pending, indices, masks) -> None:
        for i, (row, _, _) in enumerate(pending):
            if flatness.sampled(row["sha256"]):
                self.rgb.append(batch[i].copy())  # the batch buffer is reused
                self.masks.append(None if masks is None else masks[i])
                self.kept.append({s: {k: v[i] for k, v in by_k.items()} for s, by_k in indices.items()})
        if len(self.rgb) >= BATCH:
            self.measure()

    def measure(self) -> None:
        """Every scorer's kept sets on the held images (the indexed ones as written, the
        others selected here with the same pad-aware ranking), then the counts."""
        if not self.rgb:
            return
        cfg, sub = self.cfg, np.stack(self.rgb)
        grid = sub.shape[1] // cfg.patch_size, sub.shape[2] // cfg.patch_size
        masks = None if all(m is None for m in self.masks) else \
            np.stack([np.zeros(grid, bool) if m is None else m for m in self.masks])
        contrast = score_patches(sub, cfg.patch_size, "contrast")
        kept = {}
        for scorer in SCORERS:
            if scorer in self.kept[0]:
                kept[scorer] = {k: np.stack([d[scorer][k] for d in self.kept]) for k in cfg.ks}
                continue
            sc = contrast if scorer == "contrast" else score_patches(sub, cfg.patch_size, scorer, cfg.mean, cfg.std)
            kept[scorer] = select_topk_multi(sc if masks is None else mask_scores(sc, masks), cfg.ks)
        flatness.add_counts(self.counts, flatness.flat_mask(contrast), kept)
        self.rgb, self.masks, self.kept = [], [], []
