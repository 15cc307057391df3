"""`dynaprep index`: plan work units, run them in worker processes, merge the manifests.

Data flow per work unit (one output shard):
  source.read_unit → decode/resize → score_patches (each scorer) → top-K for every K
  → ShardPairWriter (image tar + index tars) → part files in OUT/.dynaprep/parts/.

A unit is done when its part files exist: the tars are renamed into place first, then the
manifest part, then the shard part. `--resume` redoes every unit without a shard part, so a
killed run ends byte-identical to an uninterrupted one. `merge` joins the parts of every
rank into manifest.parquet, shards.parquet and, last, dataset.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynavit.manifests import (
    MANIFEST_SCHEMA,
    SHARDS_SCHEMA,
    DatasetInfo,
    KInfo,
    ShardPairWriter,
    SplitCounts,
    k_count,
    write_dataset_info,
    write_json_atomic,
    write_manifest,
    write_shards,
)
from dynavit.manifests.atomic import remove_stale_temp_files
from dynavit.manifests.inputs import DEFAULT_MAX_FILE_BYTES, set_max_file_bytes
from dynavit.manifests.io import write_table_atomic
from dynavit.manifests.shards import fragment_paths, join_pieces
from dynavit.manifests.tar import TarError
from dynavit.manifests.schema import DATASET_JSON, STATUS_FAILED, STATUS_OK, image_shard_name, index_shard_name

from . import flatness
from .decode import DecodeError, encode_image, load_image
from .padding import content_box_from_meta, detect_constant_border, map_box, mask_scores, padding_masks
from .saliency import SCORERS, score_patches
from .sources import SourceError, open_source
from .topk import select_topk_multi

STATE_DIR = ".dynaprep"
BATCH = 64  # images scored per kernel call: large enough to amortise, small enough to bound memory


@dataclass
class IndexConfig:
    data: str
    src: str | None
    out: str
    ks: list[int]
    scorers: list[str] = field(default_factory=lambda: ["l2"])
    image_size: int = 224
    patch_size: int = 16
    resize: str = "center-crop"
    crop_pct: float = 0.875
    image_format: str = "jpg"
    quality: int = 95
    shard_size: int = 1000
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    source_options: dict = field(default_factory=dict)
    # Top-K never keeps constant letterbox borders (img2dataset's default `border` mode)
    # while real content is left out; False keeps the paper's plain definitions.
    pad_aware: bool = False
    # Write order of each split: "shuffle" (seeded by order_seed) or "source". Folder layouts
    # list samples class by class; written in that order, a shard would hold one or two
    # classes and no streaming reader could mix them.
    order: str = "shuffle"
    order_seed: int = 0
    # How the work is run; free to change between a run and its --resume.
    workers: int = 1
    rank: int = 0
    world_size: int = 1
    executor: str = "processes"      # or "ray": each unit is a Ray task (pipeline/ray_executor.py)
    ray_address: str | None = None   # join this Ray cluster; None: start a local Ray with `workers` CPUs
    max_retries: int = 2             # ray: attempts of a unit that raises = max_retries + 1
    # An input file over this many bytes is a failed row (a .jpg symlinked to /dev/zero
    # would otherwise be read until the OOM killer comes; manifests/inputs.py).
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    RUN_ONLY = ("workers", "rank", "world_size", "executor", "ray_address", "max_retries")

    def output_settings(self) -> dict:
        """Everything that determines the bytes written: a resume must not change these."""
        d = dataclasses.asdict(self)
        for name in (*self.RUN_ONLY, "out"):  # a moved or re-mounted --out writes the same bytes
            d.pop(name)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.max_file_bytes == DEFAULT_MAX_FILE_BYTES:
            d.pop("max_file_bytes")  # runs saved before the cap existed resume unchanged
        # How pixels are resampled decides the bytes too: a resume by another dynavit whose
        # resize differs must not mix both in one dataset.
        d["resampler"] = resampler()
        return d


def resampler() -> dict:
    from .decode import DRAFT_MARGIN, RESAMPLER

    return {"name": RESAMPLER, "draft_margin": DRAFT_MARGIN}


class RunError(Exception):
    """A run-level problem (bad --out state, resume mismatch): reported as one line, exit 2."""


class LabelError(Exception):
    """The labels of a dataset cannot be made into one class list (one line, exit 1)."""


class UnitError(Exception):
    """A work unit could not be finished (a worker process died, the disk is full, an
    input file went away): one line naming the shard, exit 1. The shards committed before
    stay; `--resume` redoes the rest."""


def check_settings(cfg: "IndexConfig") -> None:
    """Settings that would only fail inside a worker, checked before anything is written."""
    for name in ("mean", "std"):
        v = getattr(cfg, name)
        if len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise RunError(f"--{name} must be three finite numbers (R,G,B), got {v!r}")
    if min(cfg.std) <= 0:
        raise RunError(f"--std must be positive, got {cfg.std!r}")


# --- planning -----------------------------------------------------------------------------

def plan(cfg: IndexConfig, source):
    """Every unit of every split, in a fixed order; rank r owns units r, r+W, r+2W, …"""
    seed = cfg.order_seed if cfg.order == "shuffle" else None
    return [u for split in source.splits() for u in source.units(split, cfg.shard_size, order_seed=seed)]


def _state(out) -> Path:
    return Path(out) / STATE_DIR


def _part(out, unit, kind: str) -> Path:
    return _state(out) / "parts" / f"{unit.split}-{unit.index:06d}.{kind}.parquet"


def plan_digest(units) -> str:
    """What the inputs are, unit by unit: a resume or merge over a changed source would
    shift ordinals between shards and silently duplicate or drop inputs."""
    h = hashlib.sha256()
    for u in units:
        h.update(repr((u.split, u.index, u.count, u.payload)).encode())
    return h.hexdigest()


def prepare_out_dir(cfg: IndexConfig, units, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a non-empty --out needs --resume (same settings and inputs) or
    --overwrite. Ranks of one multi-machine run share --out, so they always join."""
    out = Path(cfg.out)
    saved = _state(out) / "config.json"
    now = {**cfg.output_settings(), "plan": plan_digest(units)}
    nonempty = out.exists() and any(out.iterdir())
    joining = cfg.world_size > 1
    if nonempty and not (resume or overwrite or joining):
        raise RunError(f"--out {out} is not empty: pass --resume to continue that run or --overwrite to replace it")
    if nonempty and overwrite and not resume:
        # Only ever delete what a dynaprep run wrote: --out could be a typo for a home directory.
        if not saved.exists() and not (out / DATASET_JSON).exists():
            raise RunError(f"refusing to --overwrite {out}: it does not look like a dynaprep output directory")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif nonempty and (resume or joining) and saved.exists():
        before = json.loads(saved.read_text())
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            what = "the input files" if diff == ["plan"] else ", ".join(diff)
            raise RunError(f"cannot --resume {out}: {what} changed since the run started")
    elif nonempty and not joining:
        raise RunError(f"cannot --resume {out}: no {STATE_DIR}/config.json (not a dynaprep run?)")
    if resume:
        # Other ranks (or another run on this machine) may be writing their temp files right
        # now: only those of writers that are gone go. A PID means nothing on another
        # machine, so with several ranks a file must also be untouched for STALE_AFTER_S.
        # Ray workers on other machines write here too: their PIDs mean nothing on this one.
        remote = joining or (cfg.executor == "ray" and cfg.ray_address is not None)
        remove_stale_temp_files(out, min_age_s=STALE_AFTER_S if remote else 0.0)
    write_json_atomic(saved, now)  # before parts/ exists, so a joining rank always finds it
    (_state(out) / "parts").mkdir(parents=True, exist_ok=True)


