"""scripts/coco_to_shards.py: a COCO-captions image set (real photos from scikit-image, COCO's JSON layout) as the
shards eval/fid.py reads its captions and reference images from."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from eval.generate import load_captions
from eval.reference import reference_images
from ldm.data.coco import coco_to_shards
from ldm.data.webdataset import expand_urls

from .helpers import ROOT

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "horse", "cat")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """val2014/ with 8 decodable photos (one greyscale, one PNG), one truncated JPEG and one missing file; one image
    without captions; five captions per image, their annotation ids out of order."""
    root = tmp_path_factory.mktemp("coco")
    images_dir = root / "val2014"
    images_dir.mkdir()
    images, annotations = [], []
    names = [*PHOTOS, "truncated", "missing", "uncaptioned"]
    for i, name in enumerate(names):
        image_id = 100 + 7 * i
        file_name = f"COCO_val2014_{image_id:012d}.{'png' if name == 'coffee' else 'jpg'}"
        images.append({"id": image_id, "file_name": file_name, "width": 0, "height": 0})
        if name in PHOTOS:
            pixels = getattr(skdata, name)()
            pixels = pixels if pixels.dtype == np.uint8 else (pixels * 255).astype(np.uint8)
            Image.fromarray(pixels).save(images_dir / file_name)
        elif name == "truncated":
            Image.fromarray(skdata.astronaut()).save(images_dir / file_name)
            whole = (images_dir / file_name).read_bytes()
            (images_dir / file_name).write_bytes(whole[: len(whole) // 3])
        if name != "uncaptioned":
            for j in range(5):
                annotations.append(
                    {"image_id": image_id, "id": 1000 * (5 - j) + i, "caption": f" {name}  {j} "}
                )
    annotations_file = root / "captions_val2014.json"
    annotations_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return images_dir, annotations_file


def read_shards(folder: Path) -> list[dict]:
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in dict.fromkeys(name.split(".")[0] for name in members):
            samples.append({n.split(".", 1)[1]: v for n, v in members.items() if n.split(".")[0] == key})
    return samples


def test_cli_writes_every_decodable_image_with_its_captions_and_skips_the_rest(coco, tmp_path):
    images_dir, annotations = coco
    out = tmp_path / "shards"
    cmd = [sys.executable, "scripts/coco_to_shards.py", f"images={images_dir}", f"annotations={annotations}"]
    proc = subprocess.run(
        [*cmd, f"out_dir={out}", "samples_per_shard=3"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 images in 3 shards" in proc.stdout
    record = json.loads((out / "coco_shards.json").read_text())
    assert record["num_images"] == 8 and record["shards"] == [f"coco-{i:06d}.tar" for i in range(3)]
    assert record["skipped"] == {"no_caption": 1, "missing": 1, "decode_error": 1}
    assert {s["reason"].split(":")[0] for s in record["skipped_files"]} == {"missing", "decode_error"}
    assert not list(out.glob(".*.tmp"))  # every shard renamed into place
    samples = read_shards(out)
    assert len(samples) == 8 and len({s["txt"] for s in samples}) == 8
    for sample in samples:
        meta = json.loads(sample["json"])
        original = (images_dir / meta["file_name"]).read_bytes()
        assert sample.get("jpg", sample.get("png")) == original  # bytes untouched
        name = meta["caption"].split()[0]
        # in annotation-id order (caption j has id 1000 (5 - j) + i), whitespace normalised
        assert meta["captions"] == [f"{name} {j}" for j in (4, 3, 2, 1, 0)]
        assert sample["txt"].decode() == meta["caption"] in meta["captions"]
        assert (meta["width"], meta["height"]) == Image.open(images_dir / meta["file_name"]).size
    assert sum("png" in s for s in samples) == 1

    # what eval/fid.py reads: the captions and reference images of the first N samples, in the shards' order
    captions = load_captions(None, str(out), 8).texts
    assert captions == [s["txt"].decode() for s in samples]
    got = list(reference_images(expand_urls(str(out)), 32, 8))
    assert [i for i, _ in got] == list(range(8)) and all(x.shape == (3, 32, 32) for _, x in got)


def test_the_first_n_are_a_seeded_random_subset_and_captions_do_not_depend_on_skips(coco, tmp_path):
    images_dir, annotations = coco
    full = coco_to_shards(images_dir, annotations, tmp_path / "full", seed=3)
    some = coco_to_shards(images_dir, annotations, tmp_path / "some", num_images=4, seed=3)
    assert full["num_images"] == 8 and some["num_images"] == 4
    first = [(s["json"], s["txt"]) for s in read_shards(tmp_path / "full")[:4]]
    assert [(s["json"], s["txt"]) for s in read_shards(tmp_path / "some")] == first
    coco_to_shards(images_dir, annotations, tmp_path / "other", seed=4)
    keys = {f: [json.loads(s["json"])["key"] for s in read_shards(tmp_path / f)] for f in ("full", "other")}
    assert keys["other"] != keys["full"] and sorted(keys["other"]) == sorted(keys["full"])
    firsts = coco_to_shards(images_dir, annotations, tmp_path / "firsts", seed=3, caption="first")
    assert firsts["caption"] == "first"
    assert all(s["txt"].decode().endswith(" 4") for s in read_shards(tmp_path / "firsts"))  # lowest id
    # each image's caption is drawn by (seed, image id): repairing the truncated file (one more image written,
    # earlier in the order or not) leaves every other image's caption as it was
    repaired = tmp_path / "repaired"
    shutil.copytree(images_dir, repaired)
    truncated = 100 + 7 * len(PHOTOS)  # the image id the fixture gave the truncated file
    Image.fromarray(skdata.astronaut()).save(repaired / f"COCO_val2014_{truncated:012d}.jpg")
    coco_to_shards(repaired, annotations, tmp_path / "more", seed=3)
    captions = {
        f: {json.loads(s["json"])["key"]: s["txt"] for s in read_shards(tmp_path / f)}
        for f in ("full", "more")
    }
    assert len(captions["more"]) == 9 and all(captions["more"][k] == t for k, t in captions["full"].items())
    assert len({t.decode().split()[1] for t in captions["full"].values()}) > 1  # not always the same position


def test_refusals_name_the_problem(coco, tmp_path):
    images_dir, annotations = coco
    with pytest.raises(ValueError, match="only 8 of num_images=20"):
        coco_to_shards(images_dir, annotations, tmp_path / "a", num_images=20)
    with pytest.raises(ValueError, match="caption must be one of"):
        coco_to_shards(images_dir, annotations, tmp_path / "b", caption="longest")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        coco_to_shards(tmp_path / "nope", annotations, tmp_path / "c")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        coco_to_shards(images_dir, tmp_path / "x.json", tmp_path / "d")
