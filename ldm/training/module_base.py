"""What both stages' LightningModules share: optimizer set-up, common logging, the self-describing checkpoint."""

from __future__ import annotations

import hashlib

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldm.data.webdataset import SKIP_REASONS
from ldm.training.fsdp import full_tensor, is_sharded
from ldm.training.nonfinite import NonFiniteGuard
from ldm.training.optim import AdamWSettings
from ldm.utils.checkpoint import BUNDLE_KEY, CONTENTS_KEY, FORMAT_VERSION, WEIGHTS_ONLY
from ldm.utils.launcher import collective_device

NUM_TIMESTEP_BINS = 10


class LDMModuleBase(L.LightningModule):
    stage: str = ""
    # what a weights-only checkpoint keeps (`ModelCheckpoint(save_weights_only=True)`, the `weights_snapshot`
    # callback): what sampling and evaluation load, without the optimizer state or the raw weights beside the EMA
    weights_only_prefixes: tuple[str, ...] = ()

    def __init__(self, optim: AdamWSettings, config: dict | None = None) -> None:
        super().__init__()
        self.optim_settings = optim
        self.config = config  # the resolved run config, as plain containers; written into every checkpoint
        self.skipped_samples = 0  # over all ranks, since the start of the run (kept in the checkpoint)
        self.skipped_by_reason: dict[str, int] = {}
        self.caption_sources: dict[str, int] = {}  # data.captions: samples per caption source
        self.max_nonfinite_steps: int | None = 10  # set by run.train from the config's max_nonfinite_steps
        self.nonfinite: dict[str, NonFiniteGuard] = {}  # per gradient-norm panel (one per optimizer)
        self.nonfinite_stop: str | None = None  # why the run was stopped, when it was
        # train_loss_by_t: per-bin loss sums and counts since the last log, and the step they were last logged at
        self._loss_bins: Tensor | None = None
        self._loss_bins_logged: int | None = None

    def trainable_module(self) -> nn.Module:
        raise NotImplementedError

    def describe(self) -> dict:
        """Stage-specific part of the checkpoint's self-description."""
        return {}

    def configure_model(self) -> None:
        """Under `strategy=fsdp`, shard the networks `sharded_networks()` names (ldm.training.fsdp); a no-op for
        DDP and single-device runs."""
        if self._trainer is not None and is_sharded(self.trainer.strategy):
            self.trainer.strategy.shard(self)

    def complete_state_dict(self, state: dict) -> None:
        """Add, in place, what a checkpoint's `state_dict` leaves out on purpose (see DiffusionModule)."""

    def on_fit_start(self) -> None:
        """Each rank its own torch random stream: `seed_everything(cfg.seed)` seeds every rank alike, so all ranks
        drew the same timesteps, noise, caption-dropout masks and posterior samples, and a global batch held only
        one device's worth of (t, noise) pairs. Composer (MosaicML's SD2 training) seeds each process with
        seed + rank for this reason. The seed is a hash of the run's seed and the rank: reproducible, and drawn
        here, after the weights are initialised (alike on all ranks) and before the loader starts and a resume
        restores each rank's saved state (ExactResumeCallback). A single process keeps seed_everything's stream."""
        if self.trainer.world_size <= 1:
            return
        key = f"{torch.initial_seed()}/rank{self.trainer.global_rank}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))  # CPU and every CUDA device

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        optimizer, scheduler = self.optim_settings.build(self.trainable_module(), max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic_optimization:
            return  # a manually optimized module logs its own norms, per optimizer
        self.check_gradients(self.trainable_module(), "train/grad_norm")

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 GradScaler of the run (`trainer.precision=16-mixed` on a GPU), else None."""
        return getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def check_gradients(self, module: nn.Module, name: str, scale: float = 1.0) -> bool:
        """Log the total gradient norm of `module` under `name` (before clipping: the norm the clip threshold is
        compared against; `scale`: the factor the gradients still carry, a GradScaler's before its unscale_);
        when it is NaN/inf, drop the gradients so that the coming optimizer step changes nothing
        (ldm.training.nonfinite). True when the step is skipped.

        Under an fp16 GradScaler the gradients are kept: the scaler finds the same inf/NaN, skips the step itself
        and lowers its scale, which it would not do for gradients dropped before its unscale_."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norm = full_tensor(torch.nn.utils.get_total_norm(grads)) / scale if grads else None
        if norm is not None:
            self.log(name, norm)
        guard = self.nonfinite.setdefault(name, NonFiniteGuard(self.max_nonfinite_steps))
        to_drop = module.parameters() if self.grad_scaler is None else ()
        skipped = guard.check(norm, to_drop, self.global_step)
        if guard.limit is not None:
            self.log(name.replace("grad_norm", "nonfinite_steps"), float(guard.total))
        if guard.exhausted and self.nonfinite_stop is None:
            self.nonfinite_stop = guard.message(self.global_step, f"the {type(module).__name__}")
            self.trainer.should_stop = True
        return skipped

    @property
    def skipped_last_step(self) -> bool:
        """Whether the last optimizer step was skipped for non-finite gradients (any optimizer)."""
        return any(g.skipped_last for g in self.nonfinite.values())

    def log_data_stats(self, batch: dict) -> None:
        """Samples the loaders skipped (damaged or filtered out), summed over workers and ranks since the start of
        the run, in total and per reason. Every rank calls it at every training step: one all-reduce of the
        batch's counts for the fixed SKIP_REASONS."""
        skipped = batch.get("skipped") or {}
        counts = torch.tensor([int(skipped.get(r, 0)) for r in SKIP_REASONS])
        if (device := collective_device()) is not None:
            counts = counts.to(device)
            dist.all_reduce(counts)
        for reason, count in zip(SKIP_REASONS, counts.tolist(), strict=True):
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + count
        self.skipped_samples = sum(self.skipped_by_reason.values())
        if "skipped" in batch:
            for reason in SKIP_REASONS:
                self.log(f"data/skipped_{reason}", float(self.skipped_by_reason[reason]))
            self.log("data/skipped_samples", float(self.skipped_samples))
        if batch.get("caption_source"):  # data.captions: the share of each source so far (on this process)
            for source in batch["caption_source"]:
                self.caption_sources[source] = self.caption_sources.get(source, 0) + 1
            total = sum(self.caption_sources.values())
            for source, count in self.caption_sources.items():
                self.log(f"data/caption_source/{source}", count / total)

    def log_per_timestep_loss(self, per_sample: Tensor, t: Tensor, num_timesteps: int) -> None:
        """Mean loss in each of NUM_TIMESTEP_BINS timestep bins (where the model struggles), over all the samples
        of the steps since the last logged one (`trainer.log_every_n_steps`) that fell in the bin; a bin none fell
        in is not logged. The sums stay on the device between logged steps: one host sync per logged step, not
        one per step, and each point averages log_every_n_steps batches instead of one."""
        bins = (t * NUM_TIMESTEP_BINS // num_timesteps).clamp(max=NUM_TIMESTEP_BINS - 1)
        step = self.global_step
        if self._loss_bins is None or (self._loss_bins_logged is not None and step > self._loss_bins_logged):
            # float32 whatever the default dtype (bf16-true makes it bf16 in training_step: counts stop at 256)
            self._loss_bins = torch.zeros(2, NUM_TIMESTEP_BINS, device=per_sample.device, dtype=torch.float32)
            self._loss_bins_logged = None
        self._loss_bins[0].index_add_(0, bins, per_sample.detach().float())
        self._loss_bins[1].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float32))
        if self._trainer is not None and not self.trainer._logger_connector.should_update_logs:
            return
        width = num_timesteps // NUM_TIMESTEP_BINS
        # under gradient accumulation every micro-batch of the logged step logs; the last one holds them all
        sums, counts = self._loss_bins.tolist()
        for b, (total, count) in enumerate(zip(sums, counts, strict=True)):
            if count:
                self.log(f"train_loss_by_t/{b * width:04d}-{(b + 1) * width - 1:04d}", total / count)
        self._loss_bins_logged = step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[BUNDLE_KEY] = {
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "config": self.config,
            **self.describe(),
        }
        checkpoint["nonfinite_steps"] = {name: guard.total for name, guard in self.nonfinite.items()}
        checkpoint["skipped_samples"] = dict(self.skipped_by_reason)
        if "optimizer_states" not in checkpoint:  # a weights-only save: a file to sample from, not to resume
            state = checkpoint["state_dict"]
            for key in [k for k in state if not k.startswith(self.weights_only_prefixes)]:
                del state[key]
            checkpoint[BUNDLE_KEY][CONTENTS_KEY] = WEIGHTS_ONLY

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, total in (checkpoint.get("nonfinite_steps") or {}).items():
            self.nonfinite.setdefault(name, NonFiniteGuard(self.max_nonfinite_steps)).total = int(total)
        self.skipped_by_reason = {r: int(n) for r, n in (checkpoint.get("skipped_samples") or {}).items()}
        self.skipped_samples = sum(self.skipped_by_reason.values())
