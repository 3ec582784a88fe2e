"""The bad-data corpus (ldm.data.bad_data) through the real pipeline and a real training run: every damaged
sample skipped and counted under its reason, every odd but valid format converted and delivered."""

import json
import resource
import socket
import time
from itertools import islice

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from ldm.data import bad_data
from ldm.data.bad_data import jpeg_bomb, png_bomb, write_bad_data_shards
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.transforms import SampleError, decode_image
from ldm.data.webdataset import SKIP_REASONS, image_text_pipeline
from ldm.training.module_base import LDMModuleBase

from .helpers import FAST, compose_train

# what the corpus holds, counted by hand from its description: 2 corrupt JPEGs + 2 decompression bombs; one
# sample without an image; a non-UTF-8 txt and an unparseable json with no txt; 4 broken shards (cut inside a
# member, cut on a block boundary, empty, random bytes)
EXPECTED = {"decode_error": 4, "missing_image": 1, "bad_caption": 2, "tar_error": 4}
DELIVERED = 8 + 11 + 5 + 8  # good samples of shards 0, 1, 4 and the 11 odd-but-valid ones
RESOLUTION = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_bad_data_shards(tmp_path_factory.mktemp("bad"))


def _per_reason(batches) -> dict[str, int]:
    return {r: sum(int(b["skipped"][r]) for b in batches) for r in SKIP_REASONS}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_sample_is_counted_and_every_odd_one_converted(corpus, num_workers, monkeypatch):
    def no_sleep(seconds):
        raise AssertionError(f"time.sleep({seconds}): local damage is permanent, nothing to wait for")

    monkeypatch.setattr(time, "sleep", no_sleep)
    assert corpus.expected_skips == EXPECTED and len(corpus.kept) == DELIVERED
    pipeline = image_text_pipeline(
        corpus.urls, RESOLUTION, 5, crop="center", resampled=False, shuffle_buffer=0, partial_batches=True
    )
    batches = list(DataLoader(pipeline, batch_size=None, num_workers=num_workers))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(corpus.kept)  # each exactly once
    assert _per_reason(batches) == {**dict.fromkeys(SKIP_REASONS, 0), **EXPECTED}
    assert sum(int(b["n_skipped"]) for b in batches) == sum(EXPECTED.values())
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    assert captions == corpus.kept
    assert captions["image_only"] == captions["empty_caption"] == captions["no_caption_in_json"] == ""
    images = {k: im for b in batches for k, im in zip(b["key"], b["image"])}
    assert all(
        im.shape == (3, RESOLUTION, RESOLUTION) and im.dtype == torch.float32 for im in images.values()
    )
    assert {"cmyk_jpeg", "rgba_png", "grey16_png", "palette_png", "grey_jpeg", "one_pixel_png"} <= set(
        corpus.colors
    )
    for key, rgb in corpus.colors.items():
        pixels = (images[key] + 1) * 127.5  # (3, R, R) in [0, 255]
        expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None]
        assert (pixels - expected).abs().max() <= 2.0, (key, pixels.mean(dim=(1, 2)), rgb)


def test_decompression_bombs_are_refused_without_allocating(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for data in (png_bomb(), jpeg_bomb()):
        assert len(data) < 2000
        with pytest.raises(SampleError, match="DecompressionBomb") as info:
            decode_image(data, min_size=RESOLUTION)
        assert info.value.reason == "decode_error"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 512  # decoding 30000 x 30000 RGB would take 2.5 GiB


def test_cli_writes_the_corpus(tmp_path, capsys):
    bad_data.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"bad-{i:06d}.tar" for i in range(5)]
    assert f"samples delivered: {DELIVERED}" in capsys.readouterr().out


def _skip_batch(**counts: int) -> dict:
    """What a batch carries about skips (`ldm.data.webdataset.Batch`)."""
    skipped = {r: torch.tensor(counts.get(r, 0)) for r in SKIP_REASONS}
    return {"skipped": skipped, "n_skipped": torch.tensor(sum(counts.values()))}


def _log_skips_on_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module, logged = LDMModuleBase(optim=None), {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    # rank 0 meets 2 decode errors then nothing; rank 1 one tar error, then 3 dropped by a filter
    batches = [{"decode_error": 2}, {}] if rank == 0 else [{"tar_error": 1}, {"filter_aesthetic": 3}]
    for counts in batches:
        module.log_data_stats(_skip_batch(**counts))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(logged, f)
    dist.destroy_process_group()


def test_logged_skip_counts_are_summed_over_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_log_skips_on_rank, args=(port, str(tmp_path)), nprocs=2)
    expected = {f"data/skipped_{r}": 0.0 for r in SKIP_REASONS}
    expected.update({"data/skipped_decode_error": 2.0, "data/skipped_tar_error": 1.0})
    expected.update({"data/skipped_filter_aesthetic": 3.0, "data/skipped_samples": 6.0})
    for rank in (0, 1):  # each rank logs the run's totals (rank 0's reach the logger)
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_skip_counts_carry_across_a_checkpoint():
    first = LDMModuleBase(optim=None)
    first.log = lambda name, value, **kwargs: None
    first.log_data_stats(_skip_batch(decode_error=2, bad_caption=1))
    checkpoint = {"state_dict": {}, "optimizer_states": []}
    first.on_save_checkpoint(checkpoint)
    resumed, logged = LDMModuleBase(optim=None), {}
    resumed.on_load_checkpoint(checkpoint)
    resumed.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    resumed.log_data_stats(_skip_batch(decode_error=1))
    assert logged["data/skipped_decode_error"] == 3.0 and logged["data/skipped_bad_caption"] == 1.0
    assert logged["data/skipped_samples"] == 4.0


