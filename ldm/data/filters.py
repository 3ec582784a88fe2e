"""Stream-time sample filters: size, aspect ratio, aesthetic score, NSFW and watermark probability, CLIP
similarity and caption length, read from each sample's json before its image is decoded.

The json keys differ between datasets; `fields` maps our names to them (alternatives in order, the first key
present wins). Two presets:

- "laion": LAION-5B / LAION-Aesthetics parquets (columns URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe,
  pwatermark, and AESTHETIC_SCORE or aesthetic: the dataset cards of laion/laion2B-en-aesthetic and
  laion/laion-art on huggingface.co) downloaded with img2dataset `--save_additional_columns`.
- "coyo": COYO-700M (columns width, height, clip_similarity_vitb32, clip_similarity_vitl14,
  nsfw_score_opennsfw2, nsfw_score_gantman, watermark_score, aesthetic_score_laion_v2: the dataset card of
  kakaobrain/coyo-700m on huggingface.co) downloaded the same way.

img2dataset copies the additional columns into the json, then writes `width`/`height` as the size of the image
it stored (after its resize) and `original_width`/`original_height` as the size of the downloaded source
(rom1504/img2dataset, downloader.py), so the size filters read the source size first.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from ldm.data.transforms import as_displayed, displayed_size

FIELD_NAMES: tuple[str, ...] = ("width", "height", "aesthetic", "punsafe", "pwatermark", "clip_similarity")

FIELD_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "laion": {
        "width": ("original_width", "WIDTH", "width"),
        "height": ("original_height", "HEIGHT", "height"),
        "aesthetic": ("AESTHETIC_SCORE", "aesthetic"),
        "punsafe": ("punsafe",),
        "pwatermark": ("pwatermark",),
        "clip_similarity": ("similarity",),
    },
    "coyo": {
        "width": ("original_width", "width"),
        "height": ("original_height", "height"),
        "aesthetic": ("aesthetic_score_laion_v2",),
        "punsafe": ("nsfw_score_opennsfw2", "nsfw_score_gantman"),
        "pwatermark": ("watermark_score",),
        "clip_similarity": ("clip_similarity_vitb32", "clip_similarity_vitl14"),
    },
}

# the skip reason each filter counts under (ldm.data.webdataset.SKIP_REASONS)
FILTER_REASONS: tuple[str, ...] = (
    "filter_size",
    "filter_aspect",
    "filter_aesthetic",
    "filter_nsfw",
    "filter_watermark",
    "filter_clip",
    "filter_caption",
)
MISSING_POLICIES = ("keep", "drop")


def resolve_fields(fields: str | Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """A preset name, or a mapping {our name: json key or list of keys}; names not given keep the LAION keys."""
    if isinstance(fields, str):
        if fields not in FIELD_PRESETS:
            raise ValueError(f"unknown field preset {fields!r}; presets: {', '.join(FIELD_PRESETS)}")
        return dict(FIELD_PRESETS[fields])
    unknown = set(fields) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown filter fields {sorted(unknown)}; known: {', '.join(FIELD_NAMES)}")
    resolved = dict(FIELD_PRESETS["laion"])
    for name, keys in fields.items():
        resolved[name] = (keys,) if isinstance(keys, str) else tuple(str(k) for k in keys)
    return resolved


def _number(value) -> float | None:
    """A finite float from a json value (numbers, numeric strings); None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class SampleFilter:
    """Drop samples by their metadata, before decoding. Every threshold is optional (None: not checked).

    min_width, min_height: of the source image as shown (json sizes, else the image header when
        `size_from_image`, which also turns json sizes of an EXIF-rotated image: `as_displayed`).
    min_aspect_ratio, max_aspect_ratio: width / height.
    min_aesthetic, max_punsafe, max_pwatermark, min_clip_similarity: json scores (see `fields`).
    min_caption_length, max_caption_length: characters of the caption after stripping.
    fields: "laion", "coyo", or a mapping {width|height|aesthetic|punsafe|pwatermark|clip_similarity: key(s)}.
    missing: a checked field absent from the json (or a json that does not parse): "keep" the sample, or
        "drop" it under that filter's reason.
    """

    min_width: int | None = None
    min_height: int | None = None
    min_aspect_ratio: float | None = None
    max_aspect_ratio: float | None = None
    min_aesthetic: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_clip_similarity: float | None = None
    min_caption_length: int | None = None
    max_caption_length: int | None = None
    fields: str | Mapping[str, str | Sequence[str]] = "laion"
    missing: str = "keep"
    size_from_image: bool = True

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {self.missing!r}")
        if not isinstance(self.fields, str):
            self.fields = {k: v if isinstance(v, str) else list(v) for k, v in dict(self.fields).items()}
        self._keys = resolve_fields(self.fields)
        self._scores = [  # (our field, threshold, is a minimum, reason)
            (name, threshold, is_min, reason)
            for name, threshold, is_min, reason in (
                ("aesthetic", self.min_aesthetic, True, "filter_aesthetic"),
                ("punsafe", self.max_punsafe, False, "filter_nsfw"),
                ("pwatermark", self.max_pwatermark, False, "filter_watermark"),
                ("clip_similarity", self.min_clip_similarity, True, "filter_clip"),
            )
            if threshold is not None
        ]
        self._checks_size = any(
            v is not None
            for v in (self.min_width, self.min_height, self.min_aspect_ratio, self.max_aspect_ratio)
        )

    @classmethod
    def build(cls, spec: SampleFilter | Mapping | None) -> SampleFilter | None:
        """A filter from a config node (a mapping of this class's arguments, `_target_` ignored), or None."""
        if spec is None or isinstance(spec, SampleFilter):
            return spec
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"filters must be a mapping of SampleFilter arguments, got {spec!r}; to select "
                f"configs/data/filters/{spec}.yaml write `data/filters={spec}` (a slash, not a dot)"
            )
        return cls(**{k: v for k, v in dict(spec).items() if not str(k).startswith("_")})

    @property
    def active(self) -> bool:
        return bool(self._scores or self._checks_size) or (
            self.min_caption_length is not None or self.max_caption_length is not None
        )

    def value(self, meta: dict, name: str) -> float | None:
        """Our field `name` from the parsed json: the first of its keys present with a number."""
        for key in self._keys[name]:
            if key in meta:
                number = _number(meta[key])
                if number is not None:
                    return number
        return None

    def reason_to_drop(self, sample: dict, caption: str, image_key: str | None = None) -> str | None:
        """The skip reason (one of FILTER_REASONS) of the first filter `sample` fails, or None to keep it.

        `sample` is a raw sample ({"json": bytes, ext: bytes...}); `caption` its decoded caption; `image_key`
        the member holding its image (read for its header only when the json has no size).
        """
        if self.min_caption_length is not None and len(caption) < self.min_caption_length:
            return "filter_caption"
        if self.max_caption_length is not None and len(caption) > self.max_caption_length:
            return "filter_caption"
        if not (self._scores or self._checks_size):
            return None
        meta = _parse_json(sample.get("json"))
        for name, threshold, is_min, reason in self._scores:
            value = self.value(meta, name)
            if value is None:
                if self.missing == "drop":
                    return reason
            elif (value < threshold) if is_min else (value > threshold):
                return reason
        if self._checks_size:
            return self._size_reason(meta, sample.get(image_key) if image_key else None)
        return None

    def _size_reason(self, meta: dict, image: bytes | None) -> str | None:
        width, height = self.value(meta, "width"), self.value(meta, "height")
        if self.size_from_image and image is not None:
            width, height = _header_size(image, (width, height)) or (width, height)
        if width is None or height is None or width <= 0 or height <= 0:
            if self.missing == "keep":
                return None
            return (
                "filter_size"
                if self.min_width is not None or self.min_height is not None
                else "filter_aspect"
            )
        if (self.min_width is not None and width < self.min_width) or (
            self.min_height is not None and height < self.min_height
        ):
            return "filter_size"
        aspect = width / height
        if (self.min_aspect_ratio is not None and aspect < self.min_aspect_ratio) or (
            self.max_aspect_ratio is not None and aspect > self.max_aspect_ratio
        ):
            return "filter_aspect"
        return None


def _parse_json(data: bytes | str | None) -> dict:
    """The sample's json as a dict; {} when absent, unparseable or not an object (its fields are missing)."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return {}
    return meta if isinstance(meta, dict) else {}


def _header_size(data: bytes, json_size: tuple[float | None, float | None]) -> tuple[float, float] | None:
    """(width, height) as shown (EXIF orientation applied, as decoding does) from the image header alone (no pixel
    data decoded): the json's size turned as the image is shown (`as_displayed`), else the header's own; None when
    the header cannot be read (the decoder then counts the sample as a decode error)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if None in json_size:
                return displayed_size(image)
            return as_displayed(json_size, image)
    except Exception:  # PIL raises many types, DecompressionBombError included
        return None