STALE_AFTER_S = 900.0
PLAN_JSON = "plan.json"


def save_plan(out, source, units) -> None:
    """What a merge needs, so that `merge-manifests` runs where the source is not mounted:
    the units (split, index, count), the splits, the class names and the plan digest.
    Written at run start by every rank (the same bytes: their digests are equal)."""
    write_json_atomic(_state(out) / PLAN_JSON, {
        "plan": plan_digest(units), "splits": list(source.splits()), "classes": list(source.classes()),
        "external_images": bool(source.external_images), "images_root": source.images_root(),
        "units": [[u.split, u.index, u.count] for u in units]})


@dataclass
class SavedPlan:
    """The saved plan standing in for the source in `merge` (splits, classes, external_images)."""
    digest: str
    split_names: list
    class_names: list
    external_images: bool
    units: list
    root: str | None = None

    def splits(self) -> list[str]:
        return list(self.split_names)

    def images_root(self) -> str | None:
        return self.root

    def classes(self) -> list[str]:
        return list(self.class_names)


def load_plan(out) -> "SavedPlan | None":
    """The plan saved by `save_plan`, or None for an output written before plans were saved."""
    path = _state(out) / PLAN_JSON
    if not path.exists():
        return None
    from .sources.base import WorkUnit

    try:
        d = json.loads(path.read_text())
        units = [WorkUnit(split, index, None, count) for split, index, count in d["units"]]
        return SavedPlan(d["plan"], d["splits"], d["classes"], bool(d["external_images"]), units,
                         d.get("images_root"))
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is damaged ({e}); run the index command again with --resume") from None