@pytest.mark.slow
def test_training_runs_through_the_corpus_and_logs_the_skips(tmp_path):
    """Stage 1 (vae_tiny) over the bad shards mixed with good ones, one pass: it trains, and the skip counts
    it logs are the corpus's."""
    from ldm.training.run import train

    data = tmp_path / "shards"
    write_bad_data_shards(data)
    write_synthetic_shards(data, num_samples=16, samples_per_shard=8, resolution=32, prefix="shapes")
    batch_size, samples = 8, DELIVERED + 16
    assert samples % batch_size == 0  # no partial batch is dropped: every skip reaches a batch
    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={data}",
        "data.resampled=false",
        f"trainer.max_steps={samples // batch_size}",
        "trainer.max_epochs=1",
        "stage.latent_stats_samples=0",
        "stage.loss.disc_start=1000",
        "logger=csv",
        *FAST,
        run_dir=str(tmp_path / "run"),
    )
    result = train(cfg)
    assert result["global_step"] == samples // batch_size
    metrics = result["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    logged = {r: metrics[f"data/skipped_{r}"] for r in SKIP_REASONS}
    assert logged == {**dict.fromkeys(SKIP_REASONS, 0.0), **{r: float(n) for r, n in EXPECTED.items()}}
    assert metrics["data/skipped_samples"] == sum(EXPECTED.values())


def test_missing_shards_fail_early_with_the_quoting_hint_or_are_counted(tmp_path, caplog):
    """No local shard at all (a wrong path, or a brace pattern Hydra did not get) is a clear error before any
    worker starts; a few missing among existing ones are a warning and a `tar_error` each time they come up."""
    write_synthetic_shards(tmp_path / "ok", num_samples=8, samples_per_shard=8, resolution=32, seed=0)
    with pytest.raises(
        FileNotFoundError, match=r"none of the 10 shard\(s\) exists: .*00000\.tar … .*00009\.tar"
    ):
        image_text_pipeline(str(tmp_path / "nowhere" / "{00000..00009}.tar"), 32, 4)
    with pytest.raises(FileNotFoundError, match="quote a brace pattern for Hydra"):
        image_text_pipeline(str(tmp_path / "no-such-folder"), 32, 4)

    shard = sorted((tmp_path / "ok").glob("*.tar"))[0]
    urls = [str(shard), str(tmp_path / "gone.tar")]
    with caplog.at_level("WARNING"):
        stream = image_text_pipeline(urls, 32, 4, resampled=False, shuffle_buffer=0, crop="center")
    assert "1 of 2 shards do not exist" in caplog.text
    batches = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert sum(len(b["key"]) for b in batches) == 8
    assert {r: n for r, n in _per_reason(batches).items() if n} == {"tar_error": 1}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_stream_without_one_usable_sample_stops_with_the_reason(tmp_path, num_workers):
    """A resampled stream whose shards give nothing (here a size filter above every image) would search forever;
    it stops once it has read every shard (or 64) in a row in vain, naming the skips. A finite pass that gives no
    batch is an error too (Lightning would run empty epochs without end). One good shard among bad ones keeps
    a resampled stream going."""
    from ldm.data.filters import SampleFilter
    from ldm.data.loader import ResumableLoader
    from ldm.data.stream import NoUsableSamples

    write_synthetic_shards(tmp_path / "a", num_samples=12, samples_per_shard=4, resolution=32, seed=0)
    too_big = SampleFilter(min_width=4096, size_from_image=True)
    stream = image_text_pipeline(str(tmp_path / "a"), 32, 4, filters=too_big, shuffle_buffer=0)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    with pytest.raises(
        NoUsableSamples, match=r"no usable sample in 3 different shards in a row .*'filter_size': \d+"
    ):
        next(iter(loader))  # from a worker too: the DataLoader raises the worker's exception again, same type

    # a finite pass over the same shards gives no batch: an error, not endless empty epochs
    finite = image_text_pipeline(str(tmp_path / "a"), 32, 4, filters=too_big, resampled=False)
    with pytest.raises(NoUsableSamples, match=r"epoch 0 gave no batch of 4 on rank 0 of 1: 3 shard\(s\)"):
        list(ResumableLoader(finite, num_workers=num_workers))

    # one usable shard among 3 that are cut short: the shards read in vain in a row never reach 3 (all of them)
    bad = tmp_path / "b"
    write_synthetic_shards(bad, num_samples=12, samples_per_shard=4, resolution=32, seed=1)
    shards = sorted(bad.glob("*.tar"))
    for path in shards[1:]:
        path.write_bytes(path.read_bytes()[:700])
    batches = list(
        islice(DataLoader(image_text_pipeline(str(bad), 32, 4, shuffle_buffer=0), batch_size=None), 6)
    )
    assert len(batches) == 6 and _per_reason(batches).get("tar_error", 0) > 0


def test_a_long_shard_list_is_checked_by_sample(tmp_path, monkeypatch):
    """Start-up looks at no more than CHECKED_SHARDS of the local shards (evenly spaced), not every one."""
    import ldm.data.stream as stream

    looked = []
    monkeypatch.setattr(stream.os.path, "isfile", lambda path: looked.append(path) or False)
    urls = [str(tmp_path / f"{i:05d}.tar") for i in range(2500)]
    with pytest.raises(FileNotFoundError, match=r"none of the 834 shards checked \(1 in 3 of 2500\) exists"):
        stream._check_local_shards(urls)
    assert looked == urls[::3] and len(looked) <= stream.CHECKED_SHARDS
