"""What `dynaprep index` will do, and what it has done: its settings (IndexConfig, checked
before anything is written), the work units (one output shard each, or a piece of one), and
the run's state folder OUT/.dynaprep/ (the saved plan and each unit's part files, which make
`--resume` redo exactly the units that have no shard part yet).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path


from dynavit.manifests import (
    write_json_atomic,
)
from dynavit.manifests.atomic import remove_stale_temp_files
from dynavit.manifests.inputs import DEFAULT_MAX_FILE_BYTES
from dynavit.manifests.schema import DATASET_JSON, image_shard_name, index_shard_name


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
    from dynavit.pipeline.decode import DRAFT_MARGIN, RESAMPLER

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
    from dynavit.pipeline.sources.base import WorkUnit

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
    """docs/FORMAT.md: a shard pair is done when its part (its shards row) and its tars exist.
    A piece of a unit is done when its manifest rows exist (written after its fragments)."""
    if unit.parts > 1:
        return _piece_rows(out, unit).exists()
    if not _part(out, unit, "shard").exists():
        return False
    tars = [index_shard_name(unit.split, s, unit.index) for s in cfg.scorers]
    if cfg.data != "wds":
        tars.append(image_shard_name(unit.split, unit.index))
    return all((Path(out) / t).exists() for t in tars)


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