def _flat_part(out, unit) -> Path:
    """The unit's flat-patch counts (pipeline/flatness.py): JSON, null when unknown."""
    return _state(out) / "parts" / f"{unit.split}-{unit.index:06d}.flat.json"


def _read_flat(path: Path):
    """Counts of a part or piece, or None: written by a dynavit that did not measure them."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RunError(f"{path} is damaged ({e}); delete it and the shard's parts, then --resume") from None


def _piece(out, unit) -> Path:
    """Path prefix of a piece's fragments and manifest rows (the piece count is in the
    name, so a resume that cuts the unit differently ignores them)."""
    return _state(out) / "pieces" / f"{unit.split}-{unit.index:06d}.{unit.part:04d}of{unit.parts:04d}"


def _piece_rows(out, unit) -> Path:
    return Path(f"{_piece(out, unit)}.manifest.parquet")


def is_done(out, unit, cfg: "IndexConfig") -> bool:
    """DESIGN §3: a shard pair is done when its part (its shards row) and its tars exist.
    A piece of a unit is done when its manifest rows exist (written after its fragments)."""
    if unit.parts > 1:
        return _piece_rows(out, unit).exists()
    if not _part(out, unit, "shard").exists():
        return False
    tars = [index_shard_name(unit.split, s, unit.index) for s in cfg.scorers]
    if cfg.data != "wds":
        tars.append(image_shard_name(unit.split, unit.index))
    return all((Path(out) / t).exists() for t in tars)


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
            if external is not None and raw.member is not None:  # where it is in the user's tar
                row["image_offset"], row["image_bytes"] = raw.member
            box = _content_box(cfg, decoded, raw.meta, kept=external is not None) if cfg.pad_aware else None
            pending.append((row, decoded.rgb, box))
            if len(pending) == BATCH:
                _flush(cfg, writer, pending, progress, flat)
        _flush(cfg, writer, pending, progress, flat)
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


def _flush(cfg: IndexConfig, writer: ShardPairWriter, pending: list, progress, flat=None) -> None:
    """Score a batch of decoded images, select every K from one ranking, write in key order;
    add the batch's sampled images to the flat-patch counts."""
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
                           {s: {k: indices[s][k][i] for k in cfg.ks} for s in cfg.scorers})
        if where is not None:  # our image tar (a piece: in its fragment; join_unit shifts it)
            row["image_offset"], row["image_bytes"] = where
    if progress is not None:
        progress(len(pending))
    pending.clear()


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


