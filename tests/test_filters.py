"""Stream-time filters (ldm.data.filters): each threshold, the presets' json keys, missing fields, filtering
before decoding, counts per reason through the real pipeline, and the config group."""

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.datamodule import ImageTextDataModule
from ldm.data.filters import FIELD_PRESETS, FILTER_REASONS, SampleFilter, resolve_fields
from ldm.data.transforms import decode_image
from ldm.data.webdataset import SKIP_REASONS, image_text_pipeline
from ldm.utils.hydra_build import check_config

from .helpers import compose_train, write_tar

LAION_FILTER = dict(
    min_width=64,
    min_height=64,
    min_aspect_ratio=0.5,
    max_aspect_ratio=2.0,
    min_aesthetic=5.0,
    max_punsafe=0.1,
    max_pwatermark=0.5,
    min_clip_similarity=0.28,
    min_caption_length=3,
    max_caption_length=40,
)
# a sample that passes LAION_FILTER, as img2dataset writes its json (stored image resized to 32 px)
PASSING = {
    "caption": "a fine photo",
    "width": 32,
    "height": 32,
    "original_width": 300,
    "original_height": 200,
    "AESTHETIC_SCORE": 6.0,
    "punsafe": 0.01,
    "pwatermark": 0.1,
    "similarity": 0.33,
}
# one change per filter that makes PASSING fail it alone
FAILING = {
    "filter_size": {"original_height": 63},
    "filter_aspect": {"original_width": 500, "original_height": 240},
    "filter_aesthetic": {"AESTHETIC_SCORE": 4.99},
    "filter_nsfw": {"punsafe": 0.5},
    "filter_watermark": {"pwatermark": 0.51},
    "filter_clip": {"similarity": 0.2},
    "filter_caption": {"caption": "ab"},
}


