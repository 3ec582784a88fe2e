"""The README's quickstart command, end to end with tiny step counts (its code path, not its quality)."""

import csv
import json
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.slow
def test_quickstart_script_runs_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "scripts/quickstart.py",
        "--out",
        str(tmp_path / "qs"),
        "--num-samples",
        "300",
        "--vae-steps",
        "4",
        "--ldm-steps",
        "4",
        "--sample-steps",
        "2",
        "--logger",
        "csv",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = tmp_path / "qs" / "samples" / "grid.png"
    assert proc.stdout.strip().splitlines()[-1] == f"Done. The grid of samples is at {grid}"
    assert grid.is_file()
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert set(summary["scores"]) == {"seen", "held-out"}
    assert {"stage 1: autoencoder", "stage 2: latent diffusion", "sampling", "total"} <= set(
        summary["timings_s"]
    )
    assert len(list((tmp_path / "qs" / "samples" / "images").glob("*.png"))) == 8 * 4
    # stage 2 scored the held-out shards' cached latents after steps 2 and 4
    (metrics,) = (tmp_path / "qs" / "ldm").glob("csv/**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3] and all(float(r["val/loss"]) > 0 for r in rows)
