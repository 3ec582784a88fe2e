"""The DataLoader over a `ShardStream` that saves and restores its position (exact resume), ends finite epochs on
every rank together, and refuses a finite pass that gives nothing. `ldm.data.stream` holds what each worker reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from itertools import chain

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ldm.data.stream import STATE_VERSION, NoUsableSamples, ShardStream
from ldm.utils.launcher import collective_device, gather_objects, rank_and_world

log = logging.getLogger(__name__)


class ResumableLoader(DataLoader):
    """A DataLoader over a `ShardStream` whose `state_dict()` is the position of the stream after the batches the
    training step has consumed (`mark_consumed(batch)`), on every rank; `load_state_dict()` makes the next
    iteration continue with exactly the batch that would have come next.

    Lightning saves `state_dict()` in each checkpoint's loop state and calls `load_state_dict()` on resume.
    Batches arrive from the workers in turn (0, 1, …, skipping workers whose share is read), so a resumed
    loader lets physical worker 0 play the worker whose batch was due.

    A finite stream (not resampled) under torch.distributed ends its epoch on every rank at the same batch: before
    each batch the ranks agree (a 1-element all-reduce) that each has one, and when one is out all stop, the
    surplus batches of the others dropped (like `drop_last`). Without it a rank with more shards or fewer damaged
    samples would wait in a gradient all-reduce the others never join.
    Every rank must iterate the loader alike (Lightning does, one batch ahead of the training step).
    """

    def __init__(self, dataset: ShardStream, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._next_epoch = 0
        self._epoch = 0
        self._positions: dict[int, tuple[int, int]] = {}
        self._pending: dict[int, list[tuple[int, int]]] = {}  # per worker: samples waiting in bucket queues
        self._next_worker = 0
        self._resume: dict | None = None
        self.wait_seconds = 0.0  # time spent waiting for batches (the throughput callback reads it)

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self):
        stream: ShardStream = self.dataset
        stream.rank, stream.world = rank_and_world()
        if self._resume is not None:
            epoch, start, offset, pending = (
                self._resume["epoch"],
                self._resume["positions"],
                self._resume["next_worker"],
                self._resume["pending"],
            )
            self._resume = None
        else:
            epoch, start, offset, pending = self._next_epoch, {}, 0, {}
        stream.set_epoch(epoch, start, offset, pending)
        self._epoch, self._next_epoch = epoch, epoch + 1
        self._positions, self._pending, self._next_worker = dict(start), dict(pending), offset
        fresh = not start and not pending
        batches = super().__iter__()
        if not stream.resampled and (device := collective_device()) is not None:
            batches = _while_every_rank_has_one(batches, device)
        if not stream.resampled and fresh:
            batches = _not_empty(batches, stream, self._workers, epoch)
        return _timed(batches, self)

    def mark_consumed(self, batch: dict) -> None:
        if "stream" not in batch:
            return
        epoch, worker, rnd, position = (int(v) for v in batch["stream"].tolist())
        self._positions[worker] = (rnd, position)
        pending = batch.get("stream_pending")
        self._pending[worker] = [tuple(p) for p in pending.tolist()] if pending is not None else []
        self._next_worker = (worker + 1) % self._workers

    def local_state(self) -> dict:
        stream: ShardStream = self.dataset
        return {
            "rank": rank_and_world()[0],
            "epoch": self._epoch,
            "num_workers": self._workers,
            "positions": {w: list(p) for w, p in self._positions.items()},
            "pending": {w: [list(p) for p in items] for w, items in self._pending.items() if items},
            "next_worker": self._next_worker,
            "seed": stream.seed,
            "fingerprint": stream.fingerprint(),
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "world_size": rank_and_world()[1],
            "ranks": gather_objects(self.local_state()),
        }

    def load_state_dict(self, state: dict) -> None:
        rank, world = rank_and_world()
        ranks = state.get("ranks") or []
        mine = next((r for r in ranks if r.get("rank") == rank), None)
        saved = mine or (ranks[0] if ranks else {})
        was = {
            "world_size": state.get("world_size"),
            "num_workers": saved.get("num_workers"),
            "seed": saved.get("seed"),
            **saved.get("fingerprint", {}),  # absent from states saved before it was: not checked
        }
        now = {"world_size": world, "num_workers": self._workers, "seed": self.dataset.seed}
        now.update(self.dataset.fingerprint())
        changed = [f"{k} {was[k]} → {v}" for k, v in now.items() if k in was and was[k] != v]
        if mine is None and not changed:
            changed.append(f"no position of rank {rank}")
        if not changed:
            self._resume = {
                "epoch": mine["epoch"],
                "positions": {int(w): tuple(p) for w, p in mine["positions"].items()},
                "next_worker": mine["next_worker"],
                "pending": {
                    int(w): [tuple(p) for p in items] for w, items in mine.get("pending", {}).items()
                },
            }
            self._next_epoch = mine["epoch"]
            log.info("data stream resumes at epoch %d, positions %s", mine["epoch"], mine["positions"])
            return
        # the saved positions mean nothing in this stream
        epoch = max((r["epoch"] for r in ranks), default=-1) + 1
        log.warning(
            "data stream saved for another setting (%s): cannot continue at the exact sample, "
            "starting epoch %d afresh",
            "; ".join(changed),
            epoch,
        )
        self._next_epoch = epoch


def _while_every_rank_has_one(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """`batches` while every rank still has one: each rank makes the same all-reduces, one more than the
    batches all of them yield."""
    for batch in chain(batches, [None]):
        have = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not have.item():
            return
        yield batch


def _not_empty(batches: Iterator[dict], stream: ShardStream, workers: int, epoch: int) -> Iterator[dict]:
    """`batches`, or NoUsableSamples when a whole finite pass (an epoch from its start) gives none: Lightning would
    otherwise run empty epochs without end."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        rank, world = (stream.rank, stream.world) if stream.rank is not None else rank_and_world()
        raise NoUsableSamples(
            f"epoch {epoch} gave no batch of {stream.batch_size} on rank {rank} of {world}: {len(stream.urls)} "
            f"shard(s) split over {world} rank(s) × {workers} worker(s)"
            + (" (every rank ends with the first that runs out)" if world > 1 else "")
            + ". Fewer shards than ranks × workers leave some without any, and data.filters or damaged samples "
            "may leave too few (the log's 'skipped' warnings say which). Check data.train_urls, data.filters, "
            "data.batch_size and data.num_workers, or use data.resampled=true"
        )


def _timed(iterator, loader: ResumableLoader):
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            loader.wait_seconds += time.perf_counter() - t0
        yield batch
