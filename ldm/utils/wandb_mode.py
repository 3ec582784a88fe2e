"""Whether W&B should run offline: the one rule shared by training's logger and evaluation's summary run."""

from __future__ import annotations

import netrc
import os


def wandb_api_key_available() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """Offline when WANDB_MODE=offline or no API key is configured (never a login prompt)."""
    return os.environ.get("WANDB_MODE") == "offline" or not wandb_api_key_available()
