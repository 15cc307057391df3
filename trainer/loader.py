"""The random-access Loader: one epoch of batches per iteration, every rank the same number
of steps, DataLoader workers building batch j of a seeded plan (data.py builds one; the
streaming loader, stream.py, subclasses it)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterator

import numpy as np
import torch

from dynavit.manifests import DatasetInfo
from dynavit.manifests.samples import SampleTable

from dynavit.trainer.batch import Batch, DataError
from dynavit.trainer.reader import BatchReader, ReadPlan, _EpochBatches

log = logging.getLogger(__name__)



class Loader:
    """One epoch of batches per iteration; call set_epoch(e) before each epoch.

    `steps`: train, the same on every rank, and exactly that many batches come out (a
    DataError if skipped samples empty a whole batch). Eval, this rank's batch count.
    `skipped`: bad samples left out so far (bad shards once, bad samples once per epoch).
    """

    def __init__(self, table: SampleTable, plan: ReadPlan, info: DatasetInfo, *, batch_size: int, workers: int,
                 rank: int, world_size: int, pin_memory: bool):
        self.table, self.plan, self.info = table, plan, info
        self.selection = plan.selection
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.pin_memory = pin_memory
        self.reader = BatchReader(table, plan)
        self.epoch = 0
        self.skipped = sum(n for _, n in table.problems) if plan.skip_bad else 0
        for message, _ in table.problems:
            if plan.skip_bad:
                log.warning("skipping a shard: %s", message)
        n = len(table)
        if plan.train:
            self.steps = n // (world_size * batch_size)
        else:
            self.steps = math.ceil(len(range(rank, n, world_size)) / batch_size)
        self.workers = min(workers, self.steps)

    @property
    def kept(self) -> int | None:
        return self.selection.kept

    @property
    def input_size(self) -> tuple[int, int]:
        return self.selection.input_size

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's sample numbers, batch by batch, for `epoch`."""
        n, b, w, r = len(self.table), self.batch_size, self.world_size, self.rank
        if self.plan.train:
            # DistributedSampler-style: one permutation of every sample, alike on every rank;
            # global batch j·W + r is this rank's batch j; the tail (< W·b) is dropped.
            order = np.random.default_rng([self.plan.seed & (2**64 - 1), epoch]).permutation(n)
            return [order[(j * w + r) * b:(j * w + r + 1) * b] for j in range(self.steps)]
        mine = np.arange(r, n, w)
        return [mine[j * b:(j + 1) * b] for j in range(self.steps)]

    def __iter__(self) -> Iterator[Batch]:
        if self.table.problems and not self.plan.skip_bad:
            raise DataError(self.table.problems[0][0])
        pin = self.pin_memory and torch.cuda.is_available()
        it = self._batch_iter(pin)
        counts = {"done": 0}
        try:
            try:
                yield from self._consume(it, pin, counts)
            finally:
                # Shut DataLoader workers down now, not at garbage collection: an exception's
                # traceback keeps the iterator alive, and while its worker pids stay registered
                # torch's SIGCHLD handler raises at a random later point when one of them dies.
                # Inside the outer try, so that the handler firing here is converted too.
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
        except DataError as e:
            raise DataError(_worker_message(e)) from None
        except (RuntimeError, ConnectionError, EOFError) as e:
            # A killed worker: torch's DataLoader notices it (SIGCHLD) and raises RuntimeError,
            # or, when it died while sending a batch, the receive breaks first.
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
            what = str(e).splitlines()[0] if isinstance(e, RuntimeError) else \
                f"a DataLoader worker died while sending a batch ({type(e).__name__})"
            raise DataError(f"rank {self.rank}, epoch {self.epoch}: {what} (out of memory? fewer --workers or a "
                            f"smaller --batch-size may help)") from None
        done = counts["done"]
        if self.plan.train and done < self.steps:
            raise DataError(f"rank {self.rank}: only {done} of {self.steps} batches this epoch: every sample "
                            f"of the others was skipped as bad")

    def _batch_iter(self, pin: bool) -> Iterator[Batch]:
        """This epoch's batches, built by DataLoader workers or in this process."""
        batches = self.batches(self.epoch)
        if self.workers > 0:
            # A generator of its own: DataLoader otherwise draws its workers' base seed from the
            # global torch RNG, and the model's dropout / drop-path masks would then depend on
            # --workers (every draw of ours is hashed from the sample; the workers' seeds are unused).
            return iter(torch.utils.data.DataLoader(_EpochBatches(self.reader, batches, self.epoch), batch_size=None,
                                                    num_workers=self.workers, pin_memory=pin,
                                                    generator=torch.Generator()))
        return (self.reader(idx, self.epoch) for idx in batches)

    def _consume(self, it, pin: bool, counts: dict) -> Iterator[Batch]:
        pending = 0
        for batch in it:
            self.skipped += batch.skipped
            if len(batch) == 0:  # every sample of it was bad: its count rides on the next batch
                pending += batch.skipped
                continue
            if pending:
                batch, pending = dataclasses.replace(batch, skipped=batch.skipped + pending), 0
            if pin and self.workers == 0:
                batch = batch.pin_memory()
            counts["done"] += 1
            yield batch


def _worker_message(e: DataError) -> str:
    """The one-line message of a DataError, also when DataLoader re-raised it from a worker
    with the worker's traceback prepended."""
    text = str(e).rstrip()
    marker = f"{DataError.__module__}.{DataError.__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text
