"""EMA, optimizer schedule, checkpoint I/O: the pieces of training that do not need a Trainer."""

import math
import os
import pickle
import stat

import pytest
import torch
from torch import nn

from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.ema import EMA
from ldm.training.optim import AdamWSettings, param_groups
from ldm.utils.checkpoint import atomic_save, load_bundle, load_checkpoint, submodule_state


def test_ema_follows_the_warmup_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.99, (1 + n) / (10 + n))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert int(ema.num_updates) == 30
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_decay_follows_a_loaded_update_count():
    """The warm-up reads a host-side copy of num_updates (no GPU sync per step); a loaded state replaces it."""
    model = nn.Linear(3, 2)
    trained, fresh = EMA(model, decay=0.999), EMA(model, decay=0.999)
    for _ in range(30):
        trained.update(model)
    fresh.update(model)  # its host count is now 1
    assert fresh.current_decay() == pytest.approx(2 / 11)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.current_decay() == pytest.approx(31 / 40)
    fresh.update(model)
    assert int(fresh.num_updates) == 31 and fresh.current_decay() == pytest.approx(32 / 41)


def test_ema_without_warmup_and_decay_bounds():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 0.5))
    with pytest.raises(ValueError):
        EMA(model, decay=1.5)


def test_lr_warmup_then_cosine():
    model = nn.Linear(4, 4)
    settings = AdamWSettings(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    opt, sched = settings.build(model, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    for step in (10, 35, 60, 109):
        progress = (step - 10) / 100
        assert lrs[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    with pytest.raises(ValueError):
        AdamWSettings(decay="cosine").build(model, total_steps=None)


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_fused_adamw_by_default_and_clipped_under_bf16_autocast(tmp_path):
    """optim.fused=null: torch's fused kernel (on CPU too: docs/benchmarks.md). Lightning refuses to clip the
    gradients of an optimizer that says it unscales them itself; ours must still clip under bf16-mixed, and equal
    the foreach loop's step."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, fused):
            super().__init__()
            torch.manual_seed(0)
            self.net, self.fused = nn.Linear(4, 4), fused

        def training_step(self, batch, _):
            return self.net(batch[0]).square().sum() * 100  # gradients far above the clip threshold

        def configure_optimizers(self):
            return AdamWSettings(lr=0.1, warmup_steps=1, fused=self.fused).build(self.net)[0]

    assert AdamWSettings().build(nn.Linear(2, 2))[0].defaults["fused"]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=8)
    weights = []
    for fused in (None, False):
        module = Tiny(fused)
        trainer = L.Trainer(
            accelerator="cpu",
            precision="bf16-mixed",
            gradient_clip_val=0.5,
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, train_dataloaders=data)
        weights.append(module.net.weight.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-6)


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


class _Payload:
    """Any class that unpickling would have to import and construct."""


def test_checkpoints_are_loaded_as_data_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "object": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_bundle_errors_and_submodule_state(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"unet.w": torch.ones(1), "ema.module.w": torch.zeros(1)}}, plain)
    with pytest.raises(ValueError, match="not an ldm checkpoint"):
        load_bundle(plain)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")
    state = load_checkpoint(plain)["state_dict"]
    assert submodule_state(state, "ema.module") == {"w": torch.zeros(1)}


def test_a_cut_short_checkpoint_is_named_in_the_error(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}, "global_step": 7}, whole)
    data = whole.read_bytes()
    for cut in (len(data) // 2, 0):  # a copy cut short; an empty file
        damaged = tmp_path / f"cut_{cut}.ckpt"
        damaged.write_bytes(data[:cut])
        for load in (load_checkpoint, AtomicCheckpointIO().load_checkpoint):
            with pytest.raises(ValueError, match=f"cannot read checkpoint {damaged} \\({cut:,} bytes\\)"):
                load(damaged)


def test_a_rerun_resumes_from_the_newest_full_checkpoint_of_its_run_dir(tmp_path, caplog):
    """What a requeued job resumes from: the checkpoint of the latest step, wherever it lies in the run dir;
    weights-only and unreadable files are passed over."""
    from ldm.training.run import _newest_checkpoint
    from ldm.utils.checkpoint import BUNDLE_KEY, CONTENTS_KEY, WEIGHTS_ONLY

    run = tmp_path / "run"
    assert _newest_checkpoint(run) is None  # a new run dir
    atomic_save({"global_step": 1000}, run / "hpc_ckpt_1.ckpt")  # preempted at 1000, requeued ...
    atomic_save({"global_step": 20000}, run / "checkpoints" / "step_0020000.ckpt")  # ... then killed
    atomic_save({"global_step": 20000}, run / "checkpoints" / "last.ckpt")
    assert _newest_checkpoint(run)[1] == 20000
    atomic_save(
        {"global_step": 25000, BUNDLE_KEY: {CONTENTS_KEY: WEIGHTS_ONLY}}, run / "checkpoints" / "w.ckpt"
    )
    (run / "hpc_ckpt_2.ckpt").write_bytes(b"")  # written by something else than ldm, and cut short
    path, step = _newest_checkpoint(run)
    assert step == 20000 and path.parent == run / "checkpoints"
    assert "not resuming from" in caplog.text and "hpc_ckpt_2.ckpt" in caplog.text
    atomic_save({"global_step": 30000}, run / "checkpoints" / "step_0030000.ckpt")
    assert _newest_checkpoint(run) == (run / "checkpoints" / "step_0030000.ckpt", 30000)
    atomic_save({"global_step": 30000}, run / "hpc_ckpt_3.ckpt")  # preempted there: last.ckpt follows it
    atomic_save({"global_step": 30000}, run / "checkpoints" / "last.ckpt")
    assert _newest_checkpoint(run) == (run / "hpc_ckpt_3.ckpt", 30000)

    from omegaconf import OmegaConf

    from ldm.training.run import _resume_checkpoint

    cfg = OmegaConf.create({"run_dir": str(run), "ckpt_path": None, "trainer": {"max_steps": 40000}})
    assert _resume_checkpoint(cfg) == str(run / "hpc_ckpt_3.ckpt") and "nothing is left" not in caplog.text
    cfg.trainer.max_steps = 30000  # the same command after the run ended: it says why nothing happens
    assert _resume_checkpoint(cfg) == str(run / "hpc_ckpt_3.ckpt")
    assert "already reached trainer.max_steps=30000 (step 30000): nothing is left to train" in caplog.text
    cfg.ckpt_path = str(run / "checkpoints" / "step_0020000.ckpt")  # given: taken as it is
    assert _resume_checkpoint(cfg) == cfg.ckpt_path


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    """A lab shares its runs: checkpoints and safetensors files are readable as the umask allows, not owner-only
    (mkstemp's temporary files and safetensors' save_file both make 0600 files)."""
    from ldm.utils.checkpoint import file_mode, save_safetensors

    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        atomic_save({"x": torch.zeros(2)}, tmp_path / "a.ckpt")
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
        (tmp_path / "plain").write_text("")  # what open() gives
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.ckpt": 0o666 & ~umask, "b.safetensors": 0o666 & ~umask, "plain": 0o666 & ~umask}
