"""Latent statistics, the cached-latent shards (writer and reader), and stage 2 trained from them."""

import csv
import io
import json
import re
import shutil
import tarfile
from collections import Counter

import lightning as L
import open_clip
import pytest
import torch
from PIL import Image

from ldm.conditioning import FrozenOpenCLIPTextEncoder
from ldm.data.buckets import make_buckets, nearest_bucket
from ldm.data.latents import CACHE_INFO, decode_latents_member, encode_latents_member, latent_pipeline
from ldm.data.loader import ResumableLoader
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.webdataset import image_text_pipeline
from ldm.inference import load_autoencoder
from ldm.latent_cache import shard_name
from ldm.latent_stats import LatentMoments, image_batches, measure_latent_stats, store_latent_stats
from ldm.models import KLAutoencoder
from ldm.utils.checkpoint import atomic_save, load_bundle
from ldm.utils.sd_import import stage1_checkpoint

from .helpers import compose_train
from .latent_helpers import (
    BUCKETS,
    TINY_AE,
    cache_members,
    cache_shards,
    latent_run,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_synthetic_shards(out, num_samples=40, samples_per_shard=16, resolution=32, seed=1)  # 16 + 16 + 8
    return out


def test_latent_moments_match_torch_and_pool_batches():
    z = torch.randn(10, 4, 3, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.3
    moments = LatentMoments(4)
    for chunk in z.split([3, 7]):
        moments.update(chunk)
    stats = moments.stats()
    assert stats.num_samples == 10
    assert stats.mean == pytest.approx(z.double().mean().item(), rel=1e-9)
    assert stats.std == pytest.approx(z.double().std(unbiased=False).item(), rel=1e-9)
    assert stats.scale == pytest.approx(1 / stats.std)
    per_channel = z.double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(
        torch.tensor(stats.channel_std, dtype=torch.float64), per_channel.std(1, unbiased=False)
    )
    torch.testing.assert_close(torch.tensor(stats.channel_mean, dtype=torch.float64), per_channel.mean(1))


def test_measure_latent_stats_stops_at_max_samples(shards, ae_ckpt):
    ae, _ = load_autoencoder(ae_ckpt)
    stats = measure_latent_stats(ae.encode, image_batches(str(shards), 32, 6, num_workers=0), 10)
    assert stats.num_samples == 10
    # the posterior mode gives the statistics of the encoder means exactly
    images = next(image_batches(str(shards), 32, 10, num_workers=0))
    mode = measure_latent_stats(ae.encode, [images], 10, sample_posterior=False)
    assert mode.std == pytest.approx(ae.encode(images).mean.double().std(unbiased=False).item(), rel=1e-5)


def test_store_latent_stats_feeds_stage_2(shards, ae_ckpt, tmp_path):
    ae, _ = load_autoencoder(ae_ckpt)
    stats = measure_latent_stats(ae.encode, image_batches(str(shards), 32, 8, num_workers=0), 16)
    out = store_latent_stats(ae_ckpt, stats, use_shift=True, out=tmp_path / "measured.ckpt")
    bundle, _ = load_bundle(out)
    assert bundle["latent_scale"] == pytest.approx(1 / stats.std) and bundle["latent_shift"] == stats.mean
    assert bundle["latent_stats"]["num_samples"] == 16
    assert load_bundle(ae_ckpt)[0].get("latent_scale") is None  # out= leaves the original alone

    from ldm.training.run import _adopt_autoencoder_config, build_module

    cfg = compose_train("experiment=tiny", f"data.train_urls={shards}", f"autoencoder_ckpt={out}")
    _adopt_autoencoder_config(cfg)
    codec = build_module(cfg).codec
    assert float(codec.scale) == pytest.approx(1 / stats.std) and float(codec.shift) == pytest.approx(
        stats.mean
    )


def test_shard_names():
    assert shard_name("/data/laion/00042.tar") == "00042.tar"
    assert shard_name("pipe:aws s3 cp s3://bucket/laion/part-00007.tar -") == "part-00007.tar"
    with pytest.raises(ValueError, match=r"\*\.tar"):
        shard_name("pipe:cat /dev/null")


def test_cache_holds_the_posterior_captions_and_metadata(shards, ae_ckpt, tmp_path):
    out = tmp_path / "cache"
    reports = [
        cache_shards(ae_ckpt, shards, out, rank=r, world_size=2) for r in (0, 1)
    ]  # two processes' shares
    assert [r.shards_written for r in reports] == [2, 1] and sum(r.samples for r in reports) == 40
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in shards.glob("*.tar"))
    info = json.loads((out / CACHE_INFO).read_text())
    assert info["resolution"] == 32 and info["autoencoder"] == TINY_AE and info["text_encoder"] is None

    ae, _ = load_autoencoder(ae_ckpt)
    source = {
        b["key"][i]: (b["image"][i], b["caption"][i])
        for b in image_text_pipeline(
            str(shards), 32, 8, crop="center", shuffle_buffer=0, resampled=False, partial_batches=True
        )
        for i in range(len(b["key"]))
    }
    seen = 0
    for batch in latent_pipeline(str(out), 8, shuffle_buffer=0, resampled=False, partial_batches=True):
        assert set(batch) >= {"latent_mean", "latent_std", "caption", "key"} and "text_tokens" not in batch
        images = torch.stack([source[k][0] for k in batch["key"]])
        posterior = ae.encode(images)
        torch.testing.assert_close(batch["latent_mean"], posterior.mean, atol=2e-3, rtol=2e-3)  # fp16 storage
        torch.testing.assert_close(batch["latent_std"], posterior.std, atol=2e-3, rtol=2e-3)
        assert batch["caption"] == [source[k][1] for k in batch["key"]]
        seen += len(batch["key"])
    assert seen == 40
    with tarfile.open(next(out.glob("*.tar"))) as tar:  # the json metadata travels unchanged
        members = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert members == {"latents.safetensors", "txt", "json"}


def test_cache_resumes_and_refuses_other_settings(shards, ae_ckpt, tmp_path):
    out = tmp_path / "cache"
    cache_shards(ae_ckpt, shards, out)
    first, second = sorted(out.glob("*.tar"))[:2]
    before = first.stat().st_mtime_ns
    second.unlink()  # as if the job had been killed before this shard was complete
    report = cache_shards(ae_ckpt, shards, out)
    assert (report.shards_written, report.shards_skipped) == (1, 2)
    assert first.stat().st_mtime_ns == before and second.is_file()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ValueError, match="different 'resolution'"):
        cache_shards(ae_ckpt, shards, out, resolution=16)


