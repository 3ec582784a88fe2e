"""A shard stream that can be resumed at the exact sample (its DataLoader, which saves and restores the position, is
`ldm.data.loader.ResumableLoader`).

webdataset pipelines have no state: after a restart they begin again. Here every source of randomness is a
function of (seed, rank, worker, epoch, round, sample index) and nothing else, so each DataLoader worker's
stream is a pure function of where it stands. Its position is two numbers: the round (a group of shards read
together; an epoch's share of the shards when not resampled) and how many raw samples of that round it has
passed on. A resumed worker re-reads the tar bytes up to that point, through the shuffle buffer, without
decoding them, and goes on from there. With aspect-ratio buckets (`ldm.data.buckets`) a batch is the first of
several per-size queues to fill, so the position also lists the samples still waiting in the other queues;
a resumed worker decodes those again while re-reading and puts them back.

    per worker:  round r: shards(r) → tar samples → shuffle buffer(r) → [skip `position`] → decode(index) → queue per size → batch

`ldm.data.loader.ResumableLoader.state_dict()` holds, for every rank, the epoch, the position of each worker after the last
batch the training step consumed (not the last one prefetched), and which worker's batch comes next; every
rank's entry is gathered, so the checkpoint written by rank 0 holds all of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.transforms import SampleError
from ldm.data.webdataset import Batch, SkipCounter, TarSamples, expand_urls
from ldm.utils.launcher import rank_and_world

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A resampled stream that reads this many different shards (or all of them, when fewer) in a row without one
# usable sample stops with NoUsableSamples instead of searching forever.
BARREN_SHARDS = 64


CHECKED_SHARDS = 1000  # local shards whose existence a stream checks at start-up (evenly spaced)


class NoUsableSamples(RuntimeError):
    """Shards that yield no usable sample at all: missing, damaged, or everything filtered out."""


class ShardStream(IterableDataset):
    """Batches from WebDataset shards, for `DataLoader(stream, batch_size=None)`; resumable at the exact sample.

    decode: `decode(raw_sample, rng) -> dict`, raising `SampleError` for a sample to skip; `rng` is a
        `random.Random` of that sample alone (its augmentation does not depend on where the stream started).
    resampled: True → endless rounds of `round_shards` shards drawn with replacement, per rank and worker;
        False → one round per epoch: the shards, shuffled alike on every rank, split across ranks
        (`split_by_node`) and workers, each once.
    Every batch carries `stream`: (epoch, worker, round, position), a LongTensor (4,): where a resumed worker goes
    on reading, past the batch's last sample and the skipped samples after it, whose skips the batch reports.
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
        shard_retries: int = 3,
        retry_backoff: float = 0.25,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        _check_local_shards(self.urls)
        self.decode, self.batch_size = decode, batch_size
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.split_by_node, self.partial_batches, self.log_every = split_by_node, partial_batches, log_every
        self.shard_retries, self.retry_backoff = shard_retries, retry_backoff  # remote shards (TarSamples)
        self.round_shards = max(1, round_shards)
        # set by ResumableLoader in the main process before each iteration (the workers get copies)
        self.rank: int | None = None
        self.world: int | None = None
        self.epoch = 0
        self.worker_offset = 0  # physical worker w plays logical worker (w + offset) % num_workers
        self.start: dict[int, tuple[int, int]] = {}  # logical worker → (round, position) to resume from
        self.pending: dict[int, list[tuple[int, int]]] = {}  # logical worker → samples waiting in buckets
        self._iterations = 0  # iterations of this copy since `epoch` was set (persistent workers count on)

    def set_epoch(
        self,
        epoch: int,
        start: dict[int, tuple[int, int]] | None = None,
        worker_offset: int = 0,
        pending: dict[int, list[tuple[int, int]]] | None = None,
    ):
        """start: logical worker → (round, position); pending: logical worker → the (round, index) of the
        samples that waited in its bucket queues at that position (`ldm.data.buckets`)."""
        self.epoch, self.start, self.worker_offset = epoch, dict(start or {}), worker_offset
        self.pending = {w: [tuple(p) for p in items] for w, items in (pending or {}).items()}
        self._iterations = 0

    def fingerprint(self) -> dict:
        """What a saved position is a position in: the shard list (hashed) and what splits and orders it. A
        resume into a stream of another fingerprint starts a fresh epoch."""
        return {
            "shards": len(self.urls),
            "shard_list": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16],
            "resampled": self.resampled,
            "shuffle_buffer": self.shuffle_buffer,
            "round_shards": self.round_shards,
            "split_by_node": self.split_by_node,
        }

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
        read = TarSamples(counter, self.shard_retries, self.retry_backoff)
        samples: Iterable[dict] = read({"url": u} for u in shards)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(f"{tag}/shuffle"))
        return iter(samples)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = (self.rank, self.world) if self.rank is not None else rank_and_world()
        if not self.split_by_node:
            rank, world = 0, 1
        epoch, start, offset, pending = (
            self.epoch + self._iterations,
            self.start,
            self.worker_offset,
            self.pending,
        )
        if self._iterations > 0:  # a persistent worker's later epoch: from its beginning
            start, offset, pending = {}, 0, {}
        self._iterations += 1
        worker = (wid + offset) % num_workers
        start_round, start_pos = start.get(worker, (0, 0))
        counter = SkipCounter(log_every=self.log_every)
        rounds = _count(start_round) if self.resampled else [start_round]
        waiting = pending.get(worker, [])
        samples = self._samples(
            rank, world, worker, num_workers, epoch, rounds, start_pos, counter, waiting, worker in start
        )
        yield from self._batches(samples, counter, epoch, worker, (start_round, start_pos))

    def _samples(
        self, rank, world, worker, num_workers, epoch, rounds, start_pos, counter, pending=(), resuming=False
    ) -> Iterator:
        """(round, index, decoded sample, or None when skipped) after `start_pos` raw samples of the first round,
        preceded by the `pending` (round, index) samples, decoded again in read order: those that waited in bucket
        queues at the saved position (a round before the first is re-read up to its last pending sample).
        `resuming`: the skips met before the saved position were reported before the resume; not again."""
        waiting: dict[int, set[int]] = {}
        for rnd, index in pending:
            waiting.setdefault(rnd, set()).add(index)
        rounds = iter(rounds)
        first = next(rounds, None)
        if first is None:
            return

        def tag_of(rnd: int) -> str:
            return f"{self.seed}/rank{rank}/worker{worker}/epoch{epoch}/round{rnd}"

        def raw_of(rnd: int) -> Iterator[dict]:
            return self._raw(self.shards(rank, world, worker, num_workers, epoch, rnd), counter, tag_of(rnd))

        for rnd in sorted(r for r in waiting if r < first):  # resampled streams carry queues across rounds
            keep, stop = waiting[rnd], max(waiting[rnd]) + 1
            for index, raw in enumerate(raw_of(rnd)):
                if index >= stop:
                    break
                if index in keep and (decoded := self._decode(raw, tag_of(rnd), index, counter)) is not None:
                    yield rnd, index, decoded
        barren: set[str] = set()  # the shards of the rounds read since the last usable sample
        for i, rnd in enumerate(chain([first], rounds)):
            skip, keep = (start_pos, waiting.get(rnd, ())) if i == 0 else (0, ())
            shards = self.shards(rank, world, worker, num_workers, epoch, rnd)
            usable = skip > 0  # a round resumed part-way delivered samples before
            for index, raw in enumerate(self._raw(shards, counter, tag_of(rnd))):
                if index < skip:  # read again, not decoded: the part of the round consumed before the resume,
                    # but for the samples then waiting in bucket queues
                    if (
                        index in keep
                        and (decoded := self._decode(raw, tag_of(rnd), index, counter)) is not None
                    ):
                        yield rnd, index, decoded
                    continue
                if resuming:
                    counter.take()  # skips met while re-reading were reported before the resume
                    resuming = False
                decoded = self._decode(raw, tag_of(rnd), index, counter)
                usable = usable or decoded is not None
                yield rnd, index, decoded
            if resuming:  # saved at the end of the round (of the stream)
                counter.take()
                resuming = False
            barren = set() if usable else barren | set(shards)
            if self.resampled and len(barren) >= min(len(self.urls), BARREN_SHARDS):
                raise NoUsableSamples(
                    f"no usable sample in {len(barren)} different shards in a row (of {len(self.urls)}, e.g. "
                    f"{sorted(barren)[0]}); skipped so far: { ({k: v for k, v in counter.total.items() if v}) }. "
                    "Check data.train_urls / data.val_urls and the filters (data.filters: sizes, aspect, "
                    "scores); the log's first 'skipped' warning names the reason. An endless stream would "
                    "otherwise wait for a batch forever."
                )

    def _decode(self, raw: dict, tag: str, index: int, counter: SkipCounter) -> dict | None:
        """The sample decoded with its own generator, or None (counted) when it cannot be used."""
        rng = random.Random(f"{tag}/sample{index}")
        try:
            return self.decode(raw, rng)
        except SampleError as exn:
            counter.skip(exn.reason, exn, f"{raw.get('__url__')}:{raw.get('__key__')}")
        except Exception as exn:
            counter.skip("other", exn, f"{raw.get('__url__')}:{raw.get('__key__')}")
        return None

    def _batches(
        self, samples: Iterator, counter: SkipCounter, epoch: int, worker: int, head: tuple[int, int]
    ) -> Iterator[dict]:
        """Batches of one shape each (one aspect-ratio bucket; a single queue without buckets), each collated when
        the next good sample arrives (or the stream ends), with the skips met until then. A batch carries the read
        head (round, position) at that sample (the stream's end) and, in `stream_pending` (K, 2), the (round,
        index) of the samples then waiting in the other queues, oldest first: what a resumed worker needs."""
        collate = Batch(self.batch_size, counter).collate
        queues: dict[tuple, list] = {}
        full: tuple | None = None

        def emit(items: list, pending: list, position: tuple[int, int]) -> dict:
            out = collate([s for _, _, s in items])
            out["stream"] = torch.tensor([epoch, worker, *position], dtype=torch.long)
            if pending:
                out["stream_pending"] = torch.tensor(pending, dtype=torch.long)
            return out

        def waiting() -> list[tuple[int, int]]:
            return sorted((rnd, index) for queue in queues.values() for rnd, index, _ in queue)

        for item in samples:
            rnd, index, sample = item
            if sample is None:  # skipped, counted: reported by the next batch
                head = max(head, (rnd, index + 1))
                continue
            if full is not None:  # a resume from this batch starts at this sample
                yield emit(*full, max(head, (rnd, index)))
                full = None
            head = max(head, (rnd, index + 1))  # samples replayed into the queues lie behind the head
            key = Batch.shape_key(sample)
            queues.setdefault(key, []).append(item)
            if len(queues[key]) == self.batch_size:
                full = (queues.pop(key), waiting())
        if full is not None:
            yield emit(*full, head)
        if self.partial_batches:
            for queue in sorted(queues.values(), key=lambda q: q[0][:2]):  # oldest first
                del queues[Batch.shape_key(queue[0][2])]
                yield emit(queue, waiting(), head)


