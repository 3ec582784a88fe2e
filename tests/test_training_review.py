"""Review of the stage-2 training step's randomness across ranks: each rank draws its own timesteps, noise and
caption dropout (ldm.training.module_base.LDMModuleBase.on_fit_start)."""

import json
from types import SimpleNamespace

import lightning as L
import torch
from torch import nn

from ldm.diffusion import GaussianDiffusion, drop_conditioning
from ldm.training.module_base import LDMModuleBase
from ldm.training.optim import AdamWSettings

T = 1000


class _Module(LDMModuleBase):
    """The smallest module with LDMModuleBase's hooks; its step records what a diffusion step draws."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(AdamWSettings(lr=1e-3, warmup_steps=1))
        self.net = nn.Linear(2, 1)
        self.out_dir = out_dir

    def trainable_module(self) -> nn.Module:
        return self.net

    def training_step(self, batch, batch_idx):
        t, noise, drop = _step_draws()
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"t": t.tolist(), "noise": noise.flatten().tolist(), "drop": drop.tolist()}, f)
        return self.net(batch[0]).mean()


def _step_draws(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What DiffusionModule.training_step draws from torch's generator: t, the noise and the dropout mask."""
    diffusion = GaussianDiffusion(num_timesteps=T)
    t = diffusion.sample_timesteps(n, "cpu")
    noise = diffusion.training_noise((n, 4), "cpu", torch.float32)
    return t, noise, drop_conditioning(n, 0.5, "cpu")


def _draws_after_fit_start(rank: int, world_size: int, seed: int = 0):
    torch.manual_seed(seed)  # what seed_everything(cfg.seed) does on every rank
    module = _Module()
    module._trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    module.on_fit_start()
    return _step_draws()


def _assert_independent(a, b) -> None:
    """Independent draws: timesteps agree with probability 1/T (4 of 4096 expected), the noises are uncorrelated
    (correlation ~ N(0, 1/16384)), and the dropout masks agree for half the samples (p = 0.5)."""
    (ta, na, da), (tb, nb, db) = a, b
    assert int((ta == tb).sum()) < 30
    corr = torch.corrcoef(torch.stack([na.flatten(), nb.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    assert 0.4 < float((da == db).float().mean()) < 0.6


def test_each_rank_draws_its_own_timesteps_noise_and_dropout():
    """seed_everything seeds every rank alike; without a per-rank stream every rank drew the same t, noise and
    caption-dropout mask, so a global batch held only one device's worth of (t, noise) pairs."""
    _assert_independent(_draws_after_fit_start(0, 2), _draws_after_fit_start(1, 2))
    # reproducible: a function of the run's seed and the rank
    for x, y in zip(_draws_after_fit_start(1, 2), _draws_after_fit_start(1, 2), strict=True):
        assert torch.equal(x, y)
    # other seeds, other streams
    _assert_independent(_draws_after_fit_start(1, 2, seed=0), _draws_after_fit_start(1, 2, seed=1))


def test_a_single_process_keeps_the_stream_of_its_seed():
    torch.manual_seed(0)
    _Module()
    expected = _step_draws()
    for x, y in zip(_draws_after_fit_start(0, 1), expected, strict=True):
        assert torch.equal(x, y)


def test_two_ddp_ranks_draw_different_noise(tmp_path):
    """The same through Lightning: two CPU processes (ddp_spawn hands each the parent's random state, as
    seed_everything leaves every rank of a DDP run with the same one)."""
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Module(str(tmp_path)), data)
    draws = []
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        draws.append((torch.tensor(record["t"]), torch.tensor(record["noise"]), torch.tensor(record["drop"])))
    _assert_independent(*draws)