# --- the run ------------------------------------------------------------------------------

@dataclass
class RunResult:
    units_total: int
    units_done_before: int
    units_run: int
    ok: int
    failed: int
    seconds: float
    merged: bool


def run_index(cfg: IndexConfig, source, resume: bool = False, overwrite: bool = False,
              progress_bar: bool = True) -> RunResult:
    check_settings(cfg)
    set_max_file_bytes(cfg.max_file_bytes)  # units run in this process too
    units = plan(cfg, source)
    if not units:  # checked before --out is touched: nothing to write is an argument error
        raise RunError(f"nothing to index: every split of {cfg.src or cfg.data} is empty")
    mine = [u for i, u in enumerate(units) if i % cfg.world_size == cfg.rank]
    prepare_out_dir(cfg, units, resume, overwrite)
    save_plan(cfg.out, source, units)
    todo = [u for u in mine if not is_done(cfg.out, u, cfg)]
    t0 = time.perf_counter()
    ok = failed = 0
    counts = [u.count for u in todo]
    total = sum(counts) if None not in counts else None  # wds units are counted only when read
    from tqdm import tqdm  # the main process only: workers are spawned and import this module

    bar = tqdm(total=total, unit="img", desc=f"dynaprep {cfg.data}", disable=not progress_bar, smoothing=0.1)
    try:
        if cfg.executor == "ray":
            if todo:
                from .ray_executor import run_ray

                ok, failed = run_ray(cfg, todo, bar)
        else:
            jobs, ready, cut = split_jobs(cfg, source, todo)
            for pieces in ready:  # every piece finished in an earlier run
                join_unit(cfg, source, pieces)
            if cfg.workers == 1 or (len(jobs) == 1 and jobs[0].parts == 1):
                for unit in jobs:  # in this process: no pool to start for one shard
                    try:
                        o, f = process_unit(cfg, unit, source, bar.update)
                    except (OSError, SourceError) as e:
                        raise UnitError(_unit_failed(unit, e)) from None
                    ok, failed = ok + o, failed + f
            elif jobs:
                ok, failed = _run_pool(cfg, source, jobs, min(cfg.workers, len(jobs)), bar, cut)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    merged = False
    if all(is_done(cfg.out, u, cfg) for u in units):
        merge(cfg.out, source=source, cfg=cfg, units=units)
        merged = True
    return RunResult(len(units), len(mine) - len(todo), len(todo), ok, failed, seconds, merged)


def split_jobs(cfg: IndexConfig, source, todo: list) -> tuple[list, list]:
    """The pool's jobs: the units, or, when there are too few to keep every worker busy
    (a 600-image job is one shard; img2dataset writes 10,000 samples per tar), pieces of
    them. Pieces change nothing on disk: `join_unit` makes the same bytes. Returns (jobs to
    run, piece lists of units whose pieces were all finished by an earlier run, and every
    cut unit's pieces by (split, index))."""
    if len(todo) >= 2 * cfg.workers or cfg.workers < 2:
        return list(todo), [], {}
    parts = math.ceil(2 * cfg.workers / max(1, len(todo)))
    jobs, ready, cut = [], [], {}
    for unit in todo:
        pieces = source.split_unit(unit, parts)
        if len(pieces) > 1:
            cut[(unit.split, unit.index)] = pieces
        left = [p for p in pieces if not (p.parts > 1 and is_done(cfg.out, p, cfg))]
        if not left:
            ready.append(pieces)
        jobs.extend(left)
    return jobs, ready, cut


def _unit_name(unit) -> str:
    if unit.parts > 1:
        return f"{unit.split}/{unit.index:06d} (piece {unit.part + 1} of {unit.parts})"
    return f"{unit.split}/{unit.index:06d}"