def test_corrupt_image_is_skipped_and_counted_when_caching(ae_ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "bad-000000.tar", "w") as tar:
        for key, data in [("a", _png()), ("b", b"not an image"), ("c", _png())]:
            for ext, payload in [("png", data), ("txt", f"caption {key}".encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    report = cache_shards(ae_ckpt, src, tmp_path / "cache")
    assert report.samples == 2 and report.skipped_samples == {"decode_error": 1}


def test_text_encodings_are_cached_only_for_pretrained_encoders(shards, ae_ckpt, tmp_path):
    random_encoder = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    with pytest.raises(ValueError, match="pretrained text encoder"):
        cache_shards(ae_ckpt, shards, tmp_path / "random", text_encoder=random_encoder)
    weights = (
        tmp_path / "open_clip_pytorch_model.bin"
    )  # a "pretrained" tiny CLIP, saved as open_clip ships one
    torch.save(open_clip.create_model("ldm-tiny-text", pretrained=None).state_dict(), weights)
    encoder = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(weights))
    cache_shards(ae_ckpt, shards, tmp_path / "cache", text_encoder=encoder)
    batch = next(iter(latent_pipeline(str(tmp_path / "cache"), 5, shuffle_buffer=0, resampled=False)))
    expected = encoder(batch["caption"])
    torch.testing.assert_close(batch["text_tokens"], expected.tokens, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(batch["text_pooled"], expected.pooled, atol=5e-3, rtol=5e-3)
    assert torch.equal(batch["text_mask"], expected.mask)


def test_latents_member_round_trip_and_damage():
    mean, std = torch.randn(4, 2, 3), torch.rand(4, 2, 3)
    out = decode_latents_member(encode_latents_member(mean, std, text_mask=torch.tensor([True, False])))
    torch.testing.assert_close(out["latent_mean"], mean.half().float())
    assert out["text_mask"].dtype == torch.bool and out["text_mask"].tolist() == [True, False]
    from ldm.data.transforms import SampleError

    with pytest.raises(SampleError):
        decode_latents_member(b"garbage")


def test_stage2_trains_from_cached_latents_without_encoding(shards, ae_ckpt, tmp_path, monkeypatch):
    from ldm.training.run import train

    out = tmp_path / "cache"
    cache_shards(ae_ckpt, shards, out)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the autoencoder encoder ran in the training step")

    monkeypatch.setattr(KLAutoencoder, "encode", no_encoding)
    cfg = compose_train(*latent_run(out, batch_size=8, steps=3), run_dir=str(tmp_path / "run"))
    result = train(cfg)  # autoencoder_ckpt and resolution come from the cache's cache_info.json
    bundle, _ = load_bundle(result["checkpoint"])
    assert result["global_step"] == 3 and bundle["config"]["data"]["resolution"] == 32
    assert bundle["config"]["autoencoder_ckpt"] == str(ae_ckpt.resolve())
    assert bundle["latent_scale"] > 0


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_launcher_rank_from_torchrun_then_slurm(monkeypatch):
    from ldm.utils.launcher import launcher_rank

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_rank() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launcher_rank() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_rank() == (2, 4, 0)  # torchrun's variables win; LOCAL_RANK unset → 0


# ---------------------------------------------------------------- a cache written with aspect-ratio buckets


def test_bucketed_cache_holds_each_image_at_its_bucket_with_micro_conditioning(
    mixed_shards, ae_ckpt, tmp_path
):
    shards, sizes, originals = mixed_shards
    out = tmp_path / "cache"
    report = cache_shards(ae_ckpt, shards, out, buckets=BUCKETS, batch_size=4)
    assert report.samples == 30 and report.shards_written == 3
    buckets = make_buckets(32, 8, 2.0)
    assert report.sizes == Counter(nearest_bucket(*size, buckets) for size in sizes.values())
    info = json.loads((out / CACHE_INFO).read_text())
    assert info["buckets"] == {**BUCKETS, "base": None, "sizes": [list(hw) for hw in buckets]}

    # the cache holds what training on the images with the same buckets would encode
    ae, _ = load_autoencoder(ae_ckpt)
    source = {
        b["key"][0]: b
        for b in image_text_pipeline(
            str(shards), 32, 1, crop="center", shuffle_buffer=0, resampled=False, buckets=BUCKETS
        )
    }
    assert sorted(source) == sorted(sizes)
    seen, shapes = [], set()
    for batch in latent_pipeline(str(out), 4, shuffle_buffer=0, resampled=False, partial_batches=True):
        shapes.add(tuple(batch["latent_mean"].shape[-2:]))
        for i, key in enumerate(batch["key"]):
            bucket = nearest_bucket(*sizes[key], buckets)
            assert tuple(batch["latent_mean"].shape[-2:]) == (bucket[0] // 2, bucket[1] // 2)
            image = source[key]
            torch.testing.assert_close(
                batch["latent_mean"][i], ae.encode(image["image"]).mean[0], atol=2e-3, rtol=2e-3
            )
            for name in ("original_size", "crop_coords", "target_size"):
                assert torch.equal(batch[name][i], image[name][0]), name
            assert tuple(batch["original_size"][i].tolist()) == originals[key]
        seen += batch["key"]
    assert sorted(seen) == sorted(sizes)  # every image once
    assert shapes == {(h // 2, w // 2) for h, w in buckets}  # batches of one bucket each, all three met


def test_cache_writer_holds_a_bounded_number_of_images_whatever_the_buckets(mixed_shards):
    """Images wait in per-bucket queues until one fills; with many buckets most never do, and a whole shard would
    wait in memory (30 buckets of 1024-px images: gigabytes per worker). The writer encodes its fullest queue as
    soon as more than `max_queued` images wait."""
    from ldm.data.buckets import BucketDecoder, BucketTransform
    from ldm.data.webdataset import ImageDecoder
    from ldm.latent_cache import _ShardBatches

    shards, sizes, _ = mixed_shards
    transform = BucketTransform.from_spec(
        {"step": 4, "max_ratio": 3.0}, 32, crop="center"
    )  # 4 of 9 buckets met

    def most_waiting(max_queued: int) -> int:
        decoder, decoded = BucketDecoder(ImageDecoder(transform)), []

        def decode(raw, rng):
            decoded.append(raw["__key__"])
            return decoder(raw, rng)

        writer = _ShardBatches(sorted(str(p) for p in shards.glob("*.tar")), decode, batch_size=4)
        writer.max_queued = max_queued
        keys, most, shard_ends = [], 0, 0
        for batch in writer:
            most = max(most, len(decoded) - len(keys))  # the batch included: held until now
            keys += batch["key"]
            shard_ends += batch["last"]
            assert len(batch["key"]) <= 4 and len({tuple(x.shape) for x in batch["image"]}) <= 1
        assert sorted(keys) == sorted(sizes) and shard_ends == 3  # every image once, whatever the bound
        return most

    assert _ShardBatches([], None, batch_size=4).max_queued == 8  # the default: two batches
    unbounded = most_waiting(10**9)
    assert most_waiting(4) == 5 < unbounded  # the 5th image tips the fullest queue out


def test_random_crops_of_a_cache_are_fixed_by_the_key(mixed_shards, ae_ckpt, tmp_path):
    shards = mixed_shards[0]
    cache_shards(ae_ckpt, shards, tmp_path / "one", crop="random", buckets=BUCKETS)
    for rank in (0, 1):  # two processes' shares, batched differently
        cache_shards(
            ae_ckpt,
            shards,
            tmp_path / "two",
            crop="random",
            buckets=BUCKETS,
            rank=rank,
            world_size=2,
            batch_size=3,
        )
    one, two = cache_members(tmp_path / "one"), cache_members(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 30
    for key in one:
        assert torch.equal(one[key]["crop_coords"], two[key]["crop_coords"])
        torch.testing.assert_close(one[key]["latent_mean"], two[key]["latent_mean"], atol=1e-3, rtol=0)
    crops = {tuple(m["crop_coords"].tolist()) for m in one.values()}
    assert len(crops) > 2  # random, not all centred
    assert json.loads((tmp_path / "one" / CACHE_INFO).read_text())["crop"] == "random"


def test_bucketed_cache_refuses_other_buckets_and_sizes_the_autoencoder_cannot_take(
    mixed_shards, ae_ckpt, tmp_path
):
    shards = mixed_shards[0]
    out = tmp_path / "cache"
    cache_shards(ae_ckpt, shards, out)  # square
    with pytest.raises(ValueError, match="different 'buckets'"):
        cache_shards(ae_ckpt, shards, out, buckets=BUCKETS)
    with pytest.raises(ValueError, match="multiples of the autoencoder's downsampling"):
        cache_shards(
            ae_ckpt, shards, tmp_path / "odd", buckets={"step": 3}
        )  # the tiny autoencoder downsamples 2×
    legacy = json.loads((out / CACHE_INFO).read_text())
    del legacy["buckets"]  # a cache_info.json written before buckets existed was square
    (out / CACHE_INFO).write_text(json.dumps(legacy))
    assert cache_shards(ae_ckpt, shards, out).shards_skipped == 3
    with pytest.raises(ValueError, match="different 'buckets'"):
        cache_shards(ae_ckpt, shards, out, buckets=BUCKETS)


def _latent_loader(urls):
    stream = latent_pipeline(urls, 3, shuffle_buffer=6, resampled=True, round_shards=1)
    return ResumableLoader(stream, num_workers=0)


def test_resumed_bucketed_latent_stream_continues_with_the_next_batches(
    mixed_shards, ae_ckpt, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    cache_shards(ae_ckpt, mixed_shards[0], out, buckets=BUCKETS)
    monkeypatch.setenv("WORLD_SIZE", "1")

    def consume(loader, n):
        batches = []
        for batch in loader:
            loader.mark_consumed(batch)
            batches.append(batch)
            if len(batches) == n:
                return batches
        raise AssertionError("the resampled stream ended")

    expected = consume(_latent_loader(str(out)), 16)
    waited = 0
    for stop in (3, 7, 12):
        first = _latent_loader(str(out))
        before = consume(first, stop)
        state = first.state_dict()
        waited += sum(len(p) for p in state["ranks"][0]["pending"].values())
        resumed = _latent_loader(str(out))
        resumed.load_state_dict(state)
        got = before + consume(resumed, 16 - stop)
        assert [b["key"] for b in got] == [b["key"] for b in expected]
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(
                a["crop_coords"], b["crop_coords"]
            )
    assert waited > 0  # some stop had samples waiting in the queues of other buckets


class _BatchShapes(L.Callback):
    def __init__(self):
        self.shapes, self.micro = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["latent_mean"].shape[-2:]))
        self.micro.append("original_size" in batch)


def test_stage2_trains_on_a_bucketed_cache_with_micro_conditioning(mixed_shards, ae_ckpt, tmp_path):
    from ldm.training.run import train

    out = tmp_path / "cache"
    cache_shards(ae_ckpt, mixed_shards[0], out, buckets=BUCKETS)
    seen = _BatchShapes()
    run = [*latent_run(out, batch_size=3, steps=6), "unet.micro_conditioning=true"]
    cfg = compose_train(*run, "trainer.log_every_n_steps=1", run_dir=str(tmp_path / "run"))
    result = train(cfg, extra_callbacks=[seen])
    assert result["global_step"] == 6 and all(seen.micro)
    assert len(set(seen.shapes)) > 1  # the steps met several buckets
    ckpt = load_bundle(result["checkpoint"])[1]
    assert any(
        "micro" in name for name in ckpt["state_dict"]
    )  # the micro-conditioning layer was built and saved

    # the FLOPs of each step follow its bucket's area: counted on the first batch, scaled by latent elements
    flops = ckpt["callbacks"]["ThroughputCallback"]["flops_per_batch"]
    (metrics,) = (tmp_path / "run").glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("perf/tflops_per_device")]
    assert len(rows) == 6
    first = seen.shapes[0][0] * seen.shapes[0][1]
    for row, (h, w) in zip(rows, seen.shapes, strict=True):
        step_flops = float(row["perf/tflops_per_device"]) * float(row["perf/step_time"]) * 1e12
        assert step_flops == pytest.approx(flops * h * w / first, rel=1e-6)

    odd = tmp_path / "odd"  # 2-px steps: latent sizes the autoencoder gives, but not all the UNet halves
    cache_shards(ae_ckpt, mixed_shards[0], odd, buckets={"step": 2})
    cfg = compose_train(*run, f"data.train_urls={odd}", run_dir=str(tmp_path / "run-odd"))
    with pytest.raises(ValueError, match="cache again with buckets.step a multiple of 4"):
        train(cfg)


def test_cache_cli_applies_crop_and_buckets(mixed_shards, ae_ckpt, tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT

    shards = mixed_shards[0]
    cmd = [
        sys.executable,
        "scripts/cache_latents.py",
        f"autoencoder_ckpt={ae_ckpt}",
        f"urls={shards}",
        f"out_dir={tmp_path / 'cli'}",
        "crop=random",
        "buckets={step: 8, max_ratio: 2.0}",
        "flips=true",
        "batch_size=4",
        "num_workers=0",
        "device=cpu",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"3 shards written \(30 samples in \d+ s, [\d.]+ img/s\)", proc.stdout), proc.stdout
    info = json.loads((tmp_path / "cli" / CACHE_INFO).read_text())
    assert info["crop"] == "random" and info["buckets"]["step"] == 8 and info["flips"] is True
    shares = re.search(r"images per bucket \(h x w\): (.*)", proc.stdout).group(1)
    counts = Counter(nearest_bucket(*size, make_buckets(32, 8, 2.0)) for size in mixed_shards[1].values())
    printed = {
        tuple(map(int, hw.split("x"))): float(pct) for hw, pct in re.findall(r"(\d+x\d+) ([\d.]+) %", shares)
    }
    assert printed == {hw: round(100 * n / 30, 1) for hw, n in counts.items()}
    cache_shards(ae_ckpt, shards, tmp_path / "api", crop="random", buckets=BUCKETS, flips=True)
    cli, api = cache_members(tmp_path / "cli"), cache_members(tmp_path / "api")
    for name in ("crop_coords", "crop_coords_flip"):
        assert {k: v[name].tolist() for k, v in cli.items()} == {k: v[name].tolist() for k, v in api.items()}


def test_training_and_held_out_caches_must_come_from_the_run_s_encoders(shards, ae_ckpt, tmp_path):
    """A held-out cache (data.val_urls) made by another autoencoder or text encoder would give a val/loss that means
    nothing; like the training cache, it is refused before training, naming the folder."""
    from ldm.training.run import _adopt_autoencoder_config, _check_cached_text_encoder

    ours, other = tmp_path / "ours", tmp_path / "other"
    cache_shards(ae_ckpt, shards, ours)
    torch.manual_seed(1)
    arch = {**{k: v for k, v in TINY_AE.items() if k != "_target_"}, "base_channels": 8}
    other_ckpt = tmp_path / "other-vae.ckpt"
    atomic_save(
        stage1_checkpoint(arch, KLAutoencoder(**arch).state_dict(), latent_scale=None, resolution=32),
        other_ckpt,
    )
    cache_shards(other_ckpt, shards, other)

    def adopt(train, val, *overrides):
        cfg = compose_train(
            "experiment=tiny", "data=latents", f"data.train_urls={train}", f"data.val_urls={val}", *overrides
        )
        _adopt_autoencoder_config(cfg)
        return cfg

    assert adopt(ours, ours).autoencoder_ckpt == str(ae_ckpt.resolve())
    other_size = compose_train(
        "experiment=tiny", "data=latents", f"data.train_urls={ours}", "data.resolution=64"
    )
    with pytest.raises(
        ValueError, match=f"data.resolution=64, but the latents in {ours} were cached at 32 px"
    ):
        _adopt_autoencoder_config(other_size)  # e.g. experiment=laion_512 on a 256-px cache
    with pytest.raises(ValueError, match=f"latents in {other} were made by another autoencoder"):
        adopt(ours, other)

    # the same architecture: another step of the stage-1 run encodes differently; a decoder tuned alone does not
    later, tuned = tmp_path / "later-step.ckpt", tmp_path / "decoder-tuned.ckpt"
    for path, name in ((later, "encoder.conv_in.weight"), (tuned, "decoder.conv_out.weight")):
        ckpt = torch.load(ae_ckpt, weights_only=True, map_location="cpu")
        ckpt["state_dict"][f"autoencoder.{name}"] += 1e-3
        atomic_save(ckpt, path)
    with pytest.raises(ValueError, match=f"latents in {ours} were encoded by other encoder weights"):
        adopt(ours, ours, f"autoencoder_ckpt={later}")
    assert adopt(ours, ours, f"autoencoder_ckpt={tuned}").autoencoder_ckpt == str(tuned)
    with pytest.raises(
        ValueError, match="different 'encoder_sha256'"
    ):  # resuming the cache with other weights
        cache_shards(later, shards, ours)
    legacy = tmp_path / "legacy"  # a cache_info.json written before the digest was recorded: not checked
    shutil.copytree(ours, legacy)
    info = json.loads((legacy / "cache_info.json").read_text())
    del info["encoder_sha256"]
    (legacy / "cache_info.json").write_text(json.dumps(info))
    assert adopt(legacy, legacy, f"autoencoder_ckpt={later}").autoencoder_ckpt == str(later)

    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model("ldm-tiny-text", pretrained=None).state_dict(), weights)
    texts = tmp_path / "with-text"
    cache_shards(
        ae_ckpt,
        shards,
        texts,
        text_encoder=FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(weights)),
    )
    cfg = adopt(ours, texts)  # same autoencoder: fine so far
    with pytest.raises(ValueError, match=f"text encodings cached in {texts} were made by text encoder"):
        _check_cached_text_encoder(cfg, FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None))
    _check_cached_text_encoder(cfg, FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(weights)))
    # cached text is one caption's encoding: a caption mix (data.captions) cannot use it
    cfg.data.captions = {"json.recaption": 0.9, "txt": 0.1}
    with pytest.raises(ValueError, match=f"but {texts} holds the text encoding of one caption per image"):
        _check_cached_text_encoder(cfg, FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(weights)))
