"""`dynaprep index --executor ray`: the same work units, run as Ray tasks.

Only *where* a unit runs changes. The driver plans the units, prepares --out, skips the
units that are done and merges, exactly as with `--executor processes` (pipeline/index.py, pipeline/unit.py);
each unit is one Ray task running `process_unit`, which writes its tars and part files
itself. So the output is byte-identical to a processes run or a --rank/--world-size run, and
a killed driver is finished by `--resume` like any other run.

- Without `--ray-address` a local Ray is started with `--workers` CPUs (and stopped at the
  end); with one, the driver joins that cluster and each task takes one CPU of it. A Ray
  already initialised in this process (a notebook, the tests) is used as it is.
  On a cluster, every node needs dynavit installed and --src/--out at the same paths.
- A task that raises, or whose worker dies, is retried `max_retries` times (Ray's
  `max_retries` + `retry_exceptions`); then its unit is failed. The other units still run
  to the end, and the run ends with one UnitError line naming the failed shard(s).
- Progress: with a progress bar, tasks report images to a small counter actor (per unit, so
  a retried unit is not counted twice); without one, nothing extra is started.
"""
from __future__ import annotations

from functools import partial

import dataclasses
import json
import logging
import os
import uuid

from dynavit.pipeline.plan import IndexConfig, RunError, UnitError, _unit_name
from dynavit.pipeline.unit import process_unit
from dynavit.pipeline.sources import SourceError, open_source

INSTALL_HINT = 'pip install "dynavit[ray]"'
POLL_S = 0.2

# Tests only: a picklable callable(unit) that each Ray task calls before process_unit (it
# travels with the task, so it runs in the Ray worker). None in normal runs.
UNIT_HOOK = None


class RayUnavailable(Exception):
    """`--executor ray` without Ray installed, or a --ray-address nothing answers at: one line, exit 2."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_address(address: str | None) -> None:
    """A HOST:PORT that nothing listens on: one line now, instead of Ray's connection retries
    (minutes of C++ log lines). `auto` and `ray://` addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address {address!r}: expected HOST:PORT, auto or ray://HOST:PORT")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise RayUnavailable(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e})") from None


# --- in the Ray worker --------------------------------------------------------------------

_source = None
_source_key = None


def _open(cfg: IndexConfig, run_id: str):
    """One source per worker process and run (CIFAR's pickle is loaded once, not per unit)."""
    global _source, _source_key
    key = (run_id, cfg.data, cfg.src, json.dumps(cfg.source_options, sort_keys=True))
    if _source_key != key:
        from dynavit.manifests.inputs import set_max_file_bytes

        set_max_file_bytes(cfg.max_file_bytes)
        _source, _source_key = open_source(cfg.data, cfg.src, **cfg.source_options), key
        import numba

        numba.set_num_threads(1)  # one task per CPU already
    return _source


def _report(counter, name: str, n: int) -> None:
    counter.add.remote(name, n)


def _task(cfg: IndexConfig, unit, run_id: str, counter, hook) -> tuple[int, int]:
    source = _open(cfg, run_id)
    progress = None
    if counter is not None:
        name = _unit_name(unit)
        counter.start.remote(name)  # a retried unit starts again from 0
        progress = partial(_report, counter, name)
    if hook is not None:
        hook(unit)
    return process_unit(cfg, unit, source, progress)


class _Progress:
    """Images written so far, per unit."""

    def __init__(self):
        self.n = {}

    def start(self, name: str) -> None:
        self.n[name] = 0

    def add(self, name: str, k: int) -> None:
        self.n[name] = self.n.get(name, 0) + k

    def counts(self) -> dict:
        return self.n


# --- in the driver ------------------------------------------------------------------------

def run_ray(cfg: IndexConfig, todo: list, bar) -> tuple[int, int]:
    """Run the units as Ray tasks; return (ok, failed) sample counts, or raise UnitError."""
    ray = require_ray()
    # Remote workers do not share the driver's working directory.
    cfg = dataclasses.replace(cfg, out=os.path.abspath(cfg.out))
    started = False
    if not ray.is_initialized():
        try:
            # Quiet: a failed attempt's traceback stays in Ray's worker logs (/tmp/ray/session_latest/
            # logs); the run reports each failed shard in one line.
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, logging_level=logging.ERROR, log_to_driver=False)
            else:  # "local": a new instance, even if this machine runs a cluster already
                ray.init(address="local", num_cpus=max(1, min(cfg.workers, len(todo))),
                         include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # no cluster at that address, a port taken, ...
            where = f"join the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "start a local Ray"
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RunError(f"cannot {where}: {first}") from None
        started = True
    try:
        return _run(ray, cfg, todo, bar)
    finally:
        if started:
            ray.shutdown()


def _run(ray, cfg: IndexConfig, todo: list, bar) -> tuple[int, int]:
    from ray.exceptions import RayError, RayTaskError

    task = ray.remote(_task).options(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True,
                                     name="dynaprep-unit")
    counter = None if bar.disable else ray.remote(num_cpus=0)(_Progress).remote()
    run_id = uuid.uuid4().hex
    refs = {task.remote(cfg, u, run_id, counter, UNIT_HOOK): i for i, u in enumerate(todo)}
    pending, done, failures = list(refs), {}, []
    ok = failed = 0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                i = refs[ref]
                try:
                    o, f = ray.get(ref)
                except RayTaskError as e:
                    failures.append((todo[i], e.cause if e.cause is not None else e))
                    continue
                except RayError as e:  # the worker or its node died on every attempt
                    failures.append((todo[i], e))
                    continue
                ok, failed, done[i] = ok + o, failed + f, o + f
            _show(ray, bar, counter, todo, done)
    except BaseException:  # Ctrl-C: stop the tasks (a cut unit is redone by --resume)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    if failures:
        raise UnitError(_failed_line(failures, cfg.max_retries))
    return ok, failed


def _show(ray, bar, counter, todo: list, done: dict) -> None:
    n = sum(done.values())
    if counter is not None:
        running = ray.get(counter.counts.remote())
        for i, u in enumerate(todo):
            if i not in done:
                k = running.get(_unit_name(u), 0)
                n += min(k, u.count) if u.count is not None else k
    if n > bar.n:
        bar.update(n - bar.n)


def _reason(e: BaseException) -> str:
    from ray.exceptions import RayError

    if isinstance(e, OSError):
        return (e.strerror or str(e)) + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, SourceError):
        return str(e)
    if isinstance(e, RayError):  # WorkerCrashedError, OutOfMemoryError, NodeDiedError, ...
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        return f"its Ray worker died ({type(e).__name__}: {first})"
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _failed_line(failures: list, max_retries: int) -> str:
    failures = sorted(failures, key=lambda f: (f[0].split, f[0].index))
    unit, e = failures[0]
    tries = f" after {max_retries + 1} attempts" if max_retries else ""
    line = f"shard {_unit_name(unit)} failed{tries}: {_reason(e)}"
    if len(failures) > 1:
        more = ", ".join(_unit_name(u) for u, _ in failures[1:6]) + (", ..." if len(failures) > 6 else "")
        line += f"; {len(failures) - 1} more failed ({more})"
    return line + "; the other shards were written: fix that and run again with --resume"
