"""Rectified flow (ldm.diffusion.RectifiedFlow): the schedule against diffusers' flow-matching scheduler, the
forward process and loss against the straight-path formulas written out here, and every sampler on data whose
exact velocity field is known."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    GaussianDiffusion,
    HeunSampler,
    RectifiedFlow,
)
from ldm.utils.images import read_png_metadata

from .helpers import FAST, ROOT, compose_train

T = 1000


def gaussian_velocity(flow: RectifiedFlow, mu: float, sd: float):
    """Exact v(x_s, s) = E[eps - x0 | x_s] for data N(mu, sd^2), written from the network's inputs only:
    x_s = (1 - s) x0 + s eps, E[x0 | x_s] = mu + (1 - s) sd^2 / ((1 - s)^2 sd^2 + s^2) (x_s - (1 - s) mu),
    v = (x_s - E[x0 | x_s]) / s. The time input is s T."""

    def model_fn(x, time):
        s = (time.to(x.dtype) / flow.num_timesteps).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = mu + (1 - s) * sd**2 / ((1 - s) ** 2 * sd**2 + s**2) * (x - (1 - s) * mu)
        return (x - x0) / s

    return model_fn


def test_schedule_and_time_input_match_diffusers_flow_match_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for shift in (1.0, 3.0):
        theirs = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
        flow = RectifiedFlow(num_timesteps=T, schedule_shift=shift)
        # diffusers lists them from s = 1 down; ours are indexed by t ascending
        torch.testing.assert_close(flow.sigmas.flip(0).float(), theirs.sigmas, rtol=0, atol=1e-6)
        time = flow.model_time(torch.arange(T))
        torch.testing.assert_close(time.flip(0), theirs.timesteps, rtol=0, atol=1e-3)
        assert time.dtype == torch.float32


def test_shift_lowers_log_snr_by_two_log_shift():
    base, shifted = RectifiedFlow(), RectifiedFlow(schedule_shift=2.0)
    t = torch.arange(T - 1)  # the last step has SNR 0 in both
    diff = shifted.snr(t).double().log() - base.snr(t).double().log()
    torch.testing.assert_close(diff, torch.full_like(diff, -2 * math.log(2.0)), rtol=0, atol=1e-4)
    assert base.snr(torch.tensor([T - 1])).item() == 0.0
    # SNR = ((1 - s) / s)^2 with s = (t + 1) / T
    s = (t.double() + 1) / T
    torch.testing.assert_close(base.snr(t).double(), ((1 - s) / s) ** 2, rtol=1e-6, atol=0)


def test_forward_process_target_and_conversions():
    flow = RectifiedFlow(schedule_shift=1.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998, 999])
    u = (t.double() + 1) / T
    s = (1.5 * u / (1 + 0.5 * u)).reshape(-1, 1, 1, 1)
    x_s = flow.model_input(flow.q_sample(x0, t, eps), t)
    torch.testing.assert_close(x_s, (1 - s) * x0 + s * eps, rtol=0, atol=1e-12)
    v = flow.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    x0_back, eps_back = flow.to_x0_eps(v, flow.q_sample(x0, t, eps), t)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.from_x0_eps(x0, eps, t), v)


def test_loss_is_the_velocity_mse_at_the_straight_path():
    flow = RectifiedFlow()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).unbind(0)
    x0, eps = x0.reshape(3, 1, 4, 4), eps.reshape(3, 1, 4, 4)
    t = torch.tensor([3, 400, 999])
    seen = {}

    def model_fn(x, time):
        seen["x"], seen["time"] = x, time
        return torch.tanh(x) * time.reshape(-1, 1, 1, 1) / T

    out = flow.loss(model_fn, x0, t=t, noise=eps)
    s = ((t.double() + 1) / T).reshape(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    expected = (torch.tanh(x_s) * s - (eps - x0)).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(seen["time"], (s.flatten() * T).float())
    # the model that knows the answer has zero loss
    perfect = flow.loss(lambda x, time: eps - x0, x0, t=t, noise=eps)
    assert perfect.loss.item() == pytest.approx(0.0, abs=1e-24)


def test_min_snr_weights_the_x0_error_by_min_snr_gamma():
    """A network whose x0 estimate is off by delta pays w ||v error||^2 = min(SNR, gamma) ||delta||^2."""
    gamma = 5.0
    flow = RectifiedFlow(min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(2)
    x0, eps, delta = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64, generator=g).unbind(0)
    t = torch.tensor([0, 100, 600, 999])
    x_t = flow.q_sample(x0, t, eps)
    s = flow.sigmas[t].reshape(-1, 1, 1, 1)
    v_hat = (flow.model_input(x_t, t) - (x0 + delta)) / s  # x0_hat = x_s - s v_hat = x0 + delta
    torch.testing.assert_close(flow.to_x0_eps(v_hat, x_t, t)[0], x0 + delta)
    out = flow.loss(lambda x, time: v_hat, x0, t=t, noise=eps)
    snr = ((1 - flow.sigmas[t]) / flow.sigmas[t]) ** 2
    expected = snr.clamp(max=gamma) * delta.square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.weights.double() * out.per_sample, expected, rtol=1e-5, atol=1e-12)
    assert out.weights[-1] == 0  # s = 1: the image is pure noise, SNR 0


def test_logit_normal_is_the_default_and_describe_names_the_process():
    flow = RectifiedFlow()
    t = flow.sample_timesteps(20000, "cpu", generator=torch.Generator().manual_seed(3))
    s = (t.double() + 1) / T
    logit = torch.log(s / (1 - s).clamp(min=1e-9))[s < 1]
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    d = flow.describe()
    assert (d["schedule"], d["prediction"], d["timestep_sampling"]) == (
        "rectified_flow",
        "flow",
        "logit_normal",
    )
    assert RectifiedFlow(timestep_sampling="uniform").describe()["timestep_sampling"] == "uniform"
    with pytest.raises(ValueError, match="schedule_shift"):
        RectifiedFlow(schedule_shift=0.0)
    with pytest.raises(ValueError, match="timestep_sampling"):
        RectifiedFlow(timestep_sampling="cosine")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(
    ("num_steps", "spacing"), [(2, "linspace"), (10, "linspace"), (28, "trailing"), (7, "trailing")]
)
def test_ddim_is_diffusers_flow_match_euler(shift, num_steps, spacing):
    """DDIM (eta 0) on a RectifiedFlow takes exactly the steps x' = x + (s' - s) v of diffusers'
    FlowMatchEulerDiscreteScheduler, from the same noise with the same network, given the same noise levels.
    Both spacings start at s = 1, where our Gaussian state and diffusers' x_s are the same noise.

    (They are passed to diffusers unshifted, as it takes them; its own default grid with a shift is not the
    training grid: it spaces the already shifted end points evenly, then shifts them again.)"""
    diffusers = pytest.importorskip("diffusers")
    flow = RectifiedFlow(schedule_shift=shift)
    model_fn = gaussian_velocity(flow, mu=0.5, sd=0.3)
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampler = DDIMSampler(num_steps, timestep_spacing=spacing)

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(sigmas=[(t + 1) / T for t in sampler.timesteps(T)])
    x = x_T.clone()
    for time in scheduler.timesteps:
        x = scheduler.step(model_fn(x, time.expand(len(x))), time, x).prev_sample

    torch.testing.assert_close(sampler(model_fn, flow, x_T), x.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "sampler",
    [
        DDIMSampler(100, timestep_spacing="trailing"),
        DDIMSampler(500, eta=1.0, timestep_spacing="trailing"),
        DDPMSampler(),
        EulerSampler(100),
        EulerAncestralSampler(500),
        HeunSampler(30),
        DPMSolverPP2MSampler(30),
        DPMSolverPP2MSampler(30, karras=True, sigma_max=80.0),
    ],
    ids=repr,
)
def test_every_sampler_carries_noise_to_the_data_distribution(sampler):
    """Data N(mu, sd^2) with its exact velocity: the flow maps N(0, 1) onto it, so each sampler's output has the
    data's mean and std up to its discretization error (here < 0.005; ancestral samplers need more steps than
    the ODE solvers for that) and the Monte Carlo error of 4000 samples."""
    mu, sd, n = 0.5, 0.3, 4000
    flow = RectifiedFlow(schedule_shift=2.0)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(n, 1, dtype=torch.float64, generator=g)
    out = sampler(gaussian_velocity(flow, mu, sd), flow, x_T, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=4 * sd / math.sqrt(n) + 0.005)
    assert out.std().item() == pytest.approx(sd, abs=4 * sd / math.sqrt(2 * n) + 0.005)


def test_deterministic_samplers_follow_the_exact_flow_at_their_order():
    """The ODE of N(mu, sd^2) is affine: x_0 = mu + sd x_1 for a start x_1. Each deterministic sampler reaches that
    point for each start, with the error of its order: DDIM / Euler (first order) halve it when the steps double,
    Heun (second order; its last step is Euler) cuts it by more than 4x."""
    mu, sd = 0.5, 0.3
    flow = RectifiedFlow()
    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(-1, 1)
    model_fn = gaussian_velocity(flow, mu, sd)

    def error(sampler):
        return (sampler(model_fn, flow, x_T) - (mu + sd * x_T)).abs().max().item()

    ddim = [error(DDIMSampler(n, timestep_spacing="linspace")) for n in (25, 50, 100)]
    assert ddim[2] < 0.012 and 0.45 < ddim[1] / ddim[0] < 0.55 and 0.45 < ddim[2] / ddim[1] < 0.55, ddim
    assert error(EulerSampler(50)) == pytest.approx(
        ddim[1], rel=0.01
    )  # the same steps (from sigma 4096, not inf)
    heun = [error(HeunSampler(n)) for n in (25, 50)]
    assert heun[1] < ddim[2] and heun[1] < heun[0] / 4, heun
    assert error(DPMSolverPP2MSampler(50)) < ddim[1] / 4


# ---------------------------------------------------------------- end to end: train, sample, export


@pytest.fixture(scope="module")
def flow_run(synthetic_shards, vae_ckpt, tmp_path_factory):
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        "diffusion=rectified_flow",
        "diffusion.schedule_shift=2.0",
        "sampler=euler",
        "sampler.num_steps=3",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=4",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.sample_grid.guidance_interval=[0.5,20]",
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("flow")),
    )
    return train(cfg)


def test_stage2_trains_a_rectified_flow_and_its_checkpoint_rebuilds_it(flow_run):
    from ldm.inference import TextToImage

    assert flow_run["global_step"] == 4
    assert flow_run["metrics"]["data/captions_truncated_frac"] == 0.0  # short synthetic captions
    pipe, bundle = TextToImage.from_checkpoint(flow_run["checkpoint"])
    assert isinstance(pipe.diffusion, RectifiedFlow) and pipe.diffusion.schedule_shift == 2.0
    assert bundle["diffusion"]["schedule"] == "rectified_flow"
    run_dir = Path(flow_run["run_dir"])
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert len(grids) >= 2  # the grid callback sampled it twice, guided in a band
    assert read_png_metadata(grids[-1])["guidance_interval"] == [0.5, 20.0]
    images = pipe(
        ["a red circle on a blue background"] * 2, EulerSampler(3), guidance_scale=2.0, seeds=[0, 1]
    )
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_grid_that_starts_below_pure_noise_is_warned_about():
    from ldm.sampling import late_start_warning

    flow, plain = RectifiedFlow(), GaussianDiffusion()
    ztsnr = GaussianDiffusion(schedule="cosine", prediction="v", zero_terminal_snr=True)
    leading = DDIMSampler(50)  # starts at t = 980
    assert "starts at t = 980" in late_start_warning(flow, leading)
    assert "starts at t = 980" in late_start_warning(ztsnr, leading)
    assert late_start_warning(plain, leading) is None  # SD's schedule: t = 999 is not pure noise either
    for fine in (DDIMSampler(50, timestep_spacing="trailing"), DDPMSampler(), EulerSampler(10)):
        assert late_start_warning(flow, fine) is None
    # the training run's sample-grid callback says so at the start, too
    from types import SimpleNamespace

    from ldm.training.callbacks import SampleGridCallback

    with pytest.warns(UserWarning, match="sample grids: DDIMSampler starts at t = 980"):
        SampleGridCallback(["a cat"], leading).on_fit_start(None, SimpleNamespace(diffusion=flow))


def test_sample_cli_on_a_rectified_flow_checkpoint(flow_run, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"ckpt={flow_run['checkpoint']}",
            "prompts=[a green square on a white background]",
            f"out_dir={out}",
            "sampler.num_steps=3",  # sample.yaml's DDIM, "leading": starts at t = 666
            "num_per_prompt=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "images").glob("*.png"))) == 2 and (out / "grid.png").exists()
    assert "warning: DDIMSampler starts at t = 666" in proc.stdout and "sampler=euler" in proc.stdout


def test_export_writes_diffusers_flow_match_scheduler_that_samples_like_ours(flow_run, tmp_path):
    """The diffusers folder holds FlowMatchEulerDiscreteScheduler with the run's shift: its Euler loop over the
    exported UNet ends where our DDIM (trailing) over ours does. The SD single file refuses rectified flow."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from ldm.export import ExportedParts, export

    ckpt = flow_run["checkpoint"]
    with pytest.raises(ValueError, match="rectified flow has no CompVis form"):
        export(ckpt, tmp_path / "m.safetensors", format="sd")
    summary = export(ckpt, tmp_path / "m")
    assert any("FlowMatchEulerDiscreteScheduler" in note for note in summary["notes"])
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "m" / "scheduler")
    assert scheduler.config.shift == 2.0
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").eval()
    parts = ExportedParts(ckpt)

    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 8, parts.unet.context_dim, generator=g)
    pooled = torch.randn(2, parts.unet.pooled_proj.in_features, generator=g)
    x_T = torch.randn(2, parts.unet.out_channels, 8, 8, generator=g)
    sampler = DDIMSampler(4, timestep_spacing="trailing")
    with torch.no_grad():
        ours = sampler(lambda x, t: parts.unet(x, t, context, pooled=pooled), parts.diffusion, x_T)
        scheduler.set_timesteps(sigmas=[(t + 1) / T for t in sampler.timesteps(T)])
        x = x_T.clone()
        for t in scheduler.timesteps:
            v = unet(x, t, encoder_hidden_states=context, class_labels=pooled).sample
            x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)
