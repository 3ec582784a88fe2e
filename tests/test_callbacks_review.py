"""Sample and reconstruction grids, the LR monitor and the loggers' configs: what a run must not suffer from them."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf
from torch import nn

from ldm.training.callbacks import ReconstructionGridCallback, SampleGridCallback
from ldm.training.resume import PreemptionCallback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _trainer(tmp_path, step: int = 4, accumulate: int = 1, callbacks=()) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step,
        default_root_dir=str(tmp_path),
        loggers=[],
        is_global_zero=True,
        strategy=None,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
    )


class _Autoencoder(nn.Module):
    """A stand-in for stage 1's module: `reconstruct` runs a network with dropout (autoencoder.dropout > 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.autoencoder = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reconstruct(self, images):
        self.calls += 1
        self.grad_enabled = torch.is_grad_enabled()
        return self.autoencoder(images).clamp(-1, 1)


def _images(n: int = 2) -> dict:
    return {"image": torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1}


def test_reconstruction_grid_leaves_training_as_it_was(tmp_path):
    """Deterministic reconstructions (eval mode: no dropout), no autograd graph, and the training state untouched:
    the train mode of every submodule and the global random stream (rank 0 alone makes grids)."""
    module = _Autoencoder()
    module.train()
    module.autoencoder[0].eval()  # a frozen part stays in eval mode
    callback = ReconstructionGridCallback(every_n_steps=2, num_images=2)
    callback._batch = _images()["image"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    path = callback.make_grid(_trainer(tmp_path), module)
    assert torch.equal(torch.get_rng_state(), before)
    assert not module.grad_enabled
    assert module.training and module.autoencoder.training and module.autoencoder[1].training
    assert not module.autoencoder[0].training
    first = path.read_bytes()
    path = callback.make_grid(_trainer(tmp_path, step=6), module)
    assert path.read_bytes() == first  # the same images reconstruct the same way


def test_reconstruction_grid_once_per_optimizer_step(tmp_path):
    """With gradient accumulation every micro-batch ends with the step counter of the last optimizer step: one grid
    per step, not one per micro-batch, and none again at the end of training when the last step had one."""
    module = _Autoencoder()
    callback = ReconstructionGridCallback(every_n_steps=2, num_images=2)
    trainer = _trainer(tmp_path, step=2, accumulate=4)
    for batch_idx in range(3, 7):  # the micro-batch that stepped to 2, then three of the next step
        callback.on_train_batch_end(trainer, module, None, _images(), batch_idx)
    callback.on_train_end(trainer, module)
    assert module.calls == 1


class _Generator:
    """A stand-in for stage 2's module: `generate` counts its calls and images."""

    diffusion = None

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, sampler, guidance_scale, seeds, use_ema=True, guidance_interval=None):
        self.calls += 1
        return torch.zeros(len(prompts), 3, 8, 8)


def test_sample_grid_once_per_optimizer_step(tmp_path):
    """A resumed run (a new callback) with gradient accumulation: the micro-batches after the resume carry the
    checkpoint's step, whose grid the interrupted run already made; the next one is due at the next multiple."""
    module = _Generator()
    callback = SampleGridCallback(["a cat"], sampler=object(), every_n_steps=2, num_per_prompt=1)
    trainer = _trainer(tmp_path, step=2, accumulate=4)
    for batch_idx in range(8, 11):  # the first micro-batches of step 3, resumed from step 2's checkpoint
        callback.on_train_batch_end(trainer, module, None, None, batch_idx)
    assert module.calls == 0
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, module, None, None, 15)  # the micro-batch that stepped to 4
    assert module.calls == 1


