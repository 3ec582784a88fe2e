"""Latent statistics, the cached-latent shards (writer and reader), and stage 2 trained from them."""

import io
import json
import tarfile

import open_clip
import pytest
import torch
from PIL import Image

from ldm.conditioning import FrozenOpenCLIPTextEncoder
from ldm.data.latents import CACHE_INFO, decode_latents_member, encode_latents_member, latent_pipeline
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.webdataset import image_text_pipeline
from ldm.inference import load_autoencoder
from ldm.latent_cache import (
    LatentMoments,
    cache_info,
    cache_latents,
    image_batches,
    measure_latent_stats,
    shard_name,
    store_latent_stats,
)
from ldm.models import KLAutoencoder
from ldm.utils.checkpoint import atomic_save, load_bundle
from ldm.utils.sd_import import stage1_checkpoint

from .helpers import compose_train

TINY_AE = {
    "_target_": "ldm.models.KLAutoencoder",
    "base_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "latent_channels": 4,
    "num_groups": 8,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_synthetic_shards(out, num_samples=40, samples_per_shard=16, resolution=32, seed=1)  # 16 + 16 + 8
    return out


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A stage-1 checkpoint as train.py writes it (random weights: the cache's job is bookkeeping, not quality)."""
    torch.manual_seed(0)
    ae = KLAutoencoder(**{k: v for k, v in TINY_AE.items() if k != "_target_"})
    path = tmp_path_factory.mktemp("vae") / "last.ckpt"
    arch = {k: v for k, v in TINY_AE.items() if k != "_target_"}
    atomic_save(stage1_checkpoint(arch, ae.state_dict(), latent_scale=None, resolution=32), path)
    return path


def _cache(ae_ckpt, shards, out, **kwargs):
    ae, bundle = load_autoencoder(ae_ckpt)
    text_encoder = kwargs.pop("text_encoder", None)
    resolution = kwargs.pop("resolution", 32)
    info = cache_info(ae_ckpt, bundle, resolution, "center", text_encoder, str(shards))
    return cache_latents(
        ae,
        str(shards),
        out,
        resolution,
        batch_size=6,
        text_encoder=text_encoder,
        num_workers=0,
        info=info,
        progress=False,
        **kwargs,
    )


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
    reports = [_cache(ae_ckpt, shards, out, rank=r, world_size=2) for r in (0, 1)]  # two processes' shares
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
    _cache(ae_ckpt, shards, out)
    first, second = sorted(out.glob("*.tar"))[:2]
    before = first.stat().st_mtime_ns
    second.unlink()  # as if the job had been killed before this shard was complete
    report = _cache(ae_ckpt, shards, out)
    assert (report.shards_written, report.shards_skipped) == (1, 2)
    assert first.stat().st_mtime_ns == before and second.is_file()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ValueError, match="different 'resolution'"):
        _cache(ae_ckpt, shards, out, resolution=16)


def test_corrupt_image_is_skipped_and_counted_when_caching(ae_ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "bad-000000.tar", "w") as tar:
        for key, data in [("a", _png()), ("b", b"not an image"), ("c", _png())]:
            for ext, payload in [("png", data), ("txt", f"caption {key}".encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    report = _cache(ae_ckpt, src, tmp_path / "cache")
    assert report.samples == 2 and report.skipped_samples == {"decode_error": 1}


def test_text_encodings_are_cached_only_for_pretrained_encoders(shards, ae_ckpt, tmp_path):
    random_encoder = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    with pytest.raises(ValueError, match="pretrained text encoder"):
        _cache(ae_ckpt, shards, tmp_path / "random", text_encoder=random_encoder)
    weights = (
        tmp_path / "open_clip_pytorch_model.bin"
    )  # a "pretrained" tiny CLIP, saved as open_clip ships one
    torch.save(open_clip.create_model("ldm-tiny-text", pretrained=None).state_dict(), weights)
    encoder = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(weights))
    _cache(ae_ckpt, shards, tmp_path / "cache", text_encoder=encoder)
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
    _cache(ae_ckpt, shards, out)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the autoencoder encoder ran in the training step")

    monkeypatch.setattr(KLAutoencoder, "encode", no_encoding)
    cfg = compose_train(
        "experiment=tiny",
        "data=latents",
        f"data.train_urls={out}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "trainer.max_steps=3",
        "optim.warmup_steps=1",
        "logger=csv",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.at_train_end=false",
        run_dir=str(tmp_path / "run"),
    )
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
