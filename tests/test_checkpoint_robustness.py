"""Files that must survive a crash, a full disk or a power loss (checkpoints, post-hoc EMA snapshots, exports), and
EMAs of 16-bit weights (`precision: bf16-true`), which must keep moving at decay 0.9999."""

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ldm.export
import ldm.training.ema
import ldm.training.posthoc_ema as posthoc_ema
from ldm.training.ema import EMA, PowerEMA
from ldm.training.posthoc_ema import save_snapshot, snapshot_path
from ldm.utils.checkpoint import atomic_save, load_checkpoint


# --- fsync: the file before the rename, the folder after ----------------------------------------------------------
def _record_syncs(monkeypatch) -> list[tuple]:
    """Patches os.fsync and os.replace to log ("fsync", inode, is_dir) and ("replace", src, dst), in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _snapshot_writer(tmp_path: Path):
    ema = PowerEMA(nn.Linear(3, 2), [6.94])
    ema.update(nn.Linear(3, 2))
    return lambda path: save_snapshot(ema, path, step=1)


@pytest.mark.parametrize("writer", ["atomic_save", "snapshot"])
def test_the_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, writer):
    save = (
        (lambda p: atomic_save({"x": torch.ones(3)}, p))
        if writer == "atomic_save"
        else _snapshot_writer(tmp_path)
    )
    path = tmp_path / "run" / "file.ckpt"
    path.parent.mkdir()
    events = _record_syncs(monkeypatch)
    save(path)
    file_ino, dir_ino = os.stat(path).st_ino, os.stat(path.parent).st_ino  # a rename keeps the inode
    replace = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == path)
    file_syncs = [i for i, e in enumerate(events) if e[:3] == ("fsync", file_ino, False)]
    dir_syncs = [i for i, e in enumerate(events) if e[:3] == ("fsync", dir_ino, True)]
    assert file_syncs and min(file_syncs) < replace, f"the file is not fsynced before the rename: {events}"
    assert dir_syncs and max(dir_syncs) > replace, f"the folder is not fsynced after the rename: {events}"


def test_a_folder_that_cannot_be_fsynced_is_skipped(tmp_path, monkeypatch):
    """Windows cannot open a folder, some network filesystems refuse to fsync one: the save still succeeds."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_save({"x": torch.ones(3)}, tmp_path / "a.ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "a.ckpt")["x"], torch.ones(3))


