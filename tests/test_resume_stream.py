"""Exact resume of the data stream: after `state_dict` / `load_state_dict` the loader gives exactly the batches an
uninterrupted loader would have given next; within an epoch every sample is seen once over all ranks and workers.

Ranks are emulated with RANK / WORLD_SIZE (what `ResumableLoader` reads when torch.distributed is not set up);
the 2-process DDP test (tests/test_ddp_resume.py) runs the same code under a real process group.
"""

import io
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.filters import SampleFilter
from ldm.data.latents import encode_latents_member, latent_pipeline
from ldm.data.loader import ResumableLoader
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.webdataset import image_text_pipeline

from .helpers import write_tar

NUM_SHARDS, PER_SHARD = 8, 6


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream-shards")
    write_synthetic_shards(
        out, num_samples=NUM_SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, resolution=32
    )
    return str(out)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    """Cached-latent shards in the format `scripts/cache_latents.py` writes (posterior mean/std + caption)."""
    out = tmp_path_factory.mktemp("latent-shards")
    gen = torch.Generator().manual_seed(0)
    for s in range(NUM_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            key = f"{s * PER_SHARD + i:09d}"
            member = encode_latents_member(torch.randn(4, 4, 4, generator=gen), torch.rand(4, 4, 4) + 0.1)
            samples.append((key, {"latents.safetensors": member, "txt": f"c{key}".encode()}))
        write_tar(out / f"latents-{s:06d}.tar", samples)
    return str(out)


def _loader(kind, urls, num_workers, resampled, seed=0):
    common = dict(shuffle_buffer=10, resampled=resampled, seed=seed, round_shards=2)
    if kind == "images":
        stream = image_text_pipeline(urls, 16, 4, crop="random", hflip_prob=0.5, **common)
    else:
        stream = latent_pipeline(urls, 4, **common)
    return ResumableLoader(stream, num_workers=num_workers)


def _epochs(loader, max_epochs: int = 6):
    """Batches as a training loop meets them: one pass after another, marking each as consumed. (A loader
    resumed at the very end of an epoch has an empty pass first, as Lightning sees it.)"""
    for _ in range(max_epochs):
        for batch in loader:
            loader.mark_consumed(batch)
            yield batch


def _tensor(batch):
    return batch["image"] if "image" in batch else batch["latent_mean"]


def _same(a, b):
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(_tensor(x), _tensor(y))  # same crops and flips too


@pytest.mark.parametrize(
    "kind,num_workers,resampled,stop",
    [
        ("images", 0, False, 5),
        ("images", 2, False, 5),  # mid-epoch, the next batch due from worker 1
        ("images", 2, False, 12),  # at the epoch's end: the next epoch follows
        ("images", 2, True, 7),  # resampled, past the first round of some workers
        ("latents", 2, False, 3),
        ("latents", 0, True, 9),
    ],
)
def test_resumed_loader_continues_with_the_next_batches(
    kind, num_workers, resampled, stop, image_shards, latent_shards, monkeypatch
):
    urls = image_shards if kind == "images" else latent_shards
    total = 18
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        expected = list(islice(_epochs(_loader(kind, urls, num_workers, resampled)), total))
        assert len(expected) == total

        first = _loader(kind, urls, num_workers, resampled)
        before = list(islice(_epochs(first), stop))
        state = first.state_dict()
        del first
        resumed = _loader(kind, urls, num_workers, resampled)
        resumed.load_state_dict(state)
        after = list(islice(_epochs(resumed), total - stop))
        _same(before + after, expected)


@pytest.mark.parametrize("kind", ["images", "latents"])
def test_one_epoch_over_ranks_and_workers_sees_every_sample_once(
    kind, image_shards, latent_shards, monkeypatch
):
    """2 ranks × 2 workers, interrupted mid-epoch on each rank: still each sample once."""
    urls = image_shards if kind == "images" else latent_shards
    keys = []
    for rank, stop in ((0, 3), (1, 2)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        first = _loader(kind, urls, 2, resampled=False)
        it = iter(first)
        for batch in islice(it, stop):
            first.mark_consumed(batch)
            keys += batch["key"]
        state = first.state_dict()
        resumed = _loader(kind, urls, 2, resampled=False)
        resumed.load_state_dict(state)
        keys += [k for batch in resumed for k in batch["key"]]  # the rest of epoch 0
    # 8 shards of 6 over 4 workers: 12 samples each = 3 batches of 4, nothing dropped
    assert sorted(keys) == [f"{i:09d}" for i in range(NUM_SHARDS * PER_SHARD)]


def test_state_names_every_worker_and_rank(image_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = _loader("images", image_shards, 2, resampled=False)
    consumed = list(islice(_epochs(loader), 3))
    state = loader.state_dict()
    (mine,) = state["ranks"]  # without a process group, only this rank's entry
    assert state["world_size"] == 2 and mine["epoch"] == 0 and mine["num_workers"] == 2
    assert mine["next_worker"] == 1  # batches 0, 1, 0 came from workers 0, 1, 0
    assert mine["positions"] == {0: [0, 8], 1: [0, 4]}
    assert [int(b["stream"][1]) for b in consumed] == [0, 1, 0]


def test_other_worker_count_starts_a_fresh_epoch(image_shards, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    first = _loader("images", image_shards, 2, resampled=False)
    list(islice(_epochs(first), 2))
    resumed = _loader("images", image_shards, 0, resampled=False)
    resumed.load_state_dict(first.state_dict())
    batch = next(iter(resumed))
    assert int(batch["stream"][0]) == 1  # epoch 1, from its beginning
    assert "cannot continue at the exact sample" in caplog.text


@pytest.mark.parametrize(
    "change,named",
    [
        ({"urls": "one shard more"}, "shards 8 → 9"),
        ({"shuffle_buffer": 20}, "shuffle_buffer 10 → 20"),
        ({"round_shards": 3}, "round_shards 2 → 3"),
        ({"resampled": True}, "resampled False → True"),
    ],
)
def test_a_changed_stream_starts_a_fresh_epoch(image_shards, tmp_path, monkeypatch, caplog, change, named):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    settings = dict(shuffle_buffer=10, resampled=False, round_shards=2)
    first = ResumableLoader(image_text_pipeline(image_shards, 16, 4, **settings), num_workers=0)
    list(islice(_epochs(first), 2))
    urls = sorted(str(p) for p in Path(image_shards).glob("*.tar"))
    if change.pop("urls", None):
        extra = tmp_path / "extra.tar"
        extra.write_bytes(Path(urls[0]).read_bytes())
        urls.append(str(extra))
    stream = image_text_pipeline(urls, 16, 4, **{**settings, **change})
    resumed = ResumableLoader(stream, num_workers=0)
    resumed.load_state_dict(first.state_dict())
    assert int(next(iter(resumed))["stream"][0]) == 1  # epoch 1, from its beginning
    assert "cannot continue at the exact sample" in caplog.text and named in caplog.text


def test_a_state_saved_without_fingerprint_still_resumes(image_shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    expected = list(islice(_epochs(_loader("images", image_shards, 0, False)), 4))
    first = _loader("images", image_shards, 0, False)
    before = list(islice(_epochs(first), 2))
    state = first.state_dict()
    del state["ranks"][0]["fingerprint"]  # as written before it was saved
    resumed = _loader("images", image_shards, 0, False)
    resumed.load_state_dict(state)
    _same(before + list(islice(_epochs(resumed), 2)), expected)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """Good samples ("g"), corrupt JPEGs ("b") and captions too short for the filter ("f"), and a zero-byte shard
    (a tar error). With 2 workers: worker 0 reads shards 0 and 2 (12 good), worker 1 shards 1 and 3 (6 good),
    so every worker ends on a full batch of 2."""
    out = tmp_path_factory.mktemp("damaged-shards")
    members = {"g": {"jpg": _jpeg(), "txt": b"a caption"}, "b": {"jpg": b"\xff\xd8 cut", "txt": b"a caption"}}
    members["f"] = {"jpg": _jpeg(), "txt": b"a"}
    for s, kinds in enumerate(["ggbggffggg", "", "ggggbg", "gggggg"]):
        write_tar(out / f"s-{s}.tar", [(f"{s}_{i}_{k}", members[k]) for i, k in enumerate(kinds)])
    (out / "s-1.tar").write_bytes(b"")
    return str(out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_skip_is_reported_once_across_a_resume(damaged_shards, num_workers, monkeypatch):
    """Resumed after any batch, the batches report the skips the uninterrupted run reports: the corpus's, once."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def loader():
        stream = image_text_pipeline(
            damaged_shards,
            16,
            2,
            resampled=False,
            shuffle_buffer=0,
            filters=SampleFilter(min_caption_length=3),
        )
        return ResumableLoader(stream, num_workers=num_workers)

    def reports(batches):
        return [(b["key"], {r: int(n) for r, n in b["skipped"].items() if n}) for b in batches]

    expected = reports(loader())
    assert len(expected) == 9
    totals = {}
    for _, skipped in expected:
        for reason, n in skipped.items():
            totals[reason] = totals.get(reason, 0) + n
    assert totals == {"decode_error": 2, "filter_caption": 2, "tar_error": 1}
    for stop in range(1, len(expected)):
        first = loader()
        before = list(islice(_epochs(first, 1), stop))
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        assert reports(before + list(resumed)) == expected, stop
