"""A shard stream that can be resumed at the exact sample, and the DataLoader that saves and restores its position.

webdataset pipelines have no state: after a restart they begin again. Here every source of randomness is a
function of (seed, rank, worker, epoch, round, sample index) and nothing else, so each DataLoader worker's
stream is a pure function of where it stands. Its position is two numbers: the round (a group of shards read
together; an epoch's share of the shards when not resampled) and how many raw samples of that round it has
passed on. A resumed worker re-reads the tar bytes up to that point, through the shuffle buffer, without
decoding them, and goes on from there.

    per worker:  round r: shards(r) → tar samples → shuffle buffer(r) → [skip `position`] → decode(index) → batch

`ResumableLoader.state_dict()` holds, for every rank, the epoch, the position of each worker after the last
batch the training step consumed (not the last one prefetched), and which worker's batch comes next; every
rank's entry is gathered, so the checkpoint written by rank 0 holds all of them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.transforms import SampleError
from ldm.data.webdataset import Batch, SkipCounter, TarSamples, expand_urls
from ldm.utils.launcher import gather_objects, rank_and_world

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ShardStream(IterableDataset):
    """Batches from WebDataset shards, for `DataLoader(stream, batch_size=None)`; resumable at the exact sample.

    decode: `decode(raw_sample, rng) -> dict`, raising `SampleError` for a sample to skip; `rng` is a
        `random.Random` of that sample alone (its augmentation does not depend on where the stream started).
    resampled: True → endless rounds of `round_shards` shards drawn with replacement, per rank and worker;
        False → one round per epoch: the shards, shuffled alike on every rank, split across ranks
        (`split_by_node`) and workers, each once.
    Every batch carries `stream`: (epoch, worker, round, position after its last sample), a LongTensor (4,).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        decode: Callable[[dict, random.Random], dict],
        batch_size: int,
        *,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        split_by_node: bool = True,
        partial_batches: bool = False,
        round_shards: int = 8,
        log_every: int = 1000,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        self.decode, self.batch_size = decode, batch_size
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.split_by_node, self.partial_batches, self.log_every = split_by_node, partial_batches, log_every
        self.round_shards = max(1, round_shards)
        # set by ResumableLoader in the main process before each iteration (the workers get copies)
        self.rank: int | None = None
        self.world: int | None = None
        self.epoch = 0
        self.worker_offset = 0  # physical worker w plays logical worker (w + offset) % num_workers
        self.start: dict[int, tuple[int, int]] = {}  # logical worker → (round, position) to resume from
        self._iterations = 0  # iterations of this copy since `epoch` was set (persistent workers count on)

    def set_epoch(self, epoch: int, start: dict[int, tuple[int, int]] | None = None, worker_offset: int = 0):
        self.epoch, self.start, self.worker_offset = epoch, dict(start or {}), worker_offset
        self._iterations = 0

    # --- what each worker reads --------------------------------------------------------------------------
    def shards(self, rank: int, world: int, worker: int, num_workers: int, epoch: int, rnd: int) -> list[str]:
        if self.resampled:
            rng = random.Random(f"{self.seed}/resample/rank{rank}/worker{worker}/epoch{epoch}/round{rnd}")
            return [rng.choice(self.urls) for _ in range(self.round_shards)]
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"{self.seed}/shards/epoch{epoch}").shuffle(urls)
        if self.split_by_node:
            urls = urls[rank::world]
        return urls[worker::num_workers]

    def _raw(self, shards: list[str], counter: SkipCounter, tag: str) -> Iterator[dict]:
        samples: Iterable[dict] = TarSamples(counter)({"url": u} for u in shards)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(f"{tag}/shuffle"))
        return iter(samples)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = (self.rank, self.world) if self.rank is not None else rank_and_world()
        if not self.split_by_node:
            rank, world = 0, 1
        epoch, start, offset = self.epoch + self._iterations, self.start, self.worker_offset
        if self._iterations > 0:  # a persistent worker's later epoch: from its beginning
            start, offset = {}, 0
        self._iterations += 1
        worker = (wid + offset) % num_workers
        start_round, start_pos = start.get(worker, (0, 0))
        counter = SkipCounter(log_every=self.log_every)
        rounds = _count(start_round) if self.resampled else [start_round]
        samples = self._samples(rank, world, worker, num_workers, epoch, rounds, start_pos, counter)
        yield from self._batches(samples, counter, epoch, worker)

    def _samples(self, rank, world, worker, num_workers, epoch, rounds, start_pos, counter) -> Iterator:
        """(round, index, decoded sample) after `start_pos` raw samples of the first round."""
        for i, rnd in enumerate(rounds):
            tag = f"{self.seed}/rank{rank}/worker{worker}/epoch{epoch}/round{rnd}"
            shards = self.shards(rank, world, worker, num_workers, epoch, rnd)
            skip = start_pos if i == 0 else 0
            for index, raw in enumerate(self._raw(shards, counter, tag)):
                if index < skip:
                    continue  # read again, not decoded: the part of the round consumed before the resume
                if index == skip and skip:
                    counter.take()  # skips met while re-reading were reported before the resume
                rng = random.Random(f"{tag}/sample{index}")
                try:
                    decoded = self.decode(raw, rng)
                except SampleError as exn:
                    counter.skip(exn.reason, exn, f"{raw.get('__url__')}:{raw.get('__key__')}")
                    continue
                except Exception as exn:
                    counter.skip("other", exn, f"{raw.get('__url__')}:{raw.get('__key__')}")
                    continue
                yield rnd, index, decoded

    def _batches(self, samples: Iterator, counter: SkipCounter, epoch: int, worker: int) -> Iterator[dict]:
        collate = Batch(self.batch_size, counter).collate
        batch: list = []

        def emit(items: list) -> dict:
            out = collate([s for _, _, s in items])
            rnd, index, _ = items[-1]
            out["stream"] = torch.tensor([epoch, worker, rnd, index + 1], dtype=torch.long)
            return out

        for item in samples:
            if len(batch) == self.batch_size:  # collated when the next sample arrives: its skips come first
                yield emit(batch)
                batch = []
            batch.append(item)
        if batch and (len(batch) == self.batch_size or self.partial_batches):
            yield emit(batch)


