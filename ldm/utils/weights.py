"""Locating pretrained weight files on an offline machine: an explicit path, else the torch hub cache, else a clear error."""

from __future__ import annotations

from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights could not be found locally and could not be downloaded."""


def hub_checkpoint_dir() -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps its files: `$TORCH_HOME/hub/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(explicit: str | None, filename: str, url: str, what: str, config_key: str) -> Path:
    """Path of a weights file: `explicit` if given, else `<torch hub dir>/checkpoints/<filename>`. Never downloads.

    An explicit path that does not exist is an error rather than a silent fall-back to the cache, so a typo in a
    config cannot train on other weights than the ones named.
    """
    cache = hub_checkpoint_dir() / filename
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        problem = f"{config_key}={explicit} does not exist."
    elif cache.is_file():
        return cache
    else:
        problem = f"{filename} is not in the torch hub cache ({cache.parent})."
    raise MissingWeightsError(
        f"Could not find the {what} weights: {problem}\n"
        f"Missing file: {filename} from {url}\n"
        f"Fix one of:\n"
        f"  - put {filename} in {cache.parent} (the torch hub cache; TORCH_HOME moves it)\n"
        f"  - copy it anywhere on this machine and set {config_key}=/path/to/{filename}"
    )
