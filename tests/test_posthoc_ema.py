"""Post-hoc EMA (Karras et al. 2024): the power-function averages, their profiles, the reconstruction of any width
from snapshots, and a stage-2 run that writes snapshots which scripts/posthoc_ema.py turns into checkpoints."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ldm.data.synthetic import write_synthetic_shards
from ldm.inference import TextToImage
from ldm.training.ema import PowerEMA
from ldm.training.posthoc_ema import (
    find_snapshots,
    gamma_to_sigma_rel,
    profile_inner_product,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
    snapshot_path,
    solve_coefficients,
)
from ldm.training.run import train
from ldm.utils.checkpoint import load_bundle

from .helpers import ROOT, compose_train
from .latent_helpers import cache_shards, latent_run, tiny_ae_checkpoint


# --- the profiles -------------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse_and_give_the_profile_s_width():
    # EDM2's two tracked profiles (Karras et al. 2024, sec. 3.1)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    tau = np.linspace(0.0, 1.0, 400_001)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-9)
        # the standard deviation of the profile ∝ τ^γ on [0, 1], by quadrature
        p = tau**gamma
        p /= np.trapezoid(p, tau)
        mean = np.trapezoid(tau * p, tau)
        assert np.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau)) == pytest.approx(sigma, rel=1e-4)
    for bad in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_quadrature():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t_a, t_b = rng.uniform(10, 1000, size=2)
        g_a, g_b = rng.uniform(0.5, 30, size=2)
        tau = np.linspace(0.0, min(t_a, t_b), 400_001)
        p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(
            np.trapezoid(p_a * p_b, tau), rel=1e-6
        )


def test_a_profile_among_the_snapshots_is_reconstructed_exactly():
    times = [100, 200, 300, 400] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * 4 + [sigma_rel_to_gamma(0.1)] * 4
    fit = solve_coefficients(times, gammas, 300, sigma_rel_to_gamma(0.1))
    np.testing.assert_allclose(fit.coefficients, np.eye(8)[6], atol=1e-6)
    assert fit.residual < 1e-6
    between = solve_coefficients(times, gammas, 400, sigma_rel_to_gamma(0.075))
    assert between.coefficients.sum() == pytest.approx(1.0) and between.residual < 0.05


# --- the averages -------------------------------------------------------------------------------------------------
def _trajectory(steps: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """(steps, dim) weights of a pretend training run: a drift, slow oscillations and per-step noise."""
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(0, 1, steps)[:, None]
    freq, phase = torch.rand(1, dim, generator=g) * 6, torch.rand(1, dim, generator=g) * 6
    drift = torch.randn(1, dim, generator=g)
    return (drift * s + torch.sin(freq * s * 3 + phase) + 0.3 * torch.randn(steps, dim, generator=g)).double()


def _follow(weights: torch.Tensor, sigma_rels, every: int | None = None, folder=None) -> PowerEMA:
    """Feed the rows of `weights` to a PowerEMA of a (dim,)-parameter model, one update each; snapshots (float32)
    every `every` updates into `folder`."""
    model = nn.Linear(weights.shape[1], 1, bias=False).double()
    ema = PowerEMA(model, [sigma_rel_to_gamma(s) for s in sigma_rels])
    for step, row in enumerate(weights, start=1):
        model.weight.data.copy_(row[None])
        ema.update(model)
        if every and step % every == 0:
            save_snapshot(ema, snapshot_path(folder, step), step, dtype=torch.float32)
    return ema


def test_a_power_ema_is_the_power_weighted_average_of_the_weight_history():
    weights = _trajectory(300)
    ema = _follow(weights, [0.05, 0.1, 0.2])
    assert ema.updates == 300
    t = torch.arange(1, 301, dtype=torch.float64)
    for gamma, average in zip(ema.gammas, ema.averages, strict=True):
        # the share of step τ after t updates: (1 − β_τ) Π_{s>τ} β_s = (1 − β_τ) (τ/t)^(γ+1), β_τ = (1 − 1/τ)^(γ+1)
        share = (1 - (1 - 1 / t) ** (gamma + 1)) * (t / 300) ** (gamma + 1)
        assert share.sum() == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(average.weight[0], share @ weights, rtol=1e-10, atol=1e-10)
        # the width of the discrete profile is the continuous one's
        mean = (share * t).sum()
        width = ((share * (t - mean) ** 2).sum()).sqrt() / 300
        assert float(width) == pytest.approx(gamma_to_sigma_rel(gamma), rel=0.02)


def test_snapshots_of_two_widths_give_the_ema_of_any_width(tmp_path):
    """EDM2's claim, on a pretend trajectory: averages of sigma_rel 0.05 and 0.10 snapshotted every 50 of 1000
    steps reconstruct the EMA of other widths, at the end and at an earlier snapshot, far better than the nearest
    tracked average does."""
    weights = _trajectory(1000)
    _follow(weights, [0.05, 0.10], every=50, folder=tmp_path)
    snapshots = find_snapshots(tmp_path)
    assert [s.step for s in snapshots] == list(range(50, 1001, 50)) and snapshots[-1].t == 1000
    for sigma, nearest, step in ((0.075, 0.05, None), (0.15, 0.10, None), (0.075, 0.10, 600)):
        upto = weights[: step or 1000]
        direct = _follow(upto, [sigma]).averages[0].weight[0]
        state, fit, end = reconstruct(snapshots, sigma, step)
        assert end.step == (step or 1000)
        assert fit.coefficients.shape == (2 * end.step // 50,)
        error = (state["weight"][0].double() - direct).norm()
        naive = (_follow(upto, [nearest]).averages[0].weight[0] - direct).norm()
        assert error < naive / 100, (sigma, float(error), float(naive))  # measured: 400-1800x smaller
        assert error / direct.norm() < 1e-3
    # a tracked width at a snapshot is that snapshot's average
    state, fit, _ = reconstruct(snapshots, 0.10, 500)
    torch.testing.assert_close(
        state["weight"][0].double(), _follow(weights[:500], [0.10]).averages[0].weight[0]
    )
    with pytest.raises(ValueError, match="no snapshot at step 510"):
        reconstruct(snapshots, 0.1, 510)
    (tmp_path / "step-00001050.safetensors").write_bytes(b"\x00" * 10)  # damaged: named, not skipped
    with pytest.raises(ValueError, match="step-00001050.safetensors is not a readable snapshot"):
        find_snapshots(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        find_snapshots(tmp_path / "empty")


# --- a training run -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    images, out = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("cache") / "latents"
    write_synthetic_shards(images, num_samples=24, samples_per_shard=12, resolution=32, seed=1)
    cache_shards(tiny_ae_checkpoint(tmp_path_factory.mktemp("vae")), images, out)
    return out


def _run(cache, run_dir, steps: int, *extra: str):
    cfg = compose_train(
        *latent_run(cache, 4, steps),
        "callbacks.posthoc_ema.every_n_steps=2",
        "callbacks.posthoc_ema.dtype=float32",
        *extra,
        run_dir=str(run_dir),
    )
    return train(cfg)


def test_a_run_writes_snapshots_that_become_checkpoints(cache, tmp_path):
    result = _run(
        cache,
        tmp_path / "run",
        5,
        "stage.posthoc_ema=[0.05,0.1]",
        "callbacks.weights_snapshot.every_n_train_steps=4",
    )
    folder = tmp_path / "run" / "checkpoints" / "posthoc_ema"
    snapshots = find_snapshots(folder)
    assert [(s.step, s.t) for s in snapshots] == [(2, 2), (4, 4), (5, 5)]  # every 2 steps and at the end
    assert [gamma_to_sigma_rel(g) for g in snapshots[0].gammas] == pytest.approx([0.05, 0.1])
    bundle, ckpt = load_bundle(result["checkpoint"])
    assert int(ckpt["state_dict"]["posthoc_ema.num_updates"]) == 5  # resumable: in the full checkpoint
    weights_only = sorted((tmp_path / "run" / "checkpoints").glob("weights/*.ckpt"))
    assert weights_only
    for path in weights_only:  # what sample.py reads needs no averages
        assert not any(k.startswith("posthoc_ema.") for k in load_bundle(path)[1]["state_dict"])

    proc = subprocess.run(
        [
            sys.executable,
            "scripts/posthoc_ema.py",
            f"ckpt={result['checkpoint']}",
            "sigma_rel=[0.1,0.2]",
            "step=[4,5]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"3 snapshots \(steps 2\.\.5, sigma_rel 0\.050, 0\.100\)", proc.stdout), proc.stdout
    out = tmp_path / "run" / "checkpoints" / "posthoc"
    made = {p.name for p in out.glob("*.ckpt")}
    assert made == {f"sigma_rel-0.{w}00-step_000000{s}.ckpt" for w in (1, 2) for s in (4, 5)}
    at_4 = load_bundle(out / "sigma_rel-0.100-step_0000004.ckpt")[0]["posthoc_ema"]
    assert at_4["step"] == 4 and len(at_4["coefficients"]) == 2 * 2  # the snapshots of steps 2 and 4

    # the width tracked during training comes back as the last snapshot's average (fit error 0)
    bundle, tracked = load_bundle(out / "sigma_rel-0.100-step_0000005.ckpt")
    assert bundle["posthoc_ema"]["residual"] < 1e-6 and bundle["posthoc_ema"]["t"] == 5
    assert "fit error 0.00 %" in proc.stdout
    for name, value in ckpt["state_dict"].items():
        if name.startswith("posthoc_ema.averages.1."):
            torch.testing.assert_close(tracked["state_dict"]["ema.module." + name.split(".", 3)[3]], value)
    # another width is a new average, and a checkpoint like any other: sample.py's loader samples from it
    wide = load_bundle(out / "sigma_rel-0.200-step_0000005.ckpt")[1]["state_dict"]
    assert any(
        not torch.equal(wide[k], tracked["state_dict"][k]) for k in wide if k.startswith("ema.module.")
    )
    pipe, described = TextToImage.from_checkpoint(out / "sigma_rel-0.200-step_0000005.ckpt")
    assert described["posthoc_ema"]["sigma_rel"] == 0.2
    assert json.dumps(described["posthoc_ema"])  # plain data
    from ldm.diffusion.samplers import DDIMSampler

    images = pipe(["a red circle"], DDIMSampler(num_steps=2), guidance_scale=2.0, seeds=[0])
    assert images.shape[-2:] == (32, 32) and torch.isfinite(images).all()


def test_post_hoc_ema_switched_on_at_a_resume_starts_there(cache, tmp_path):
    first = _run(cache, tmp_path / "run", 2)
    assert not (tmp_path / "run" / "checkpoints" / "posthoc_ema").exists()  # off: nothing written
    _run(cache, tmp_path / "run", 4, "stage.posthoc_ema=[0.1]", f"ckpt_path={first['checkpoint']}")
    snapshots = find_snapshots(tmp_path / "run" / "checkpoints" / "posthoc_ema")
    assert [(s.step, s.t) for s in snapshots] == [(4, 2)]  # its time counts from the resume