def _check_local_shards(urls: Sequence[str]) -> None:
    """A clear error when no local shard exists (a wrong path, or a brace pattern Hydra did not get quoted); a
    warning when some are missing (each is then skipped as a `tar_error` whenever it comes up). At most
    CHECKED_SHARDS evenly spaced shards are looked at: on a parallel file system every rank's stat of every one
    of 200k shards would be a start-up metadata storm."""
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)]
    step = -(-len(local) // CHECKED_SHARDS)  # ceil: every shard up to CHECKED_SHARDS of them
    checked = local[::step] if local else []
    missing = [u for u in checked if not os.path.isfile(u)]
    if not missing:
        return
    which = (
        f"{len(urls)} shard(s)"
        if step == 1
        else f"{len(checked)} shards checked (1 in {step} of {len(urls)})"
    )
    if len(missing) == len(checked) and len(local) == len(urls):
        raise FileNotFoundError(
            f"none of the {which} exists: {missing[0]}"
            + (f" … {missing[-1]}" if len(missing) > 1 else "")
            + ". Pass a folder of .tar shards, a file, or a brace pattern; quote a brace pattern for Hydra: "
            "data.train_urls='\"/data/laion/{00000..09999}.tar\"'"
        )
    log.warning(
        "%d of %s do not exist (e.g. %s); each is skipped as a tar_error whenever it comes up",
        len(missing),
        f"{len(urls)} shards" if step == 1 else which,
        missing[0],
    )


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
