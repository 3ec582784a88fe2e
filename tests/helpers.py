"""Shared test helpers (not fixtures)."""

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_train(*overrides: str, run_dir: str = "/tmp/ldm-test-run"):
    """The training config as `train.py` would compose it (run_dir given, since no Hydra run is active)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "train", overrides=["data.train_urls=/nonexistent/x.tar", f"run_dir={run_dir}", *overrides]
        )


# overrides that make a tiny training run take seconds on CPU
FAST = [
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
]