def test_no_grids_when_preempted(tmp_path, monkeypatch):
    """A preempted run has ~90 s (`--signal=USR1@90`) to checkpoint and requeue; it is not at its end, so the
    end-of-training grids must not spend that time (the requeued job goes on sampling at its intervals)."""
    preemption = PreemptionCallback(signums=[])
    preemption.preempted = True
    trainer = _trainer(tmp_path, step=3, callbacks=[preemption])
    generator, autoencoder = _Generator(), _Autoencoder()
    SampleGridCallback(["a cat"], sampler=object(), every_n_steps=2, num_per_prompt=1).on_train_end(
        trainer, generator
    )
    reconstructions = ReconstructionGridCallback(every_n_steps=2, num_images=2)
    reconstructions._batch = _images()["image"]
    reconstructions.on_train_end(trainer, autoencoder)
    assert generator.calls == 0 and autoencoder.calls == 0
    preemption.preempted = False  # a run that reached max_steps still gets its final grids
    SampleGridCallback(["a cat"], sampler=object(), every_n_steps=2, num_per_prompt=1).on_train_end(
        trainer, generator
    )
    reconstructions.on_train_end(trainer, autoencoder)
    assert generator.calls == 1 and autoencoder.calls == 1


def test_lr_monitor_of_the_configs_trains_without_a_logger(tmp_path):
    """`~logger` (run.train passes logger=False): Lightning's LearningRateMonitor refuses a Trainer without a
    logger, so the configs' monitor must let such a run train (there is nothing to log the LR to)."""
    for stage in ("diffusion", "autoencoder"):
        assert _fit_with_the_lr_monitor(stage, tmp_path, steps=2, logger=False).global_step == 2


def _fit_with_the_lr_monitor(stage: str, tmp_path, steps: int, logger) -> L.Trainer:
    """Lightning's demo model trained `steps` steps with the LR monitor of `configs/callbacks/<stage>.yaml`."""
    callbacks = OmegaConf.load(CONFIGS / "callbacks" / f"{stage}.yaml")
    trainer = L.Trainer(
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[instantiate(callbacks.lr_monitor)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    return trainer


def test_lr_monitor_of_the_configs_logs_with_a_logger(tmp_path):
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    _fit_with_the_lr_monitor("diffusion", tmp_path, steps=3, logger=logger)
    logger.save()
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "lr-SGD" in header


def test_a_stage1_run_without_a_logger_trains_and_saves_its_grids(synthetic_shards, tmp_path):
    """`~logger` (no logger group) end to end, with the callbacks of the config: the run trains and its grids are PNGs."""
    from ldm.training.run import train

    from .helpers import FAST, compose_train

    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        "trainer.max_steps=2",
        "stage.latent_stats_samples=0",
        "~logger",  # no logger (run.train: logger=False)
        "callbacks.reconstruction_grid.every_n_steps=2",
        *FAST,
        run_dir=str(tmp_path),
    )
    result = train(cfg)
    assert result["global_step"] == 2
    assert [p.name for p in (tmp_path / "reconstructions").glob("*.png")] == ["step_0000002.png"]


def test_evaluation_once_per_optimizer_step_and_not_after_a_preemption(tmp_path, monkeypatch):
    """The FID callback as the grids (it is the costliest of them: num_images samples and two feature extractors):
    a resumed run with gradient accumulation does not evaluate the checkpoint's step again on the micro-batches
    that still carry it, and there is no end-of-training evaluation after USR1."""
    from ldm.training.eval_callback import EvalCallback

    callback = EvalCallback(every_n_steps=2, at_train_end=True)
    calls = []
    monkeypatch.setattr(callback, "evaluate", lambda trainer, module: calls.append(trainer.global_step))
    preemption = PreemptionCallback(signums=[])
    trainer = _trainer(tmp_path, step=2, accumulate=4, callbacks=[preemption])
    for batch_idx in range(8, 11):  # the first micro-batches of step 3, resumed from step 2's checkpoint
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert calls == []
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, None, None, 15)  # the micro-batch that stepped to 4
    assert calls == [4]
    preemption.preempted = True
    callback.on_train_end(trainer, None)
    assert calls == [4]
    preemption.preempted = False  # a run that reached max_steps is evaluated at its end
    callback.on_train_end(trainer, None)
    assert calls == [4, 4]
