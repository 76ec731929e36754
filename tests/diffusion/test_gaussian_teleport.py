"""The analytic Gaussian solution (Wang & Vastola, 2023) against numerical probability-flow ODEs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from mmskip.diffusion.gaussian_teleport import GaussianStats, GaussianTeleportConfig, teleport, teleport_step
from mmskip.diffusion.sampler import plan_sampler
from scipy.integrate import solve_ivp


def _gaussian(d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


def _denoise(y: np.ndarray, sigma: float, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return mean + cov @ np.linalg.solve(cov + sigma**2 * np.eye(len(mean)), y - mean)


def test_closed_form_matches_fine_ode_solution():
    mean, cov = _gaussian()
    m, c = mean.numpy(), cov.numpy()
    stats = GaussianStats.exact(mean, cov)
    y0 = (torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80.0).numpy()
    for s0, s1 in ((80.0, 2.0), (80.0, 0.3), (5.0, 0.05)):
        for b in range(3):
            sol = solve_ivp(
                lambda s, y: (y - _denoise(y, s, m, c)) / s, (s0, s1), y0[b], rtol=1e-11, atol=1e-12, method="DOP853"
            )
            ours = teleport(torch.from_numpy(y0[b : b + 1]), stats, s0, s1).double().numpy()[0]
            np.testing.assert_allclose(ours, sol.y[:, -1], rtol=2e-5, atol=2e-5)


def test_limit_from_pure_noise_and_fit_recovers_stats():
    mean, cov = _gaussian()
    stats = GaussianStats.exact(mean, cov)
    eps = torch.randn(2, 6, dtype=torch.float64)
    far = teleport(eps * 1e6, stats, 1e6, 1.0)
    lim = teleport(eps, stats, math.inf, 1.0)
    torch.testing.assert_close(far, lim, rtol=1e-5, atol=1e-5)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((20000,))
    fit = GaussianStats.fit(x, rank=6)
    torch.testing.assert_close(fit.mean.double(), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(fit.variances.double(), stats.variances.double(), rtol=0.06, atol=0.01)


class _ExactEps(torch.nn.Module):
    """The exact epsilon-prediction for Gaussian data at DDPM timestep t (input in VP form)."""

    def __init__(self, mean, cov, alphas_cumprod):
        super().__init__()
        self.mean, self.cov, self.ac = mean, cov, alphas_cumprod.double()

    def forward(self, x, t):
        a = float(self.ac[int(round(float(t)))])
        y = x.double() / math.sqrt(a)
        s = math.sqrt((1 - a) / a)
        d = self.mean + (y - self.mean) @ torch.linalg.solve(self.cov + s**2 * torch.eye(len(self.mean), dtype=torch.float64), self.cov).T
        return ((y - d) / s).to(x.dtype)


def _sample(sched, model, n, noise):
    sched.set_timesteps(n)
    lat = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(lat, t)
        lat = sched.step(model(inp, t), t, lat).prev_sample
    return lat


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_teleport_then_sampler_matches_full_sampler(cls):
    """Gaussian data, exact denoiser: teleport over 30 % of the steps lands where the full sampler goes."""
    mean, cov = _gaussian()
    stats = GaussianStats.exact(mean, cov)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)
    if cls is DDIMScheduler:
        kw["clip_sample"] = False
    base = cls(**kw)
    model = _ExactEps(mean, cov, base.alphas_cumprod)
    noise = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    n = 100
    full = _sample(cls(**kw), model, n, noise)
    start = GaussianTeleportConfig(stats_path="x", skip_fraction=0.3).start(n)
    planned = plan_sampler(cls(**kw), n, range(start, n), teleport_step(stats, start))
    fast = _sample(planned, model, n, noise)
    assert len(planned.timesteps) == n - start
    err = (fast - full).abs().max() / full.abs().max()
    assert err < 2e-2, float(err)
    # and a run that starts late *without* teleport is far off
    plain = plan_sampler(cls(**kw), n, range(start, n))
    late = _sample(plain, model, n, noise)
    assert (late - full).abs().max() / full.abs().max() > 5 * err


def test_stats_round_trip_as_safetensors_and_legacy_files(tmp_path, caplog):
    import json

    from safetensors import safe_open

    stats = GaussianStats.fit(torch.randn(40, 2, 3, 3, generator=torch.Generator().manual_seed(0)), rank=5)
    path = stats.save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["mmskip"])["shape"] == [2, 3, 3]
    back = GaussianStats.load(path)
    for k in ("mean", "components", "variances"):
        assert torch.equal(getattr(back, k), getattr(stats, k))
    assert back.residual == stats.residual and back.shape == stats.shape
    with pytest.raises(ValueError, match="safetensors"):
        stats.save(tmp_path / "s.pt")
    legacy = tmp_path / "old.pt"
    torch.save({"mean": stats.mean, "components": stats.components, "variances": stats.variances,
                "residual": stats.residual, "shape": list(stats.shape)}, legacy)
    with caplog.at_level("WARNING", logger="mmskip.diffusion.gaussian_teleport"):
        assert torch.equal(GaussianStats.load(legacy).mean, stats.mean)
    assert "legacy" in caplog.text


def test_from_folder_reads_the_channels_the_vae_takes(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(tmp_path / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    stats = GaussianStats.from_folder(tmp_path, 16, vae=vae, rank=4)
    assert stats.shape == (4, 8, 8)
    pixels = GaussianStats.from_folder(tmp_path, 16, rank=4, channels=1)
    ref = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / f"{i}.png"))) for i in range(6)])
    torch.testing.assert_close(pixels.mean.reshape(1, 16, 16), (ref.double() / 127.5 - 1).mean(0, keepdim=True).float())
    assert GaussianStats.from_folder(tmp_path, 16, rank=4).shape == (3, 16, 16)  # no VAE: RGB by default


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fit_refuses_non_finite_samples(bad):
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    x[5, 1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"1 of 8 samples hold NaN or inf values \(e.g. sample 5\)"):
        GaussianStats.fit(x, rank=4)
