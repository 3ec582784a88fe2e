"""Per-step speed: images/s, samples seen, model (and hardware) TFLOP/s, MFU, GPU memory and the fraction of time
spent waiting for data."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from ldm.training.resume import ends_optimizer_step
from ldm.utils.speed import FlopCounter, compute_type, device_peak_tflops

log = logging.getLogger(__name__)


class ThroughputCallback(L.Callback):
    """Logs at each optimizer step (subject to `trainer.log_every_n_steps`):

    perf/images_per_sec   images per second over all ranks, over the last step
    perf/samples_seen     images consumed by all ranks since the run began (carried across resumes)
    perf/tflops_per_device  model FLOPs of one training step per device ÷ step time. Counted once, on the first
                          batch, with torch.utils.flop_counter, and scaled for every later batch by its size in
                          pixels (or latent elements) relative to the first (aspect-ratio buckets differ in area
                          by several percent). That counter counts matmuls, convolutions and the fused attention
                          kernels (flash / efficient / cuDNN SDPA), forward and backward, and nothing else:
                          norms, activations, the optimizer's and EMA's element-wise updates count ~0. The CPU
                          SDPA kernel, which torch has no formula for, is counted as the CUDA ones. It counts
                          everything the step runs: on raw images (latents not cached) also the VAE encoder's and
                          the text tower's forward, so this is not the UNet-only figure of bench/run.py train.
                          Gradient checkpointing's recomputed forward is left out, as MFU is defined (PaLM,
                          Chowdhery et al. 2022, app. B; ldm.utils.speed.FlopCounter)
    perf/mfu              model-FLOPs utilisation: perf/tflops_per_device ÷ the device's peak for the run's
                          precision (ldm.utils.speed.PEAK_TFLOPS, or `peak_tflops`); only where the peak is known
    perf/hw_tflops_per_device  hardware FLOPs ÷ step time: perf/tflops_per_device plus the recomputation; logged
                          only when gradient checkpointing recomputes something
    perf/hfu              hardware-FLOPs utilisation: perf/hw_tflops_per_device ÷ the peak; likewise
    perf/gpu_mem_gb       peak GPU memory allocated by tensors during the last optimizer step (GiB; CUDA only)
    perf/gpu_mem_reserved_gb  peak memory held by PyTorch's caching allocator during that step (GiB; CUDA only)
    perf/data_wait_frac   share of the step spent waiting for the training loader's next batch
    perf/step_time        seconds per optimizer step
    """

    def __init__(self, measure_flops: bool = True, peak_tflops: float | None = None) -> None:
        self.measure_flops = measure_flops
        self.peak_tflops = peak_tflops  # None: looked up from the device name at the start of training
        self.samples_seen = 0
        self.flops_per_batch: float | None = None  # model FLOPs: no checkpoint recomputation
        self.hw_flops_per_batch: float | None = None  # with it
        self.flops_numel: int | None = None  # elements of the input of the batch the FLOPs were counted on
        self._flops = 0.0
        self._hw_flops = 0.0
        self._counter: FlopCounter | None = None
        self._t0: float | None = None
        self._wait0 = 0.0
        self._images = 0

    def _wait(self, trainer) -> float:
        loader = trainer.fit_loop._combined_loader
        loaders = loader.flattened if loader is not None else []
        return sum(getattr(dl, "wait_seconds", 0.0) for dl in loaders)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.peak_tflops is None and pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            self.peak_tflops = device_peak_tflops(name, compute_type(trainer.precision))
            if self.peak_tflops is None:
                log.info("no peak TFLOP/s known for %s: perf/mfu is not logged", name)
        self._t0, self._wait0 = time.perf_counter(), self._wait(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.measure_flops and self.flops_per_batch is None and self._counter is None:
            self._counter = FlopCounter()
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch = float(self._counter.model_flops())
            self.hw_flops_per_batch = float(self._counter.get_total_flops())
            self.flops_numel = _input_numel(batch)
            self._counter = None
        n = len(batch["key"]) if "key" in batch else 0
        self._images += n * trainer.world_size
        if self.flops_per_batch:
            numel = _input_numel(batch)
            scale = numel / self.flops_numel if numel and self.flops_numel else 1.0
            self._flops += self.flops_per_batch * scale
            self._hw_flops += (self.hw_flops_per_batch or self.flops_per_batch) * scale
        if not ends_optimizer_step(trainer, batch_idx):
            return
        now, wait = time.perf_counter(), self._wait(trainer)
        dt = max(now - (self._t0 or now), 1e-9)
        self.samples_seen += self._images
        metrics = {
            "perf/images_per_sec": self._images / dt,
            "perf/samples_seen": float(self.samples_seen),
            "perf/data_wait_frac": min(1.0, (wait - self._wait0) / dt),
            "perf/step_time": dt,
        }
        if self.flops_per_batch:
            metrics["perf/tflops_per_device"] = self._flops / dt / 1e12
            if self.peak_tflops:
                metrics["perf/mfu"] = metrics["perf/tflops_per_device"] / self.peak_tflops
            if self._hw_flops > self._flops:  # checkpointing recomputed part of the forward
                metrics["perf/hw_tflops_per_device"] = self._hw_flops / dt / 1e12
                if self.peak_tflops:
                    metrics["perf/hfu"] = metrics["perf/hw_tflops_per_device"] / self.peak_tflops
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/gpu_mem_reserved_gb"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._t0, self._wait0, self._images, self._flops, self._hw_flops = now, wait, 0, 0.0, 0.0

    def state_dict(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "flops_per_batch": self.flops_per_batch,
            "hw_flops_per_batch": self.hw_flops_per_batch,
            "flops_numel": self.flops_numel,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        # counted once per run, not again after a resume: a step under FlopCounterMode may round differently,
        # and a resumed run must take the same steps as an uninterrupted one
        flops = state_dict.get("flops_per_batch")
        self.flops_per_batch = float(flops) if flops is not None else self.flops_per_batch
        # checkpoints from before hw_flops_per_batch have one count only (recomputation included, if any)
        hw_flops = state_dict.get("hw_flops_per_batch", flops)
        self.hw_flops_per_batch = float(hw_flops) if hw_flops is not None else self.hw_flops_per_batch
        self.flops_numel = state_dict.get("flops_numel", self.flops_numel if flops is None else None)


def _input_numel(batch: dict) -> int | None:
    """Elements of a training batch's input (images, or cached latents): what its FLOPs scale with, nearly."""
    for name in ("image", "latent_mean"):
        if isinstance(batch.get(name), torch.Tensor):
            return batch[name].numel()
    return None