def _unit_failed(unit, e: BaseException) -> str:
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        where = f" ({e.filename})" if e.filename else ""
        return f"shard {_unit_name(unit)} failed: {what}{where}; fix that and run again with --resume"
    return f"shard {_unit_name(unit)} failed: {e}"


def _run_pool(cfg: IndexConfig, source, todo: list, workers: int, bar, cut: dict | None = None) -> tuple[int, int]:
    """Run the jobs (units or pieces) in spawned worker processes; a unit's pieces are
    joined here as soon as its last one is done. A worker that dies (OOM killer, kill -9)
    breaks the pool at once: every other worker is stopped and UnitError names the shard it
    was writing (multiprocessing.Pool would wait for its result forever)."""
    ctx = mp.get_context("spawn")  # fork after numba/torch threads start is not safe
    counter = ctx.Value("q", 0)
    slots = ctx.Array("q", max(1, len(todo)), lock=False)
    ok = failed = 0
    pieces_left: dict = {}
    for job in todo:
        if job.parts > 1:
            pieces_left[(job.split, job.index)] = pieces_left.get((job.split, job.index), 0) + 1
    pool = ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_init_worker,
                               initargs=(cfg, counter, 1, slots, os.getpid()))
    try:
        futures = {pool.submit(_run_unit, cfg, u, i): i for i, u in enumerate(todo)}
        processes = dict(getattr(pool, "_processes", None) or {})  # every worker exists once submitted
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            bar.update(counter.value - bar.n)
            processes.update(getattr(pool, "_processes", None) or {})
            for future in done:
                job = todo[futures[future]]
                try:
                    o, f = future.result()
                except BrokenProcessPool:
                    pool.shutdown(wait=True, cancel_futures=True)  # joins the stopped workers
                    raise UnitError(_worker_died(cfg, todo, futures, slots, processes)) from None
                except (OSError, SourceError, TarError) as e:
                    raise UnitError(_unit_failed(job, e)) from None
                ok, failed = ok + o, failed + f
                if job.parts > 1:
                    pieces_left[(job.split, job.index)] -= 1
                    if not pieces_left[(job.split, job.index)]:
                        pieces = cut[(job.split, job.index)]
                        try:
                            join_unit(cfg, source, pieces)
                        except (OSError, SourceError) as e:
                            raise UnitError(_unit_failed(dataclasses.replace(job, parts=1), e)) from None
        # Every job is done and its files are in place: stop the idle workers now, as
        # multiprocessing.Pool's context manager does, instead of waiting for each spawned
        # interpreter's clean exit (tearing down numba and pyarrow took ~0.25 s).
        for process in processes.values():
            process.terminate()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bar.update(counter.value - bar.n)
    return ok, failed


def _worker_died(cfg: IndexConfig, todo: list, futures: dict, slots, processes: dict) -> str:
    """One line naming the shard(s) whose worker died. The pool stops the others with
    SIGTERM, so the one that died first is the one with another exit status."""
    unfinished = {}  # pid -> unit index: a worker writes one unit at a time
    for future, i in futures.items():
        # A broken pool fails every pending future, also one whose shard was written just
        # before the worker died: its part files say it is done.
        if slots[i] and (not future.done() or future.cancelled() or future.exception() is not None) \
                and not is_done(cfg.out, todo[i], cfg):
            unfinished[slots[i]] = i
    codes = {pid: p.exitcode for pid, p in processes.items()}
    # The worker that died is the one with an exit status the pool's own SIGTERM does not
    # explain, whether or not it had recorded its shard yet (a worker between two shards);
    # only when no status tells, a worker with an unfinished shard is named.
    died = [pid for pid, c in codes.items() if c not in (None, 0, -signal.SIGTERM)] or list(unfinished)
    how = "died"
    if len(died) == 1 and codes.get(died[0]) is not None:
        code = codes[died[0]]
        try:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        except ValueError:
            how = f"was killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += " (out of memory?)"
    pids = ", ".join(str(pid) for pid in died) or "?"
    shards = ", ".join(_unit_name(todo[unfinished[pid]]) for pid in died if pid in unfinished)
    where = f"while writing shard {shards}" if shards else "between two shards"
    return (f"worker process {pids} {how} {where}; the other workers were stopped."
            " Run again with --resume to finish")


