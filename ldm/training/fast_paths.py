"""Switchable speed settings of a training run: TF32 matmuls, the SDPA attention kernel, channels_last.

Each is a config key (configs/train.yaml: `tf32`, `sdpa_backend`, `channels_last`), measured on and off by
`bench/run.py fastpaths`; docs/benchmarks.md has the numbers behind the defaults. The switches themselves are in
`ldm.utils.speed`; this is the callback that applies them in a run.
"""

from __future__ import annotations

import contextlib

import lightning as L

from ldm.utils.speed import SDPA_BACKENDS, batch_to_channels_last, sdpa_backend, to_channels_last


class FastPathsCallback(L.Callback):
    """Applies `channels_last` (module at set-up, every training batch as it arrives) and `sdpa_backend` (entered
    at set-up, left at teardown, so in every process the Trainer runs in, spawned ones included)."""

    def __init__(self, channels_last: bool = False, sdpa: str = "auto") -> None:
        if sdpa != "auto" and sdpa not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be auto or one of {', '.join(SDPA_BACKENDS)}, got {sdpa!r}")
        self.channels_last, self.sdpa = channels_last, sdpa
        self._stack: contextlib.ExitStack | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.channels_last:
            to_channels_last(pl_module)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(sdpa_backend(self.sdpa))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.channels_last and isinstance(batch, dict):
            batch_to_channels_last(batch)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
