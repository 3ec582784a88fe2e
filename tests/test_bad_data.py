"""The bad-data corpus (ldm.data.bad_data) through the real pipeline and a real training run: every damaged
sample skipped and counted under its reason, every odd but valid format converted and delivered."""

import resource
import time

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data import bad_data
from ldm.data.bad_data import jpeg_bomb, png_bomb, write_bad_data_shards
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.transforms import SampleError, decode_image
from ldm.data.webdataset import SKIP_REASONS, image_text_pipeline

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
