"""Shared test helpers (not fixtures)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_train(*overrides: str, run_dir: str = "/tmp/ldm-test-run"):
    """The training config as `train.py` would compose it (run_dir given, since no Hydra run is active)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "train", overrides=["data.train_urls=/nonexistent/x.tar", f"run_dir={run_dir}", *overrides]
        )


def write_tar(path, samples) -> str:
    """A shard of (key, {extension: bytes}) samples, members in order, as img2dataset and the caches write them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


# overrides that make a tiny training run take seconds on CPU
FAST = [
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
]


def write_mixed_shards(out, num_shards: int, per_shard: int, sizes: dict[str, tuple[int, int]]) -> dict:
    """Shards of random-pixel images of the (width, height) `sizes` of their keys, JPEG and PNG in turn; every third
    json gives img2dataset's original size (10× the stored one). Returns key → original (h, w)."""
    rng = np.random.default_rng(0)
    originals = {}
    for s in range(num_shards):
        with wds.TarWriter(str(out / f"mixed-{s:06d}.tar"), encoder=False, mtime=0) as writer:
            for i in range(per_shard):
                key = f"{s * per_shard + i:09d}"
                w, h = sizes[key]
                buf = io.BytesIO()
                fmt = "png" if i % 2 else "jpeg"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
                meta = {"key": key, "caption": f"c{key}"}
                if i % 3 == 0:
                    meta.update(original_width=w * 10, original_height=h * 10)
                originals[key] = (h * 10, w * 10) if i % 3 == 0 else (h, w)
                writer.write(
                    {
                        "__key__": key,
                        "jpg" if fmt == "jpeg" else "png": buf.getvalue(),
                        "txt": f"c{key}".encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
    return originals
