"""Stage 2's held-out loss (`data.val_urls`): every validation image at the same evenly spaced timesteps with noise
fixed by its key, so the curve moves only when the weights do. Checked against an independent computation of the
v-prediction loss, and for independence from batching."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ldm.data.webdataset import image_text_pipeline
from ldm.training.diffusion_module import validation_seed

from .helpers import FAST, compose_train

TIMESTEPS = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]


@pytest.fixture(scope="module")
def val_run(synthetic_shards, vae_ckpt, tmp_path_factory):
    from ldm.training.run import train

    run_dir = tmp_path_factory.mktemp("val")
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"data.val_urls={synthetic_shards[1]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint=null",
        *FAST,
        run_dir=str(run_dir),
    )
    return train(cfg), cfg


def _logged(run_dir) -> list[dict]:
    (path,) = Path(run_dir).glob("csv/**/metrics.csv")
    return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(path.open())]


def _cosine_alphas_cumprod(steps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17 (betas clipped at 0.999): the schedule of experiment=tiny."""

    def f(t: float) -> float:
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _validate(cfg, checkpoint: str, batch_size: int) -> dict[str, float]:
    from ldm.training.run import build_module

    module = build_module(cfg)
    module.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    cfg = cfg.copy()
    cfg.data.batch_size = batch_size
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)
    return metrics


def test_validation_loss_is_logged_per_timestep_bin(val_run):
    result, _ = val_run
    rows = [r for r in _logged(result["run_dir"]) if "val/loss" in r]
    assert [int(r["step"]) for r in rows] == [1, 3]  # after steps 2 and 4 (the CSV's step is 0-based)
    bins = sorted(k for k in rows[0] if k.startswith("val_loss_by_t/"))
    assert bins == [f"val_loss_by_t/{t - 50:04d}-{t + 49:04d}" for t in TIMESTEPS]  # the training bins' names
    for row in rows:
        assert math.isfinite(row["val/loss"]) and row["val/loss"] > 0
        # unweighted v-loss: val/loss is the mean of the bins
        assert row["val/loss"] == pytest.approx(sum(row[b] for b in bins) / len(bins), rel=1e-5)


def test_validation_loss_matches_an_independent_computation(val_run, synthetic_shards):
    """Recompute the loss from the EMA UNet, the v target (Salimans & Ho 2022) and the per-key noise, over the
    validation shard read directly; then validate the checkpoint at two batch sizes."""
    result, cfg = val_run
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    from ldm.training.run import build_module

    module = build_module(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    alphas_cumprod = _cosine_alphas_cumprod(1000)
    losses = []
    with torch.no_grad():
        shard = image_text_pipeline(
            synthetic_shards[1], 32, 7, crop="center", shuffle_buffer=0, resampled=False, partial_batches=True
        )
        for batch in shard:
            z = module.codec.autoencoder.encode(batch["image"]).mode()  # the posterior mean, no sampling
            x0 = (z - module.codec.shift) * module.codec.scale
            context = module.text_encoder(batch["caption"])
            noise = torch.cat(
                [
                    torch.randn(
                        (1, *x0.shape[1:]), generator=torch.Generator().manual_seed(validation_seed(k, 0))
                    )
                    for k in batch["key"]
                ]
            )
            for t in TIMESTEPS:
                ab = alphas_cumprod[t].float()
                x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
                v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
                tt = torch.full((len(x0),), t)
                out = module.ema.module(x_t, tt, context.tokens, pooled=context.pooled)
                losses.append((out - v).square().flatten(1).mean(1))
    expected = torch.cat(losses).mean().item()
    assert len(torch.cat(losses)) == 24 * len(TIMESTEPS)

    logged = [r for r in _logged(result["run_dir"]) if "val/loss" in r][-1]["val/loss"]
    assert logged == pytest.approx(expected, rel=1e-4)
    for batch_size in (8, 5):  # the same images, noise and timesteps however they are batched
        metrics = _validate(cfg, result["checkpoint"], batch_size)
        assert metrics["val/loss"] == pytest.approx(expected, rel=1e-4)
        # the truncated-caption share describes the training data: held-out captions are not counted in it
        assert "data/captions_truncated_frac" not in metrics


class _RecordLosses(L.Callback):
    """Every training micro-batch's per-sample loss and timesteps, with the optimizer step it belongs to."""

    def __init__(self) -> None:
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        loss = pl_module.diffusion.loss

        def recorded(*args, **kwargs):
            out = loss(*args, **kwargs)
            self.records.append((trainer.global_step, out.per_sample.detach().clone(), out.t.clone()))
            return out

        pl_module.diffusion.loss = recorded


def test_train_loss_by_t_averages_every_sample_since_the_last_log(synthetic_shards, vae_ckpt, tmp_path):
    """Each logged train_loss_by_t/<bin> is the mean loss of all samples of the optimizer steps since the previous
    log (here 3 steps × 2 accumulated micro-batches of 8) whose t fell in the bin, computed here from the recorded
    per-sample losses; bins no sample fell in are absent."""
    from ldm.training.run import train

    record = _RecordLosses()
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint=null",
        *FAST,
        "trainer.log_every_n_steps=3",
        run_dir=str(tmp_path),
    )
    train(cfg, extra_callbacks=[record])
    assert [step for step, *_ in record.records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    rows = [r for r in _logged(tmp_path) if any(k.startswith("train_loss_by_t/") for k in r)]
    assert len(rows) == 2
    for row, steps in zip(rows, ({0, 1, 2}, {3, 4, 5}), strict=True):
        losses = torch.cat([loss for step, loss, _ in record.records if step in steps]).double()
        t = torch.cat([t for step, _, t in record.records if step in steps])
        assert len(losses) == 48
        expected = {}
        for b in range(10):
            inside = (t >= 100 * b) & (t < 100 * (b + 1))
            if inside.any():
                expected[f"train_loss_by_t/{100 * b:04d}-{100 * b + 99:04d}"] = losses[inside].mean().item()
        got = {k: v for k, v in row.items() if k.startswith("train_loss_by_t/")}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