# --- merging the parts of every rank ------------------------------------------------------

def merge(out, source, cfg: IndexConfig, units) -> DatasetInfo:
    """Join the part files into the two manifests, then write dataset.json last."""
    missing = [u for u in units if not is_done(out, u, cfg)]
    if missing:
        names = ", ".join(f"{u.split}/{u.index}" for u in missing[:5])
        raise RunError(f"{len(missing)} units are not done yet (e.g. {names}): run the missing ranks or --resume")
    parts = [pq.read_table(_part(out, u, "manifest"), schema=MANIFEST_SCHEMA) for u in units]
    for u, part in zip(units, parts):
        if u.count is not None and part.num_rows != u.count:
            raise RunError(f"shard {_unit_name(u)} has {part.num_rows} manifest rows where the plan has {u.count}"
                           " inputs: its parts come from another run; re-run with --overwrite")
    manifest = pa.concat_tables(parts)
    classes, manifest = _classes(source, manifest)
    shards = pa.concat_tables([pq.read_table(_part(out, u, "shard"), schema=SHARDS_SCHEMA) for u in units])
    write_manifest(out, manifest)
    write_shards(out, shards)
    flat = _flat_figures(out, units, cfg, source.splits())
    n = (cfg.image_size // cfg.patch_size) ** 2
    counts = {(r["split"], r["status"]): r["key_count"]
              for r in manifest.group_by(["split", "status"]).aggregate([("key", "count")]).to_pylist()}
    splits = {split: SplitCounts(ok=counts.get((split, STATUS_OK), 0), failed=counts.get((split, STATUS_FAILED), 0),
                                 shards=sum(1 for u in units if u.split == split))
              for split in source.splits()}
    from dynavit.manifests import __version__

    info = DatasetInfo(
        dataset=cfg.data, source=str(cfg.src) if cfg.src else cfg.data,
        image_size=(cfg.image_size, cfg.image_size), patch_size=cfg.patch_size,
        scorers=list(cfg.scorers),
        ks=[KInfo(k, k_count(k, n), 1 + k_count(k, n)) for k in cfg.ks],
        classes=classes, splits=splits,
        resize={"policy": cfg.resize, "crop_pct": cfg.crop_pct, "resampler": resampler(),
                **({"at_size": "kept"} if source.external_images else {})},
        images_root=source.images_root() if source.external_images else None,
        padding=padding_info(cfg),
        flat_patches=flat,
        labels={"from": str(cfg.source_options.get("label", "auto")) if source.external_images else "source"},
        image_format=cfg.image_format if not source.external_images else "external",
        quality=cfg.quality if cfg.image_format == "jpg" and not source.external_images else None,
        mean=tuple(cfg.mean), std=tuple(cfg.std), external_images=bool(source.external_images),
        order={"policy": "source"} if source.external_images or cfg.order == "source"
        else {"policy": "shuffle", "seed": cfg.order_seed},
        shard_size=cfg.shard_size, tool_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_dataset_info(out, info)
    return info


def _flat_figures(out, units, cfg: IndexConfig, splits) -> dict | None:
    """dataset.json's flat_patches: per split, the summed counts of its units, shares and
    warnings (pipeline/flatness.py); None when a unit was written without counts."""
    per_split: dict = {}
    for u in units:
        counts = _read_flat(_flat_part(out, u))
        if counts is None:
            return None
        per_split.setdefault(u.split, []).append(counts)
    return {"definition": flatness.DEFINITION,
            "splits": {split: flatness.summarize(flatness.merge_counts(per_split.get(split, [])), cfg.scorers)
                       for split in splits}}


def padding_info(cfg: IndexConfig) -> dict:
    if not cfg.pad_aware:
        return {"policy": "none"}
    from .padding import DETECTOR

    return {"policy": "pad-aware", "detector": DETECTOR}


def _classes(source, manifest: pa.Table) -> tuple[list[str], pa.Table]:
    """The class names, and the manifest with every label set.

    The source's class list when it has one. A user's wds labelled by class *names*
    (`-o label=txt`, `label=json:FIELD` with strings) and no classes_file: the distinct
    names of the ok rows, sorted, assigned here, once every shard is known. Labelled by
    numbers without names: the label values themselves, so a trainer knows how many there are."""
    import pyarrow.compute  # noqa: F401  (pa.compute; main process only: workers need not load it)

    names = list(source.classes())
    if names:
        return names, manifest
    label, class_name = manifest["label"], manifest["class_name"]
    named = pa.compute.and_(pa.compute.is_null(label), pa.compute.is_valid(class_name))
    numbered = pa.compute.and_(pa.compute.is_valid(label), pa.compute.is_null(class_name))
    if pa.compute.any(named).as_py() and pa.compute.any(numbered).as_py():
        # "cat" would get index 0 and collide with the samples labelled 0.
        number = pa.compute.filter(label, numbered)[0].as_py()
        name = pa.compute.filter(class_name, named)[0].as_py()
        raise LabelError(f"the labels mix class numbers and class names (e.g. {number} and {name[:40]!r}): "
                         "sorted names would collide with the numbers; pass -o classes_file=FILE (one name per "
                         "line, line i = class i) or make every label one kind")
    if pa.compute.any(named).as_py():
        names = sorted(set(pa.compute.filter(class_name, named).to_pylist()))
        index = {n: i for i, n in enumerate(names)}
        labels = [index[n] if lab is None and n is not None else lab
                  for lab, n in zip(label.to_pylist(), class_name.to_pylist())]
        column = manifest.schema.get_field_index("label")
        return names, manifest.set_column(column, manifest.schema.field("label"), pa.array(labels, pa.int32()))
    if manifest["label"].null_count == manifest.num_rows:
        return [], manifest
    return [str(i) for i in range(pa.compute.max(manifest["label"]).as_py() + 1)], manifest


def merge_from_state(out) -> DatasetInfo:
    """`dynaprep merge-manifests`: merge from the plan saved at run start (the source need
    not be mounted here); an output without one (older runs) re-plans from the source."""
    saved = _state(out) / "config.json"
    if not saved.exists():
        raise RunError(f"{out}: no {STATE_DIR}/config.json; is this a dynaprep output directory?")
    settings = json.loads(saved.read_text())
    digest = settings.pop("plan", None)
    settings.pop("resampler", None)  # recorded for resume checks, not an option
    settings["mean"], settings["std"] = tuple(settings["mean"]), tuple(settings["std"])
    cfg = IndexConfig(**settings, out=str(out))
    saved_plan = load_plan(out)
    if saved_plan is not None:
        if digest is not None and saved_plan.digest != digest:
            raise RunError(f"{_state(out) / PLAN_JSON} does not belong to the run in {saved}"
                           " (plan digests differ); re-run the index command with --resume")
        info = merge(out, saved_plan, cfg, saved_plan.units)
        remove_stale_temp_files(out)
        return info
    try:
        source = open_source(cfg.data, cfg.src, **cfg.source_options)
        units = plan(cfg, source)
    except (SourceError, ValueError, OSError) as e:
        raise RunError(f"cannot re-open the source to merge: {e}") from None
    if digest is not None and plan_digest(units) != digest:
        raise RunError(f"the input files of {cfg.src} changed since the run started; re-run with --overwrite")
    info = merge(out, source, cfg, units)
    # Every unit is done, so no rank writes shards any more: what a killed merge or worker
    # left behind goes (a file of a writer still alive on this machine stays).
    remove_stale_temp_files(out)
    return info