# --- a failed save leaves the previous file and no temporary one --------------------------------------------------
def _disk_full_after_partial_write(tensors: dict, path, metadata: dict | None = None) -> None:
    """save_safetensors on a full disk: part of the file written, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_snapshot_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch):
    save = _snapshot_writer(tmp_path)
    path = snapshot_path(tmp_path, 1)
    save(path)
    before = path.read_bytes()
    monkeypatch.setattr(posthoc_ema, "save_safetensors", _disk_full_after_partial_write)
    with pytest.raises(OSError, match="No space left"):
        save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before


def test_a_failed_atomic_save_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"x": torch.ones(3)}, path)
    before = path.read_bytes()

    def torch_save(obj, f) -> None:
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"x": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before


# --- export: replacing an export never leaves neither ---------------------------------------------------------------
@pytest.fixture
def fake_export(monkeypatch):
    """export() with the checkpoint reading and the writing stubbed: the diffusers folder is one file, `content`."""
    state = SimpleNamespace(content="new")

    def write(parts, root: Path, dtype) -> dict:
        root.mkdir(parents=True)
        (root / "model_index.json").write_text(state.content)
        return {}

    monkeypatch.setattr(ldm.export, "ExportedParts", lambda ckpt, use_ema: SimpleNamespace(source={}))
    monkeypatch.setattr(ldm.export, "_write_diffusers", write)
    return state


def _old_export(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model_index.json").write_text("old")
    return out


def test_overwriting_an_export_replaces_it_and_leaves_nothing_beside(tmp_path, fake_export):
    out = _old_export(tmp_path)
    ldm.export.export("ckpt", out, "diffusers", overwrite=True)
    assert (out / "model_index.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_overwrite_keeps_the_previous_export(tmp_path, fake_export, monkeypatch):
    """The new folder cannot be renamed into place (here: an injected error; in life a crash or a kill at that
    moment): the previous export must still be there, whole."""
    out = _old_export(tmp_path)
    real_replace = os.replace

    def replace(src, dst) -> None:
        if Path(src).name.startswith(".model.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        ldm.export.export("ckpt", out, "diffusers", overwrite=True)
    assert (out / "model_index.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- EMA of bf16 weights -------------------------------------------------------------------------------------------
def _bf16_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A bf16 model (weights ±[1, 2)) and a target for its weights, twice them: a bf16 weight has 8 significant
    bits, so a step of 1e-4 of the difference is far below half a unit in the last place (2⁻⁸ of the weight at
    most), while 100 steps move ~1 % of it, more than that."""
    torch.manual_seed(seed)
    model, target = nn.Linear(16, 16).to(torch.bfloat16), nn.Linear(16, 16).to(torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(model.parameters(), target.parameters(), strict=True):
            p.copy_((1 + torch.rand(p.shape)) * torch.randn(p.shape).sign())
            q.copy_(2 * p)
    return model, target


def _assert_ema_of(average: nn.Module, start: list[torch.Tensor], target: nn.Module, keep: float) -> None:
    """`average` is target + keep · (start − target) computed exactly, then rounded to bf16 (up to one step of
    bf16 rounding, for float32 accumulation landing on the other side of a tie); and every weight moved."""
    for p, p0, q in zip(average.parameters(), start, target.parameters(), strict=True):
        assert (
            p.dtype == torch.bfloat16
        )  # the checkpoint holds what it held before: bf16 under the same names
        expected = q.double() + (p0.double() - q.double()) * keep
        assert (p != p0).all(), f"{(p == p0).sum()} of {p.numel()} bf16 EMA weights did not move at all"
        torch.testing.assert_close(p.double(), expected.to(torch.bfloat16).double(), rtol=2**-8, atol=0)


@pytest.mark.parametrize("chunk", [None, 1], ids=["one_chunk", "chunk_per_tensor"])
def test_an_ema_of_bf16_weights_moves_as_in_exact_arithmetic(chunk, monkeypatch):
    if chunk is not None:  # the model's weights go to float32 a chunk at a time
        monkeypatch.setattr(ldm.training.ema, "_CHUNK", chunk)
    model, target = _bf16_pair()
    ema = EMA(model, decay=0.9999, warmup=False)
    start = [p.clone() for p in ema.module.parameters()]
    for _ in range(100):
        ema.update(target)
    _assert_ema_of(ema.module, start, target, 0.9999**100)


def test_a_power_ema_of_bf16_weights_keeps_moving_late_in_a_run():
    """At t = 10⁴ a power EMA's step weight (γ + 1)/t ≈ 8e-4 is below bf16's half ulp too."""
    model, target = _bf16_pair()
    ema = PowerEMA(model, [6.94])
    ema.load_state_dict({**ema.state_dict(), "num_updates": torch.tensor(10_000)})
    start = [p.clone() for p in ema.averages[0].parameters()]
    keep = 1.0
    for t in range(10_001, 10_101):
        ema.update(target)
        keep *= (1.0 - 1.0 / t) ** 7.94
    _assert_ema_of(ema.averages[0], start, target, keep)


def test_a_loaded_bf16_ema_continues_from_the_loaded_weights():
    """The float32 copy the updates accumulate in is not in the state dict, which keeps its names and dtypes:
    loading one (a resume) restarts it from the loaded bf16 weights, not from the values before the load."""
    model, target = _bf16_pair()
    ema = EMA(model, decay=0.9999, warmup=False)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert {k: v.dtype for k, v in state.items()} == {
        "num_updates": torch.long,
        "module.weight": torch.bfloat16,
        "module.bias": torch.bfloat16,
    }
    for _ in range(300):
        ema.update(target)
    ema.load_state_dict(state)
    for _ in range(100):
        ema.update(target)
    _assert_ema_of(ema.module, [state["module.weight"], state["module.bias"]], target, 0.9999**100)


def test_an_fp32_ema_is_unchanged():
    """float32 weights take the plain in-place update, bit for bit as before."""
    torch.manual_seed(0)
    model, target = nn.Linear(8, 8), nn.Linear(8, 8)
    ema = EMA(model, decay=0.99, warmup=False)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        ema.update(target)
        for e, q in zip(expected, target.parameters(), strict=True):
            e.lerp_(q.detach(), 0.01)
    for p, e in zip(ema.module.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_a_bf16_true_run_trains_resumes_and_moves_its_ema(synthetic_shards, vae_ckpt, tmp_path):
    """`trainer.precision=bf16-true` end to end: the whole module in bf16 (Lightning makes bf16 the default dtype
    inside training_step, which once broke the per-timestep loss sums), its EMA moving, and a resume."""
    from ldm.training.run import train

    from .helpers import FAST, compose_train

    def run(steps: int):
        cfg = compose_train(
            "experiment=tiny",
            f"data.train_urls={synthetic_shards[0]}",
            f"autoencoder_ckpt={vae_ckpt}",
            "trainer.precision=bf16-true",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "callbacks.sample_grid=null",
            *FAST,
            run_dir=str(tmp_path),
        )
        return train(cfg)

    first = run(3)
    start = load_checkpoint(first["checkpoint"])
    second = run(6)
    end = load_checkpoint(second["checkpoint"])
    assert (start["global_step"], end["global_step"]) == (3, 6)
    ema = {
        k: v for k, v in end["state_dict"].items() if k.startswith("ema.module.") and v.is_floating_point()
    }
    assert ema and all(v.dtype == torch.bfloat16 and v.isfinite().all() for v in ema.values())
    moved = [not torch.equal(v, start["state_dict"][k]) for k, v in ema.items()]
    assert sum(moved) > len(moved) // 2  # the EMA took the resumed run's 3 updates