def _jpeg(size=(40, 30), color=(120, 60, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _raw(meta: dict | None, image: bytes | None = None, txt: str | None = None) -> dict:
    sample = {"__key__": "k", "jpg": image if image is not None else _jpeg()}
    if meta is not None:
        sample["json"] = json.dumps(meta).encode()
    if txt is not None:
        sample["txt"] = txt.encode()
    return sample


def _reason(filt: SampleFilter, meta: dict | None, **kwargs) -> str | None:
    caption = (meta or {}).get("caption", "") if "txt" not in kwargs else kwargs["txt"]
    return filt.reason_to_drop(_raw(meta, **kwargs), caption, "jpg")


# ---------------------------------------------------------------- the filter alone


def test_filter_reasons_are_skip_reasons():
    assert set(FILTER_REASONS) <= set(SKIP_REASONS)
    assert set(FAILING) == set(FILTER_REASONS)


def test_each_threshold_drops_under_its_own_reason():
    filt = SampleFilter(**LAION_FILTER)
    assert _reason(filt, PASSING) is None
    for reason, change in FAILING.items():
        assert _reason(filt, {**PASSING, **change}) == reason, reason
    # thresholds are inclusive: a value equal to one passes
    at_limits = {**PASSING, "AESTHETIC_SCORE": 5.0, "punsafe": 0.1, "pwatermark": 0.5, "similarity": 0.28}
    assert _reason(filt, {**at_limits, "original_width": 128, "original_height": 64}) is None  # aspect 2.0
    assert _reason(filt, {**at_limits, "caption": "x" * 40}) is None
    assert _reason(filt, {**at_limits, "caption": "x" * 41}) == "filter_caption"
    # a filter without thresholds keeps everything
    assert _reason(SampleFilter(), {"punsafe": 1.0, "original_width": 1, "original_height": 1}) is None
    assert not SampleFilter().active and SampleFilter(max_punsafe=0.5).active


def test_size_is_the_source_size_not_the_stored_resize():
    filt = SampleFilter(min_width=64, min_height=64)
    # img2dataset: width/height is the stored (resized) image, original_* the downloaded source
    assert _reason(filt, {"width": 32, "height": 32, "original_width": 300, "original_height": 200}) is None
    assert _reason(filt, {"width": 300, "height": 300, "original_width": 50, "original_height": 50}) == (
        "filter_size"
    )
    # LAION parquet columns saved as additional columns, without original_*
    assert _reason(filt, {"WIDTH": 40, "HEIGHT": 400}) == "filter_size"
    # no size in the json: read from the image header (a 40x30 JPEG)
    assert _reason(filt, {}) == "filter_size"
    assert _reason(SampleFilter(min_width=40, min_height=30), {}) is None
    assert _reason(SampleFilter(min_width=40, min_height=30, size_from_image=False, missing="drop"), {}) == (
        "filter_size"
    )
    assert _reason(SampleFilter(max_aspect_ratio=1.2), None) == "filter_aspect"  # 40/30 from the header


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_size_from_the_header_is_the_displayed_size(orientation):
    """A phone photo stored 60x20 with an EXIF orientation: judged by the size it is decoded (and shown) at."""
    image = Image.new("RGB", (60, 20), (120, 60, 200))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    width, height = decode_image(buf.getvalue()).size
    assert (width, height) == ((20, 60) if orientation >= 5 else (60, 20))
    portrait_only = SampleFilter(max_aspect_ratio=0.5)
    assert _reason(portrait_only, None, image=buf.getvalue()) == (None if width < height else "filter_aspect")
    assert _reason(SampleFilter(min_width=60), None, image=buf.getvalue()) == (
        None if width == 60 else "filter_size"
    )


def test_missing_fields_keep_or_drop_and_never_crash():
    keep = SampleFilter(**LAION_FILTER, size_from_image=False)
    drop = SampleFilter(**LAION_FILTER, size_from_image=False, missing="drop")
    caption_only = {"caption": "a fine photo"}
    assert _reason(keep, caption_only) is None
    assert _reason(drop, caption_only) == "filter_aesthetic"  # the first checked score
    for absent, reason in [
        ("AESTHETIC_SCORE", "filter_aesthetic"),
        ("punsafe", "filter_nsfw"),
        ("pwatermark", "filter_watermark"),
        ("similarity", "filter_clip"),
        ("original_width", None),  # falls back to WIDTH, then to the resized width (32 < 64)
    ]:
        meta = {k: v for k, v in PASSING.items() if k != absent}
        assert _reason(keep, meta) == (None if reason else "filter_size")
        if reason:
            assert _reason(drop, meta) == reason
    # values that are not numbers count as missing: null, text, booleans, NaN
    for bad in (None, "high", True, float("nan"), [1]):
        assert _reason(keep, {**PASSING, "punsafe": bad}) is None
        assert _reason(drop, {**PASSING, "punsafe": bad}) == "filter_nsfw"
    assert _reason(keep, {**PASSING, "punsafe": "0.9"}) == "filter_nsfw"  # a numeric string is a number
    # a json that does not parse or is not an object: every field missing
    for text in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        sample = {"__key__": "k", "jpg": _jpeg(), "json": text}
        assert keep.reason_to_drop(sample, "a fine photo", "jpg") is None
        assert drop.reason_to_drop(sample, "a fine photo", "jpg") == "filter_aesthetic"


def test_presets_use_the_datasets_column_names():
    coyo = SampleFilter(**LAION_FILTER, fields="coyo")
    coyo_meta = {
        "caption": "a fine photo",
        "width": 256,  # img2dataset's stored size (overwrites COYO's own width column)
        "height": 256,
        "original_width": 300,
        "original_height": 200,
        "aesthetic_score_laion_v2": 6.0,
        "nsfw_score_opennsfw2": 0.01,
        "nsfw_score_gantman": 0.9,  # the second alternative: not read while the first is present
        "watermark_score": 0.1,
        "clip_similarity_vitb32": 0.33,
    }
    assert _reason(coyo, coyo_meta) is None
    assert _reason(coyo, {**coyo_meta, "nsfw_score_opennsfw2": None}) == "filter_nsfw"  # → gantman 0.9
    assert _reason(coyo, {**coyo_meta, "watermark_score": 0.7}) == "filter_watermark"
    assert _reason(coyo, {**coyo_meta, "aesthetic_score_laion_v2": 3.0}) == "filter_aesthetic"
    assert _reason(coyo, {**coyo_meta, "clip_similarity_vitb32": 0.1}) == "filter_clip"
    # the LAION-Aesthetics v2 "aesthetic" column is the alternative to AESTHETIC_SCORE
    laion = SampleFilter(min_aesthetic=5.0)
    assert _reason(laion, {"aesthetic": 4.0}) == "filter_aesthetic"
    assert _reason(laion, {"aesthetic": 4.0, "AESTHETIC_SCORE": 6.0}) is None
    # a custom mapping: one key or alternatives per field; the others keep the LAION keys
    custom = SampleFilter(min_aesthetic=5.0, max_punsafe=0.5, fields={"aesthetic": ["score_a", "score_b"]})
    assert _reason(custom, {"score_b": 4.0}) == "filter_aesthetic"
    assert _reason(custom, {"score_b": 6.0, "punsafe": 0.9}) == "filter_nsfw"
    assert resolve_fields("coyo") == FIELD_PRESETS["coyo"]
    with pytest.raises(ValueError, match="unknown field preset"):
        SampleFilter(fields="datacomp")
    with pytest.raises(ValueError, match="unknown filter fields"):
        SampleFilter(fields={"asthetic": "x"})
    with pytest.raises(ValueError, match="missing must be"):
        SampleFilter(missing="skip")


# ---------------------------------------------------------------- through the pipeline


def _filtered_shards(tmp_path: Path, n: int = 64) -> tuple[list[str], dict[str, str]]:
    """Samples that each fail at most one filter (chosen at random): key → reason ("" for kept)."""
    rng = random.Random(0)
    outcome: dict[str, str] = {}
    samples = []
    for i in range(n):
        key = f"{i:06d}"
        reason = rng.choice(["", "", *FAILING])
        meta = {**PASSING, **FAILING.get(reason, {}), "key": key}
        members = {"jpg": _jpeg(), "json": json.dumps(meta).encode(), "txt": meta["caption"].encode()}
        if reason in ("filter_nsfw", "filter_clip") and i % 2:
            members["jpg"] = b"\xff\xd8 corrupt"  # filtered before decoding: never a decode error
        samples.append((key, members))
        outcome[key] = reason
    half = n // 2
    urls = [
        write_tar(tmp_path / "f-0.tar", samples[:half]),
        write_tar(tmp_path / "f-1.tar", samples[half:]),
    ]
    return urls, outcome


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pipeline_drops_and_counts_per_reason(tmp_path, num_workers):
    urls, outcome = _filtered_shards(tmp_path)
    pipeline = image_text_pipeline(
        urls, 16, 4, resampled=False, partial_batches=True, filters=SampleFilter(**LAION_FILTER)
    )
    batches = list(DataLoader(pipeline, batch_size=None, num_workers=num_workers))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(k for k, r in outcome.items() if not r)
    counted = {r: sum(int(b["skipped"][r]) for b in batches) for r in SKIP_REASONS}
    expected = Counter(r for r in outcome.values() if r)
    assert {r: n for r, n in counted.items() if n} == dict(expected)
    assert len(expected) == len(FILTER_REASONS)  # every reason occurred
    assert batches[0]["image"].shape[1:] == (3, 16, 16)


def test_datamodule_takes_a_config_mapping(tmp_path):
    urls, outcome = _filtered_shards(tmp_path, n=24)
    module = ImageTextDataModule(
        train_urls=urls,
        resolution=16,
        batch_size=2,
        val_urls=urls,
        num_workers=0,
        filters={"_target_": "ignored", **LAION_FILTER, "fields": "laion"},
    )
    assert isinstance(module.filters, SampleFilter) and module.filters.min_aesthetic == 5.0
    val = list(module.val_dataloader())
    assert sorted(k for b in val for k in b["key"]) == sorted(k for k, r in outcome.items() if not r)
    with pytest.raises(TypeError, match="data/filters=laion"):
        ImageTextDataModule(urls, 16, 2, filters="laion")


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("overrides", "fields", "min_aesthetic"),
    [
        (["data/filters=laion"], "laion", 4.5),
        (["data/filters=coyo", "data.filters.min_aesthetic=6.0"], "coyo", 6.0),
        (["data.filters={fields:coyo,min_aesthetic:5.5,max_punsafe:0.2}"], "coyo", 5.5),
    ],
)
def test_filter_configs_compose_and_instantiate(overrides, fields, min_aesthetic):
    cfg = compose_train("experiment=vae_tiny", "data.resolution=64", *overrides)
    check_config(cfg)
    module = instantiate(cfg.data)
    assert module.filters.fields == fields and module.filters.min_aesthetic == min_aesthetic
    if overrides[0].startswith("data/filters="):
        assert module.filters.min_width == 64  # the training resolution, by interpolation
    assert instantiate(compose_train("experiment=vae_tiny").data).filters is None


def test_a_typo_in_a_filter_config_fails_at_the_key_check():
    cfg = compose_train("data/filters=laion", "+data.filters.min_aestetic=5")
    with pytest.raises(ValueError, match="did you mean 'min_aesthetic'"):
        check_config(cfg)


# ---------------------------------------------------------------- cached latents


def test_cached_latents_are_filtered_when_caching_or_when_training(tmp_path, vae_ckpt):
    """The same filters work on a cache: at training from the json the cache kept (an unfiltered cache of
    everything), or at caching (the dropped samples are never encoded; the thresholds go into cache_info.json)."""
    from ldm.data.latents import latent_pipeline, read_cache_info
    from ldm.inference import load_autoencoder
    from ldm.latent_cache import cache_latents

    urls, outcome = _filtered_shards(tmp_path, n=32)
    kept = sorted(k for k, r in outcome.items() if not r)
    ae, _ = load_autoencoder(vae_ckpt)

    def cache(out, **kwargs):
        return cache_latents(ae, urls, out, 16, batch_size=4, num_workers=0, progress=False, **kwargs)

    def stream(out, **kwargs):
        return list(
            latent_pipeline(str(out), 4, shuffle_buffer=0, resampled=False, partial_batches=True, **kwargs)
        )

    everything = tmp_path / "everything"
    report = cache(everything)
    assert read_cache_info(str(everything))["filters"] is None
    cached = [k for b in stream(everything) for k in b["key"]]
    assert report.skipped_samples == {"decode_error": len(outcome) - len(cached)}  # the corrupt JPEGs
    batches = stream(everything, filters={"_target_": "ignored", **LAION_FILTER})
    assert sorted(k for b in batches for k in b["key"]) == kept
    counted = {r: sum(int(b["skipped"][r]) for b in batches) for r in SKIP_REASONS}
    assert {r: n for r, n in counted.items() if n} == dict(Counter(outcome[k] for k in cached if outcome[k]))

    filtered = tmp_path / "filtered"
    report = cache(filtered, filters=LAION_FILTER)
    assert sorted(k for b in stream(filtered) for k in b["key"]) == kept
    assert report.skipped_samples == dict(
        Counter(r for r in outcome.values() if r)
    )  # before decoding: no errors
    assert read_cache_info(str(filtered))["filters"]["min_aesthetic"] == 5.0
    assert cache(filtered, filters=LAION_FILTER).shards_skipped == 2  # a rerun resumes: same filters
    with pytest.raises(ValueError, match="different 'filters'"):
        cache(filtered, filters={**LAION_FILTER, "min_aesthetic": 6.0})

    cfg = compose_train(
        "experiment=tiny",
        "data=latents",
        f"data.train_urls={everything}",
        "data.resolution=16",
        "data/filters=laion",
    )
    module = instantiate(cfg.data)
    assert isinstance(module.filters, SampleFilter) and module.filters.min_width == 16


def test_cache_cli_takes_a_filter_preset_at_the_cache_resolution(tmp_path, vae_ckpt):
    """`data/filters@filters=laion`: the preset's sizes (${..resolution}) become the cache's resolution."""
    import subprocess
    import sys

    from ldm.data.latents import latent_pipeline, read_cache_info

    from .helpers import ROOT

    urls, outcome = _filtered_shards(tmp_path, n=16)
    out = tmp_path / "cli"
    thresholds = {
        "min_aesthetic": 5.0,
        "min_clip_similarity": 0.28,
        "min_caption_length": 3,
        "max_caption_length": 40,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/cache_latents.py",
            f"autoencoder_ckpt={vae_ckpt}",
            f"urls={'::'.join(urls)}",
            f"out_dir={out}",
            "resolution=64",
            "data/filters@filters=laion",
            *(f"filters.{k}={v}" for k, v in thresholds.items()),
            "num_workers=0",
            "device=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_cache_info(str(out))["filters"]
    assert {k: info[k] for k in LAION_FILTER} == LAION_FILTER  # min_width/height 64 from the resolution
    keys = [
        k
        for b in latent_pipeline(str(out), 4, shuffle_buffer=0, resampled=False, partial_batches=True)
        for k in b["key"]
    ]
    assert sorted(keys) == sorted(k for k, r in outcome.items() if not r)
