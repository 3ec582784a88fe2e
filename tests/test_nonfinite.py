"""NaN/inf gradients (ldm.training.nonfinite): the step is skipped with the weights, AdamW state and EMA left as
they were, counted on the dashboard and in the checkpoint; too many in a row stop the run with a checkpoint of the
last finite weights, which resumes. Real Trainer runs on tiny configs; the bad batch is a NaN-filled image batch."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ldm.training.nonfinite import NonFiniteGradients, NonFiniteGuard

from .callbacks import PoisonBatches
from .helpers import FAST, compose_train

# ---------------------------------------------------------------- the guard alone


def _set_grads(model: nn.Module, value: float) -> torch.Tensor:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])


def test_guard_skips_nonfinite_steps_and_stops_after_the_limit():
    model, guard = nn.Linear(3, 2), NonFiniteGuard(limit=2)
    assert not guard.check(_set_grads(model, 1.0), model.parameters(), step=0)
    assert all(p.grad is not None for p in model.parameters())  # a finite step keeps its gradients
    for step, value in [(1, math.nan), (2, math.inf)]:
        assert guard.check(_set_grads(model, value), model.parameters(), step)
        assert all(p.grad is None for p in model.parameters()) and guard.skipped_last
    assert guard.consecutive == 2 and not guard.exhausted  # two in a row are allowed with limit 2
    assert not guard.check(
        _set_grads(model, 0.5), model.parameters(), step=3
    )  # a finite step ends the streak
    assert guard.consecutive == 0 and not guard.skipped_last
    for step in (4, 5, 6):
        guard.check(_set_grads(model, -math.inf), model.parameters(), step)
    assert guard.exhausted and guard.total == 5
    message = guard.message(6, "the Linear")
    assert "3 optimizer steps in a row (steps 5–7)" in message and "weights are those after step 4" in message

    off = NonFiniteGuard(limit=None)
    assert not off.check(_set_grads(model, math.nan), model.parameters(), step=0)
    assert all(p.grad is not None for p in model.parameters()) and not off.exhausted
    strict = NonFiniteGuard(limit=0)
    assert strict.check(_set_grads(model, math.nan), model.parameters(), step=0) and strict.exhausted
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 0"):
        NonFiniteGuard(limit=-1)


def test_adamw_leaves_a_parameter_without_gradient_untouched():
    """What the skip relies on, for both of torch's AdamW kernels: no gradient, no change (moments, step count,
    weight decay included)."""
    for fused in (False, True):
        model = nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        before = [p.detach().clone() for p in model.parameters()]
        state = {k: v.clone() for k, v in opt.state[model.weight].items()}
        opt.zero_grad(set_to_none=True)
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert all(torch.equal(v, opt.state[model.weight][k]) for k, v in state.items())


# ---------------------------------------------------------------- real runs


class _Snapshots(L.Callback):
    """The trained network's and the EMA's weights before and after each optimizer step, by step index."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _weights(module) -> list[torch.Tensor]:
        ema = [p.detach().clone() for p in module.ema.module.parameters()] if hasattr(module, "ema") else []
        return [p.detach().clone() for p in module.trainable_module().parameters()] + ema

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self._weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._weights(pl_module)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _stage2(shards, vae_ckpt, run_dir, *overrides):
    return compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint=null",
        *FAST,
        *overrides,
        run_dir=str(run_dir),
    )


