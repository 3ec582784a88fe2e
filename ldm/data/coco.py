"""A COCO-captions image set (a folder of images + `captions_*.json`) as WebDataset shards in img2dataset's layout.

Zero-shot text-to-image FID on MS-COCO (GLIDE, Imagen, Parti, SDXL …) draws a caption set from COCO val2014 and
compares the samples with COCO images. `eval/fid.py` takes both from shards (`captions_from=`, `reference=`: the
first N samples in order), so the evaluation set is defined here, once, and written down:

- the images with at least one caption, in an order shuffled by `seed` (so that the first N are a random N);
- each with one caption, drawn from its five by (`seed`, image id) (or the first, `caption="first"`); all five stay
  in key.json (`captions`);
- the original image bytes, untouched (the evaluation decodes, centre-crops and resizes them, as it does the
  samples).

Missing and undecodable images are skipped and counted, never fatal; the next image in the order takes the place,
so `num_images` is the number written. Each shard is written to a temporary name and renamed when complete (a
rerun into the same folder removes the earlier run's shards beyond its own), and `coco_shards.json` records the
protocol (annotation file and its hash, seed, caption choice, counts, skips).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import webdataset as wds

from ldm.data.transforms import decode_image
from ldm.utils.checkpoint import file_sha256

log = logging.getLogger(__name__)

INFO_FILE = "coco_shards.json"
CAPTION_CHOICES = ("random", "first")


def read_annotations(path: str | os.PathLike) -> tuple[list[dict], dict[int, list[str]]]:
    """(images sorted by id, image id → captions in annotation-id order) of a COCO captions file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        text = str(ann.get("caption", "")).strip()
        if text:
            captions[ann["image_id"]].append((ann.get("id", i), " ".join(text.split())))
    ordered = {image_id: [t for _, t in sorted(caps)] for image_id, caps in captions.items()}
    return sorted(data["images"], key=lambda im: im["id"]), ordered


def _checked_image(path: Path) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, stored (width, height)) of an image file that the data pipeline's decoder reads in full
    (a truncated file fails here, not in the evaluation); raises otherwise."""
    data = path.read_bytes()
    size = decode_image(data, exif_transpose=False).size
    ext = path.suffix.lower().lstrip(".")
    return data, "jpg" if ext in ("jpg", "jpeg") else ext, size


def coco_to_shards(
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_images: int | None = None,
    seed: int = 0,
    caption: str = "random",
    samples_per_shard: int = 1000,
    prefix: str = "coco",
) -> dict:
    """Write the shards and `coco_shards.json`; returns that record."""
    if caption not in CAPTION_CHOICES:
        raise ValueError(f"caption must be one of {CAPTION_CHOICES}, got {caption!r}")
    images_dir, out = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images={images_dir}: no such folder")
    images, captions = read_annotations(annotations)
    rng = random.Random(seed)
    order = [im for im in images if captions.get(im["id"])]
    skipped = Counter({"no_caption": len(images) - len(order)})
    rng.shuffle(order)
    wanted = None if num_images is None else int(num_images)  # None: every image that decodes
    out.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    skips: list[dict] = []
    writer, tmp, written = None, None, 0

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(tmp, out / shards[-1])

    for entry in order:
        if written == wanted:
            break
        path = images_dir / entry["file_name"]
        try:
            data, ext, (width, height) = _checked_image(path)
        except FileNotFoundError:
            skipped["missing"] += 1
            skips.append({"file_name": entry["file_name"], "reason": "missing"})
            continue
        except Exception as err:  # a truncated or foreign file: skipped and counted, as in training
            skipped["decode_error"] += 1
            skips.append({"file_name": entry["file_name"], "reason": f"decode_error: {err}"})
            log.warning("skipping %s: %s", path, err)
            continue
        all_captions = captions[entry["id"]]
        # each image's own draw: a skipped image before it changes nothing
        chosen = (
            all_captions[0]
            if caption == "first"
            else random.Random(f"{seed}:{entry['id']}").choice(all_captions)
        )
        if written % samples_per_shard == 0:
            close()
            shards.append(f"{prefix}-{len(shards):06d}.tar")
            tmp = out / f".{shards[-1]}.tmp"
            writer = wds.TarWriter(str(tmp), encoder=False, mtime=0)
        key = f"{entry['id']:012d}"
        meta = {
            "key": key,
            "caption": chosen,
            "captions": all_captions,
            "coco_id": entry["id"],
            "file_name": entry["file_name"],
            "status": "success",
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
        }
        writer.write({"__key__": key, ext: data, "txt": chosen.encode(), "json": json.dumps(meta).encode()})
        written += 1
    close()
    # an earlier run's shards beyond this run's last: the evaluation reads the folder's *.tar, all of them
    shard_name = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    for stale in sorted(out.glob(f"{prefix}-*.tar")):
        if stale.name not in shards and shard_name.fullmatch(stale.name):
            log.info("removing %s, an earlier run's shard", stale)
            stale.unlink()
    if wanted is not None and written < wanted:
        raise ValueError(
            f"only {written} of num_images={wanted} images could be written from {images_dir} "
            f"(skipped: {dict(skipped)})"
        )
    record = {
        "images": str(images_dir.resolve()),
        "annotations": str(Path(annotations).resolve()),
        "annotations_sha256": file_sha256(annotations),
        "seed": seed,
        "caption": caption
        if caption == "first"
        else f"random.Random('{seed}:<image id>').choice(<its captions in annotation-id order>)",
        "order": f"images with a caption, sorted by id, shuffled by random.Random({seed})",
        "num_images": written,
        "shards": shards,
        "skipped": {k: v for k, v in skipped.items() if v},
        "skipped_files": skips[:100],
    }
    (out / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
