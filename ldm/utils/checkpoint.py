"""Checkpoint files: written atomically, read as data (`weights_only=True`), never as code."""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BUNDLE_KEY = "ldm"  # where a checkpoint keeps its self-description (config, latent scale, text encoder …)
FORMAT_VERSION = 1
CONTENTS_KEY = "contents"  # in the bundle: absent for a full (resumable) checkpoint
WEIGHTS_ONLY = "weights_only"  # a weights-only checkpoint: EMA UNet / autoencoder for sampling and evaluation


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weight files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_mode() -> int:
    """The permissions a new file gets from open(): 0o666 less the process umask (read from /proc on Linux, so the
    umask is never changed, not even for an instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """safetensors' `save_file`, with the permissions any new file gets: `save_file` makes its files readable by
    their owner only, which hides checkpoints and exports from the rest of a lab sharing the folder."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk: before a rename makes it visible, or a power loss can leave the new
    name on an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to the disk, so that a rename into it survives a power loss. Silently nothing
    where the platform refuses (Windows cannot open a folder; some network filesystems reject the fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a fully written temporary file its name: fsync it, rename it over `path`, fsync the folder. After a
    power loss the name holds the old file or the whole new one, never an empty one."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target directory, fsync, rename over `path`, fsync the directory.

    A crash mid-write leaves the previous file intact; readers never see a half-written checkpoint, and after a
    power loss the name holds the old file or the whole new one. A failed write (a full disk) leaves no temporary
    file. The file gets the permissions of any new file (umask), not the owner-only ones of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as plain data; fails on anything that would need to execute pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as err:  # torch names neither the file nor the likely cause
        raise ValueError(
            f"cannot read checkpoint {path} ({path.stat().st_size:,} bytes): {err or type(err).__name__}. "
            "ldm writes checkpoints atomically, so a damaged one was cut short when copied or downloaded: "
            "copy it again, or use another checkpoint of the run"
        ) from err


def load_bundle(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, dict]:
    """(self-description, full checkpoint) of an ldm checkpoint; a clear error for files that are not ours."""
    ckpt = load_checkpoint(path, map_location)
    bundle = ckpt.get(BUNDLE_KEY)
    if not isinstance(bundle, dict) or "config" not in bundle:
        raise ValueError(
            f"{path} is not an ldm checkpoint (no '{BUNDLE_KEY}' section with a config); "
            "pass a checkpoint written by `python train.py ...`"
        )
    return bundle, ckpt


def submodule_state(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix.` with the prefix stripped."""
    prefix = prefix.rstrip(".") + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def checkpoint_paths(ckpt: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The checkpoint files `ckpt` names: a path, a glob pattern (its matches, sorted) or a list of these, in order
    (`sample.py` and `eval/` take several to compare)."""
    paths: list[str] = []
    for item in [ckpt] if isinstance(ckpt, str | os.PathLike) else list(ckpt):
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no checkpoint matches {item!r}")
            paths += matches
        else:
            paths.append(item)
    if not paths:
        raise ValueError("ckpt names no checkpoint")
    return paths


def checkpoint_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names for output folders: the file stems, numbered when two are alike (`last` of two runs)."""
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"{i:02d}-{stem}" for i, stem in enumerate(stems)]