def _metric(run_dir, name: str) -> dict[int, float]:
    (path,) = Path(run_dir).glob("csv/**/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def _optimizer_steps(ckpt: dict, index: int = 0) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][index]["state"].values()}


def test_nan_batches_are_skipped_and_counted(synthetic_shards, vae_ckpt, tmp_path):
    from ldm.training.run import train

    cfg = _stage2(synthetic_shards, vae_ckpt, tmp_path, "trainer.max_steps=5")
    snaps = _Snapshots()
    result = train(cfg, extra_callbacks=[snaps, PoisonBatches(steps=[1, 2])])

    assert result["global_step"] == 5  # the skipped steps count: the schedule and the data go on
    for step in (1, 2):  # weights and EMA exactly as before the bad batch
        assert _same(snaps.before[step], snaps.after[step])
    for step in (0, 3, 4):
        assert not _same(snaps.before[step], snaps.after[step])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert _optimizer_steps(ckpt) == {
        3
    }  # AdamW stepped 3 times: bias correction as if the bad steps never were
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 3
    assert ckpt["nonfinite_steps"] == {"train/grad_norm": 2}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert _metric(tmp_path, "train/nonfinite_steps") == {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.0, 4: 2.0}
    norms = _metric(tmp_path, "train/grad_norm")
    assert math.isnan(norms[1]) and math.isnan(norms[2]) and math.isfinite(norms[3])


def test_without_the_check_a_nan_batch_ruins_the_weights(synthetic_shards, vae_ckpt, tmp_path):
    """Why the check is on by default: one NaN batch, clipped or not, turns every weight NaN."""
    from ldm.training.run import train

    cfg = _stage2(synthetic_shards, vae_ckpt, tmp_path, "trainer.max_steps=2", "max_nonfinite_steps=null")
    result = train(cfg, extra_callbacks=[PoisonBatches(steps=[0])])
    state = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert torch.isnan(state["unet.out.2.weight"]).all()


def test_a_streak_stops_the_run_with_a_checkpoint_that_resumes(synthetic_shards, vae_ckpt, tmp_path):
    from ldm.training.run import train

    cfg = _stage2(
        synthetic_shards,
        vae_ckpt,
        tmp_path / "a",
        "trainer.max_steps=10",
        "max_nonfinite_steps=2",
        "logger=wandb",
    )
    snaps = _Snapshots()
    with pytest.raises(
        NonFiniteGradients, match=r"stopped at step 5: 3 optimizer steps in a row \(steps 3–5\)"
    ):
        train(cfg, extra_callbacks=[snaps, PoisonBatches(steps=range(2, 10))])
    path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["nonfinite_steps"] == {"train/grad_norm": 3}
    assert _optimizer_steps(ckpt) == {2}
    unet = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.") and v.is_floating_point()]
    weights_after_2 = snaps.before[2][: len(unet)]
    assert _same(unet, weights_after_2)  # the last finite weights, saved
    assert max(snaps.before) == 4  # nothing ran after the stop
    from scripts.plot_run import wandb_records  # the offline run's record log: the W&B alert is in it

    (run,) = (tmp_path / "a" / "wandb").glob("offline-run-*")
    alerts = [
        r.alert for r in wandb_records(next(run.glob("*.wandb"))) if r.WhichOneof("record_type") == "alert"
    ]
    assert len(alerts) == 1 and alerts[0].title == "ldm: run stopped on NaN/inf gradients"
    assert "steps 3–5" in alerts[0].text and str(path) in alerts[0].text

    resumed_cfg = _stage2(
        synthetic_shards, vae_ckpt, tmp_path / "b", "trainer.max_steps=7", f"ckpt_path={path}"
    )
    resumed = torch.load(train(resumed_cfg)["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 7 and _optimizer_steps(resumed) == {4}
    assert resumed["nonfinite_steps"] == {"train/grad_norm": 3}  # the count is the run's, across the resume


def test_the_autoencoder_and_its_discriminator_skip_a_nan_batch(synthetic_shards, tmp_path):
    """Stage 1 steps two optimizers itself (manual optimization); each skips on its own gradient norm."""
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        "trainer.max_steps=3",
        "stage.loss.disc_start=0",
        "stage.latent_stats_samples=8",
        "logger=csv",
        "callbacks.reconstruction_grid=null",
        "callbacks.model_checkpoint=null",
        *FAST,
        run_dir=str(tmp_path),
    )
    snaps = _Snapshots()
    result = train(cfg, extra_callbacks=[snaps, PoisonBatches(steps=[1])])
    assert result["global_step"] == 3
    assert _same(snaps.before[1], snaps.after[1]) and not _same(snaps.before[2], snaps.after[2])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert _optimizer_steps(ckpt, 0) == {2} and _optimizer_steps(ckpt, 1) == {2}
    assert ckpt["nonfinite_steps"] == {"train/grad_norm": 1, "train/disc_grad_norm": 1}
    assert math.isfinite(ckpt["ldm"]["latent_scale"])
    assert _metric(tmp_path, "train/disc_nonfinite_steps")[2] == 1.0
    # the discriminator's BatchNorm statistics skipped the batch too (its forward would have made them NaN)
    nonfinite = [
        k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    assert not nonfinite, nonfinite


def test_a_negative_limit_is_refused_before_training(synthetic_shards, vae_ckpt, tmp_path):
    from ldm.training.run import train

    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 0 or null, got -1"):
        train(_stage2(synthetic_shards, vae_ckpt, tmp_path, "max_nonfinite_steps=-1"))


@pytest.fixture
def fp16_scaler(monkeypatch):
    """`trainer.precision=16-mixed` as on a GPU: Lightning's MixedPrecision plugin with a GradScaler, here on
    the CPU (Lightning itself turns 16-mixed on a CPU into bf16-mixed). A small initial scale, so that only the
    poisoned batches overflow."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    import ldm.training.run as run

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    cluster = run.cluster_settings
    monkeypatch.setattr(
        run,
        "cluster_settings",
        lambda cfg: (cluster(cfg)[0], [*cluster(cfg)[1], MixedPrecision("16-mixed", "cpu", scaler=scaler)]),
    )
    return scaler


def test_under_an_fp16_grad_scaler_a_nan_step_is_skipped_by_the_scaler_and_kept_out_of_the_ema(
    synthetic_shards, vae_ckpt, tmp_path, fp16_scaler
):
    """The scaler skips the step and halves its scale (the gradients reach it: dropping them first would hide the
    overflow from it); the guard still counts the step and the EMA leaves it out; the stop limit is raised to
    SCALER_STREAK, the scaler's own search being a streak too."""
    from ldm.training.run import train

    cfg = _stage2(
        synthetic_shards,
        vae_ckpt,
        tmp_path,
        "trainer.max_steps=5",
        "trainer.precision=null",
        "max_nonfinite_steps=1",
    )
    snaps = _Snapshots()
    result = train(cfg, extra_callbacks=[snaps, PoisonBatches(steps=[1, 2])])  # 2 in a row > the limit of 1

    assert result["global_step"] == 5
    for step in (1, 2):
        assert _same(snaps.before[step], snaps.after[step])  # UNet and EMA
    assert not _same(snaps.before[3], snaps.after[3])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert _optimizer_steps(ckpt) == {3} and int(ckpt["state_dict"]["ema.num_updates"]) == 3
    assert ckpt["nonfinite_steps"] == {"train/grad_norm": 2}
    assert (
        fp16_scaler.get_scale() == 2.0**4 / 4
    )  # halved at each skipped step, 3 good steps < growth_interval
    assert ckpt["MixedPrecision"]["scale"] == 2.0**4 / 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_the_autoencoder_under_an_fp16_grad_scaler(synthetic_shards, tmp_path, fp16_scaler, monkeypatch):
    """Stage 1 steps its optimizers itself, before Lightning unscales the gradients: the logged norm (and the one
    clipping compares with its threshold) is the unscaled one, and a NaN batch reaches the scaler, which skips
    both optimizers' steps and lowers its scale."""
    from ldm.training.run import train

    def run(run_dir):
        cfg = compose_train(
            "experiment=vae_tiny",
            f"data.train_urls={Path(synthetic_shards[0]).parent}",
            "trainer.max_steps=3",
            "trainer.precision=null",
            "stage.loss.disc_start=0",
            "stage.latent_stats_samples=8",
            "logger=csv",
            "callbacks.reconstruction_grid=null",
            "callbacks.model_checkpoint=null",
            *FAST,
            run_dir=str(run_dir),
        )
        snaps = _Snapshots()
        return train(cfg, extra_callbacks=[snaps, PoisonBatches(steps=[1])]), snaps

    result, snaps = run(tmp_path / "fp16")
    assert _same(snaps.before[1], snaps.after[1]) and not _same(snaps.before[2], snaps.after[2])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert _optimizer_steps(ckpt, 0) == {2} and _optimizer_steps(ckpt, 1) == {2}
    assert ckpt["nonfinite_steps"] == {"train/grad_norm": 1, "train/disc_grad_norm": 1}
    assert (
        fp16_scaler.get_scale() == 2.0**4 / 4
    )  # the scaler saw both overflows (update() after each optimizer)
    nonfinite = [
        k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    assert not nonfinite, nonfinite

    monkeypatch.undo()  # the same run in fp32: the first step's norm is the same, not 2**4 times it
    run(tmp_path / "fp32")
    for name in ("train/grad_norm", "train/disc_grad_norm"):
        fp16, fp32 = _metric(tmp_path / "fp16", name), _metric(tmp_path / "fp32", name)
        assert math.isnan(fp16[1]) and fp16[0] == pytest.approx(fp32[0], rel=0.05)
