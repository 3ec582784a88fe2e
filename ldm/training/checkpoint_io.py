"""Lightning CheckpointIO that writes atomically and reads with weights_only=True."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.utils.checkpoint import atomic_save, load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec transaction
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Any = "cpu", weights_only: bool | None = True
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("ldm checkpoints are data: refusing to load with weights_only=False")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)


def _is_local(path) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