def _count(start: int) -> Iterator[int]:
    n = start
    while True:
        yield n
        n += 1


def _shuffled(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Uniform pick from a buffer of `size` samples, filled to a tenth first, then growing every other sample."""
    initial = min(size, max(1, size // 10))
    buffer: list = []
    for count, sample in enumerate(samples, 1):
        buffer.append(sample)
        if len(buffer) >= size or (len(buffer) >= initial and count % 2 == 0):
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ResumableLoader(DataLoader):
    """A DataLoader over a `ShardStream` whose `state_dict()` is the position of the stream after the batches the
    training step has consumed (`mark_consumed(batch)`), on every rank; `load_state_dict()` makes the next
    iteration continue with exactly the batch that would have come next.

    Lightning saves `state_dict()` in each checkpoint's loop state and calls `load_state_dict()` on resume.
    Batches arrive from the workers in turn (0, 1, …, skipping workers whose share is read), so a resumed
    loader lets physical worker 0 play the worker whose batch was due.
    """

    def __init__(self, dataset: ShardStream, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._next_epoch = 0
        self._epoch = 0
        self._positions: dict[int, tuple[int, int]] = {}
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
            epoch, start, offset = (
                self._resume["epoch"],
                self._resume["positions"],
                self._resume["next_worker"],
            )
            self._resume = None
        else:
            epoch, start, offset = self._next_epoch, {}, 0
        stream.set_epoch(epoch, start, offset)
        self._epoch, self._next_epoch = epoch, epoch + 1
        self._positions, self._next_worker = dict(start), offset
        return _timed(super().__iter__(), self)

    def mark_consumed(self, batch: dict) -> None:
        if "stream" not in batch:
            return
        epoch, worker, rnd, position = (int(v) for v in batch["stream"].tolist())
        self._positions[worker] = (rnd, position)
        self._next_worker = (worker + 1) % self._workers

    def local_state(self) -> dict:
        stream: ShardStream = self.dataset
        return {
            "rank": rank_and_world()[0],
            "epoch": self._epoch,
            "num_workers": self._workers,
            "positions": {w: list(p) for w, p in self._positions.items()},
            "next_worker": self._next_worker,
            "resampled": stream.resampled,
            "seed": stream.seed,
            "urls": len(stream.urls),
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
        mine = (
            next((r for r in ranks if r.get("rank") == rank), None)
            if state.get("world_size") == world
            else None
        )
        if mine is not None and mine["num_workers"] == self._workers and mine["seed"] == self.dataset.seed:
            self._resume = {
                "epoch": mine["epoch"],
                "positions": {int(w): tuple(p) for w, p in mine["positions"].items()},
                "next_worker": mine["next_worker"],
            }
            self._next_epoch = mine["epoch"]
            log.info("data stream resumes at epoch %d, positions %s", mine["epoch"], mine["positions"])
            return
        # another world size, worker count or seed: the saved positions mean nothing here
        epoch = max((r["epoch"] for r in ranks), default=-1) + 1
        log.warning(
            "data stream saved with %s ranks × %s workers (seed %s); now %d ranks × %d workers (seed %d): "
            "cannot continue at the exact sample, starting epoch %d afresh",
            state.get("world_size"),
            ranks[0]["num_workers"] if ranks else "?",
            ranks[0]["seed"] if ranks else "?",
            world,
            self._workers,
            self.dataset.seed,
            epoch,
        )
        self._next_epoch = epoch


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
