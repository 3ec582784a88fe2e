"""Review of the command-line scripts: plot_run's .wandb reader, the quickstart's output folder and failing steps,
posthoc_ema's argument checks, and the synthetic shard writer's temporary names."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------- plot_run


def _wandb_log(records: list[bytes], block: int = 32768) -> bytes:
    """A `.wandb` record log in its LevelDB-style framing (the reader does not check the CRC)."""
    data = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in records:
        first = True
        while True:
            room = block - len(data) % block
            if room < 7:
                data += b"\0" * room
                continue
            chunk, payload = payload[: room - 7], payload[room - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            data += struct.pack("<IHB", 0, len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    return bytes(data)


def _history_record(step: int, loss: float) -> bytes:
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    for key, value in (("trainer/global_step", step), ("train/loss", loss)):
        item = record.history.item.add()
        item.key, item.value_json = key, repr(value)
    return record.SerializeToString()


def test_plot_run_reads_a_wandb_log_whose_last_record_is_cut_off(tmp_path):
    """A run still being written (or killed) ends in a partial record: the rows before it are read."""
    from scripts.plot_run import read_wandb_history

    full = _wandb_log([_history_record(i, 1.0 / (i + 1)) for i in range(3000)])  # spans several blocks
    path = tmp_path / "run-x.wandb"
    path.write_bytes(full)
    assert len(read_wandb_history(path)) == 3000
    for cut in (len(full) - 3, len(full) - 20):
        path.write_bytes(full[:cut])
        rows = read_wandb_history(path)
        assert len(rows) == 2999 and rows[-1]["trainer/global_step"] == 2998


def test_plot_run_names_a_run_folder_without_a_wandb_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/plot_run.py", str(tmp_path), "--out", str(tmp_path / "d.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"no .wandb file in {tmp_path}" in result.stderr
    assert "StopIteration" not in result.stderr


# --------------------------------------------------------------------------------------------- quickstart


def _quickstart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/quickstart.py", *args, "--num-samples", "2", "--num-val", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quickstart_refuses_an_out_folder_it_did_not_make(tmp_path):
    """Its clean-up removes <out>/vae, ldm, samples, data/latents: in a folder of other things (`--out .`, the
    repository, whose ldm/ is the package) it must remove nothing."""
    out = tmp_path / "runs"
    (out / "ldm").mkdir(parents=True)
    (out / "ldm" / "keep.txt").write_text("a user's run")
    (out / "samples").mkdir()
    result = _quickstart("--out", str(out))
    assert result.returncode != 0
    assert "not a quickstart output folder" in result.stderr
    assert (out / "ldm" / "keep.txt").read_text() == "a user's run" and (out / "samples").is_dir()
    assert not (out / "data").exists()


def test_quickstart_step_failure_names_the_step(monkeypatch, capsys):
    from scripts import quickstart

    with pytest.raises(SystemExit) as exit_info:
        quickstart.run([sys.executable, "-c", "import sys; sys.exit(3)"], "stage 1: autoencoder", {})
    assert exit_info.value.code not in (0, None)
    assert "stage 1: autoencoder" in str(exit_info.value.code)


def test_quickstart_out_folder_check_accepts_its_own_and_new_folders(tmp_path):
    from scripts.quickstart import check_out_folder

    check_out_folder(tmp_path / "new")  # absent
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty")
    own = tmp_path / "own"
    check_out_folder(own, mark=True)
    (own / "ldm").mkdir()
    check_out_folder(own)  # marked by an earlier run
    old = tmp_path / "old"  # an earlier quickstart's, from before the mark
    (old / "data" / "train").mkdir(parents=True)
    (old / "data" / "train" / "shapes-000000.tar").write_bytes(b"")
    (old / "ldm").mkdir()
    check_out_folder(old)
    with pytest.raises(SystemExit, match="not a quickstart output folder"):
        check_out_folder(ROOT)


# --------------------------------------------------------------------------------------------- synthetic shards


def test_synthetic_shards_are_written_under_a_temporary_name(tmp_path, monkeypatch):
    """An interrupted write leaves no complete-looking `shapes-*.tar` behind."""
    from ldm.data import synthetic

    calls = {"n": 0}
    real = synthetic.render

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_shards(tmp_path, 30, samples_per_shard=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shapes-000000.tar"]
    monkeypatch.setattr(synthetic, "render", real)
    paths = synthetic.write_synthetic_shards(tmp_path, 30, samples_per_shard=10)
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in tmp_path.glob("*.tar"))
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".tar"]


# --------------------------------------------------------------------------------------------- posthoc_ema


def _posthoc(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/posthoc_ema.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_posthoc_ema_names_a_missing_checkpoint(tmp_path):
    result = _posthoc(f"ckpt={tmp_path}/nope.ckpt")
    assert result.returncode != 0
    assert f"ckpt={tmp_path}/nope.ckpt: no such checkpoint file" in result.stderr


def test_posthoc_ema_checks_widths_and_steps_before_reading_the_checkpoint(tmp_path):
    """A width outside (0, 1/sqrt(12)) or a step without a snapshot is refused before the (large) checkpoint is
    read and before any output is written."""
    import torch
    from torch import nn

    from ldm.training.ema import PowerEMA
    from ldm.training.posthoc_ema import save_snapshot, sigma_rel_to_gamma, snapshot_path

    model = nn.Linear(4, 1, bias=False)
    ema = PowerEMA(model, [sigma_rel_to_gamma(s) for s in (0.05, 0.10)])
    for step in range(1, 21):
        ema.update(model)
        if step % 10 == 0:
            save_snapshot(ema, snapshot_path(tmp_path / "posthoc_ema", step), step, dtype=torch.float32)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    result = _posthoc(f"ckpt={ckpt}", "sigma_rel=0.5")
    assert result.returncode != 0 and "sigma_rel must be in (0, 0.2887), got 0.5" in result.stderr
    result = _posthoc(f"ckpt={ckpt}", "step=[20,15]")
    assert result.returncode != 0
    assert "no snapshot at step [15]; snapshots exist at steps 10, 20" in result.stderr
    assert not (tmp_path / "posthoc").exists()


# --------------------------------------------------------------------------------------------- COCO shards


def test_coco_rerun_into_the_same_folder_leaves_no_earlier_shards(tmp_path):
    """The evaluation reads a shard folder whole: a smaller rerun must not leave the earlier run's later shards.
    The image bytes are stored as they are, under unique keys."""
    import io
    import json
    import tarfile

    from PIL import Image

    from ldm.data.coco import coco_to_shards

    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    images, annotations = [], []
    for i in range(6):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        buf = io.BytesIO()
        Image.new("RGB", (8 + i, 6), (40 * i, 0, 0)).save(buf, format="JPEG", quality=70)
        (images_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i + 1, "file_name": name})
        annotations.append({"image_id": i + 1, "id": i, "caption": f"image {i}"})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    out = tmp_path / "shards"
    assert len(coco_to_shards(images_dir, ann, out, samples_per_shard=2)["shards"]) == 3
    (out / "notes.tar").write_bytes(b"")  # not one of its shards: kept
    record = coco_to_shards(images_dir, ann, out, num_images=2, samples_per_shard=2)
    assert record["shards"] == ["coco-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["coco-000000.tar", "notes.tar"]
    keys = []
    with tarfile.open(out / "coco-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
        if name.endswith(".jpg"):
            meta = json.loads(members[name[: -len("jpg")] + "json"])
            assert data == (images_dir / meta["file_name"]).read_bytes()
            keys.append(name[: -len(".jpg")])
    assert len(keys) == len(set(keys)) == 2


def test_quickstart_wandb_runs_stay_offline(tmp_path, monkeypatch):
    """The README promises offline W&B runs under quickstart_out (docs/dashboards.md plots
    quickstart_out/ldm/wandb/offline-run-*): a configured API key must not send the quickstart online."""
    from scripts import quickstart

    commands = []

    def record(cmd, label, timings):
        commands.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(quickstart, "run", record)
    argv = ["quickstart.py", "--out", str(tmp_path / "qs"), "--num-samples", "2", "--num-val", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        quickstart.main()
    (stage1,) = commands
    assert "logger=wandb" in stage1 and "logger.offline=true" in stage1
