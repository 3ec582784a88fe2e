"""Caption mixing (ldm.data.captions): alt text and synthetic recaptions drawn by weight per sample visit, on real
tar shards of JPEGs (image stream) and of cached latents, with exact resume and unchanged crops."""

import io
import json
import math
import random
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from ldm.data.captions import CaptionMix
from ldm.data.latents import encode_latents_member, latent_pipeline
from ldm.data.loader import ResumableLoader
from ldm.data.transforms import SampleError
from ldm.data.webdataset import image_text_pipeline

from .helpers import FAST, compose_train, write_tar

NUM_SHARDS, PER_SHARD = 3, 8


def _members(key: str, i: int) -> dict[str, bytes]:
    """Sample i: alt text always; a json recaption unless i % 4 == 3; a recap.txt member when i % 4 == 0."""
    members = {"txt": f"alt {key}".encode()}
    meta = {"caption": f"json-caption {key}", "width": 48, "height": 40}
    if i % 4 != 3:
        meta["recaption"] = f"a long synthetic description of {key}"
    members["json"] = json.dumps(meta).encode()
    if i % 4 == 0:
        members["recap.txt"] = f"short recap {key}".encode()
    return members


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("recaptioned")
    rng = np.random.default_rng(0)
    for s in range(NUM_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            key = f"{s * PER_SHARD + i:06d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            samples.append((key, {"jpg": buf.getvalue(), **_members(key, i)}))
        write_tar(out / f"shard-{s:06d}.tar", samples)
    return str(out)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    """Cached-latent shards as scripts/cache_latents.py writes them: the image's txt and json members kept."""
    out = tmp_path_factory.mktemp("recaptioned-latents")
    g = torch.Generator().manual_seed(0)
    for s in range(NUM_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            key = f"{s * PER_SHARD + i:06d}"
            member = encode_latents_member(torch.randn(4, 4, 4, generator=g), torch.rand(4, 4, 4) + 0.1)
            samples.append((key, {"latents.safetensors": member, **_members(key, i)}))
        write_tar(out / f"latents-{s:06d}.tar", samples)
    return str(out)


def _sources_of(key: str) -> dict[str, str]:
    i = int(key) % PER_SHARD
    found = {"txt": f"alt {key}"}
    if i % 4 != 3:
        found["json.recaption"] = f"a long synthetic description of {key}"
    if i % 4 == 0:
        found["recap.txt"] = f"short recap {key}"
    return found


# ---------------------------------------------------------------- the draw


def test_draws_follow_the_weights_renormalised_over_the_sources_a_sample_has():
    mix = CaptionMix({"json.recaption": 0.7, "recap.txt": 0.2, "txt": 0.1})
    full = {k: v for k, v in _members("k0", 0).items()}  # all three sources
    no_recap = {k: v for k, v in _members("k3", 3).items()}  # txt only among the weighted ones
    rng = random.Random(0)
    n = 6000
    counts = Counter(mix.choose(full, rng)[0] for _ in range(n))
    for source, p in (("json.recaption", 0.7), ("recap.txt", 0.2), ("txt", 0.1)):
        assert abs(counts[source] / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts
    assert mix.choose(full, rng)[1] in {"a long synthetic description of k0", "short recap k0", "alt k0"}
    assert {mix.choose(no_recap, rng) for _ in range(50)} == {("txt", "alt k3")}
    # without txt either, a json with only its default "caption" field has none of these sources
    only_json = {"json": json.dumps({"caption": "x"}).encode()}
    assert mix.choose(only_json, rng) == (None, "")


def test_zero_weight_sources_are_fallbacks_in_the_listed_order():
    mix = CaptionMix({"json.recaption": 1.0, "recap.txt": 0.0, "txt": 0.0})
    rng = random.Random(1)
    assert mix.choose(_members("a", 1), rng)[0] == "json.recaption"  # weighted source there: always it
    assert mix.choose(_members("b", 0), rng)[0] == "json.recaption"
    assert mix.choose({"recap.txt": b"r", "txt": b"t"}, rng) == ("recap.txt", "r")
    assert mix.choose({"txt": b"t", "json": b'{"recaption": "  "}'}, rng) == ("txt", "t")  # blank: absent


def test_bad_specs_and_bad_members():
    for spec, match in (
        ({}, "at least one source"),
        ({"txt": 0.0}, "weight > 0"),
        ({"txt": -1}, ">= 0"),
        ({"json.": 1.0}, "needs a field name"),
        ({"json": 1.0}, "not a text member"),
    ):
        with pytest.raises(ValueError, match=match):
            CaptionMix(spec)
    assert CaptionMix.build(None) is None and CaptionMix.build({}) is None
    mix = CaptionMix({"json.recaption": 1.0, "txt": 1.0})
    with pytest.raises(SampleError) as err:
        mix.choose({"txt": b"ok", "json": b"{not json"}, random.Random(0))
    assert err.value.reason == "bad_caption"
    with pytest.raises(SampleError) as err:
        CaptionMix({"txt": 1.0}).choose({"txt": b"\xff\xfe\xfa"}, random.Random(0))
    assert err.value.reason == "bad_caption"


# ---------------------------------------------------------------- in the streams


def _image_stream(urls, captions=None, **kwargs):
    settings = dict(crop="random", shuffle_buffer=6, resampled=False, seed=3, round_shards=2)
    return image_text_pipeline(urls, 32, 4, captions=captions, **{**settings, **kwargs})


def _epochs(loader, n):
    for _ in range(n):
        for batch in loader:
            if hasattr(loader, "mark_consumed"):
                loader.mark_consumed(batch)
            yield batch


def test_image_stream_draws_per_visit_and_leaves_crops_as_they_were(image_shards):
    weights = {"json.recaption": 0.5, "recap.txt": 0.25, "txt": 0.25}
    plain = list(_epochs(_image_stream(image_shards), 4))
    mixed = list(_epochs(_image_stream(image_shards, weights), 4))
    assert [b["key"] for b in plain] == [b["key"] for b in mixed]
    for a, b in zip(plain, mixed, strict=True):
        assert torch.equal(a["image"], b["image"])  # the caption draw comes after the crop's
        assert a["caption"] == [f"alt {k}" for k in a["key"]]  # default: txt
    seen: dict[str, set[str]] = {}
    for batch in mixed:
        for key, caption in zip(batch["key"], batch["caption"], strict=True):
            sources = _sources_of(key)
            assert caption in sources.values()
            seen.setdefault(key, set()).add(next(s for s, c in sources.items() if c == caption))
    assert len(seen) == NUM_SHARDS * PER_SHARD
    # 4 visits each: most samples with several sources met more than one of them
    several = [key for key in seen if len(_sources_of(key)) > 1]
    assert sum(len(seen[key]) > 1 for key in several) >= len(several) // 2
    # a sample without a recaption member or field always trains on its alt text
    assert all(seen[key] == {"txt"} for key in seen if len(_sources_of(key)) == 1)


def test_resumed_image_stream_draws_the_same_captions(image_shards):
    weights = {"json.recaption": 0.5, "txt": 0.5}

    def loader():
        return ResumableLoader(_image_stream(image_shards, weights, resampled=True), num_workers=2)

    expected = list(islice(_epochs(loader(), 5), 10))
    first = loader()
    before = list(islice(_epochs(first, 5), 4))
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    after = list(islice(_epochs(resumed, 5), 6))
    got = before + after
    assert [b["key"] for b in got] == [b["key"] for b in expected]
    assert [b["caption"] for b in got] == [b["caption"] for b in expected]


def test_latent_stream_draws_from_the_members_the_cache_kept(latent_shards):
    stream = latent_pipeline(
        latent_shards, 4, shuffle_buffer=0, resampled=False, captions={"json.recaption": 1.0, "txt": 0.0}
    )
    batches = list(stream)
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert len(captions) == NUM_SHARDS * PER_SHARD
    for key, caption in captions.items():
        sources = _sources_of(key)
        assert caption == sources.get("json.recaption", sources["txt"])
    drawn = Counter(s for b in batches for s in b["caption_source"])
    assert drawn == {"json.recaption": 18, "txt": 6}  # txt only where there is no recaption (i % 4 == 3)
    plain = latent_pipeline(latent_shards, 4, shuffle_buffer=0, resampled=False)
    assert all(c.startswith("alt ") for b in plain for c in b["caption"])


def test_data_config_carries_the_mix_to_train_and_val_loaders(image_shards):
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={image_shards}",
        f"data.val_urls={image_shards}",
        "data.resolution=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "data.captions={json.recaption: 1.0, txt: 0}",
    )
    dm = instantiate(cfg.data)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        for key, caption, source in zip(batch["key"], batch["caption"], batch["caption_source"], strict=True):
            sources = _sources_of(key)
            assert caption == sources.get("json.recaption", sources["txt"]) == sources[source]
    with pytest.raises(
        InstantiationException, match="weight > 0"
    ):  # when the config is built, not in a worker
        instantiate(compose_train("experiment=tiny", "data.train_urls=x", "data.captions={txt: 0}").data)


def test_stage2_logs_the_share_of_each_caption_source(image_shards, vae_ckpt, tmp_path):
    """A real tiny stage-2 run on the recaptioned shards: data/caption_source/<source> holds the running shares
    (what would show a misspelt field: json.recaptoin would read 0 and txt 1)."""
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={image_shards}",
        f"autoencoder_ckpt={vae_ckpt}",
        "data.resolution=32",
        "data.captions={json.recaption: 0.75, txt: 0.25, json.recaptoin: 1.0}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=null",
        "callbacks.sample_grid=null",
        *FAST,
        run_dir=str(tmp_path),
    )
    metrics = train(cfg)["metrics"]
    shares = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("data/caption_source/")}
    assert set(shares) == {"json.recaption", "txt"} and sum(shares.values()) == pytest.approx(1.0)
    assert 0 < shares["json.recaption"] < 1  # 3 batches of 8: both met; the misspelt field never
