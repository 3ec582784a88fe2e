"""Which caption a sample trains with, when its shard holds several: the alt text and synthetic recaptions.

Recaptioned datasets keep each image's original alt text beside one or more model-written captions, in the json
(``{"caption": ..., "recaption": ...}``) or as extra members (``key.recap.txt``). DALL-E 3 trained on 95 %
synthetic and 5 % original captions (Betker et al. 2023, "Improving image generation with better captions"),
PixArt-alpha and SD3 on mixes too: the model learns from the detailed captions and still follows short,
human-style prompts. ``CaptionMix`` draws one source per sample visit with the given weights, from the sample's own
random stream (so a resumed run draws the same ones):

    data.captions: {json.recaption: 0.95, txt: 0.05}

A source is ``txt`` (or any text member, e.g. ``recap.txt``) or ``json.<field>``. The weights are renormalised over
the sources a sample actually has (missing, empty or non-string ones drop out), so an image without a recaption
trains on its alt text; a weight of 0 makes a source a fallback only, used when no weighted source is there, in
the order listed. A sample with none of them trains with the empty prompt, as one without any caption does.
The streams add each sample's ``caption_source`` ("none" for the empty prompt); stage 2 logs the running shares as
``data/caption_source/<source>``, which is how a misspelt field (always falling back) shows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from ldm.data.transforms import decode_caption, decode_text, parse_json_member

JSON_PREFIX = "json."


class CaptionMix:
    """Draw a sample's training caption from weighted sources (module docstring)."""

    def __init__(self, sources: Mapping[str, float]):
        if not sources:
            raise ValueError("captions: give at least one source, e.g. {txt: 1.0}")
        self.sources: list[tuple[str, float]] = []
        for name, weight in sources.items():
            name = str(name)
            if name.startswith(JSON_PREFIX) and len(name) == len(JSON_PREFIX):
                raise ValueError("captions: 'json.' needs a field name, e.g. json.recaption")
            if name == "json" or not name:
                raise ValueError(f"captions: source {name!r} is not a text member or json.<field>")
            # a NaN or infinite weight cannot be renormalised (its source would never be drawn)
            if weight is None or not math.isfinite(float(weight)) or float(weight) < 0:
                raise ValueError(f"captions: weight of {name!r} must be finite and >= 0, got {weight}")
            self.sources.append((name, float(weight)))
        if sum(w for _, w in self.sources) <= 0:
            raise ValueError("captions: at least one source needs a weight > 0")

    @classmethod
    def build(cls, spec: CaptionMix | Mapping | None) -> CaptionMix | None:
        """None (or an empty mapping) → None: the default caption (`decode_caption`)."""
        if spec is None or isinstance(spec, CaptionMix):
            return spec
        return cls(spec) if len(spec) else None

    def __repr__(self) -> str:
        return f"CaptionMix({dict(self.sources)})"

    def candidates(self, sample: Mapping) -> list[tuple[str, float, str]]:
        """(source, weight, caption) for each source the sample has, non-empty, in the listed order."""
        meta = None
        found = []
        for name, weight in self.sources:
            if name.startswith(JSON_PREFIX):
                if "json" not in sample:
                    continue
                if meta is None:
                    meta = parse_json_member(sample["json"])
                value = meta.get(name[len(JSON_PREFIX) :]) if isinstance(meta, dict) else None
                text = value.strip() if isinstance(value, str) else ""
            else:
                text = decode_text(sample[name], name) if name in sample else ""
            if text:
                found.append((name, weight, text))
        return found

    def choose(self, sample: Mapping, rng: random.Random) -> tuple[str | None, str]:
        """(source, caption) drawn for this visit; (None, "") when the sample has none of the sources."""
        found = self.candidates(sample)
        if not found:
            return None, ""
        total = sum(w for _, w, _ in found)
        if total <= 0:  # only fallbacks are there: the first listed
            return found[0][0], found[0][2]
        r = rng.random() * total
        for name, weight, text in found:
            r -= weight
            if r < 0 and weight > 0:
                return name, text
        name, _, text = next(f for f in reversed(found) if f[1] > 0)  # r landed on the float edge
        return name, text

    def __call__(self, sample: Mapping, rng: random.Random) -> str:
        return self.choose(sample, rng)[1]


def caption_fields(
    sample: Mapping, rng: random.Random | None, captions: CaptionMix | None, default: str | None = None
) -> dict:
    """The caption entries of a decoded sample: {"caption", "caption_source"} drawn from `captions`, or
    {"caption"} = the default caption (`default` when the caller has it already, e.g. for its filters)."""
    if captions is None:
        return {"caption": decode_caption(sample) if default is None else default}
    source, text = captions.choose(sample, rng)
    return {"caption": text, "caption_source": source or "none"}
