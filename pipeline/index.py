"""`dynaprep index`: plan the work units (plan.py), run them in worker processes or on Ray
(unit.py does one; ray_executor.py distributes them), then merge the parts of every rank into
manifest.parquet, shards.parquet and, last, dataset.json.

`--resume` redoes every unit without a shard part, so a killed run ends byte-identical to an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from dynavit.manifests import (
    MANIFEST_SCHEMA,
    SHARDS_SCHEMA,
    DatasetInfo,
    KInfo,
    SplitCounts,
    k_count,
    write_dataset_info,
    write_manifest,
    write_shards,
)
from dynavit.manifests.atomic import remove_stale_temp_files
from dynavit.manifests.inputs import set_max_file_bytes
from dynavit.manifests.tar import TarError
from dynavit.manifests.schema import STATUS_FAILED, STATUS_OK

from dynavit.pipeline import flatness
from dynavit.pipeline.sources import SourceError, open_source
from dynavit.pipeline.plan import (  # noqa: F401 (IndexConfig, plan, errors: the `dynaprep index` API)
    PLAN_JSON, STATE_DIR, IndexConfig, LabelError, RunError, UnitError, _flat_part, _part, _read_flat, _state,
    _unit_failed, _unit_name, check_settings, is_done, load_plan, plan, plan_digest, prepare_out_dir, resampler,
    save_plan)
from dynavit.pipeline.unit import _init_worker, _run_unit, join_unit, process_unit


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
                from dynavit.pipeline.ray_executor import run_ray

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


def _run_pool(cfg: IndexConfig, source, todo: list, workers: int, bar, cut: dict | None = None) -> tuple[int, int]:
    """Run the jobs (units or pieces) in spawned worker processes; a unit's pieces are
    joined here as soon as its last one is done. A worker that dies (OOM killer, kill -9)
    breaks the pool at once: every other worker is stopped and UnitError names the shard it
    was writing (multiprocessing.Pool would wait for its result forever)."""
    ctx = mp.get_context("spawn")  # fork after numba/torch threads start is not safe
    counter = ctx.Value("q", 0)
    # The parent reads the count without its lock: a worker SIGKILLed inside `counter.value +=
    # n` dies holding the lock, and a locked read here then waited forever instead of
    # reporting the dead worker (seen once in CI). The workers still add under the lock.
    seen = counter.get_obj()
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
            bar.update(seen.value - bar.n)
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
    bar.update(seen.value - bar.n)
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
    from dynavit.pipeline.padding import DETECTOR

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
