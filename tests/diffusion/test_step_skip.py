"""Step skipping: the planned sampler visits only the kept steps, with the supported samplers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from mmskip.diffusion.sampler import plan_sampler
from mmskip.diffusion.step_skip import StepSkipConfig

from mmskip.inject import SkipConfig
from mmskip.schedules import adaptive, explicit, interval

KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)


def _model(x, t):  # a smooth, deterministic stand-in for a denoiser
    return 0.3 * x + 0.001 * float(t)


def _sample(sched, n, noise):
    sched.set_timesteps(n)
    lat, calls = noise * sched.init_noise_sigma, 0
    for t in sched.timesteps:
        inp = sched.scale_model_input(lat, t)
        lat = sched.step(_model(inp, t), t, lat).prev_sample
        calls += 1
    return lat, calls


def test_ddim_grid_with_gaps_runs_ddim_exactly():
    """Keeping every step on the DPM-Solver++(1) path reproduces DDIM itself (they are the same method)."""
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ddim = DDIMScheduler(**KW, clip_sample=False, set_alpha_to_one=False)
    ref, _ = _sample(DDIMScheduler.from_config(ddim.config), 20, noise)
    keep_all = list(range(20))
    from mmskip.diffusion.sampler import _ddim_as_dpm

    same, _ = _sample(_ddim_as_dpm(ddim, 20, keep_all, None), 20, noise)
    torch.testing.assert_close(same, ref, rtol=1e-4, atol=1e-4)
    half, calls = _sample(plan_sampler(ddim, 20, StepSkipConfig(schedule=interval(2)).keep(20)), 20, noise)
    assert calls == 10
    assert (half - ref).abs().max() < 0.2 * ref.abs().max()


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_subset_of_sigma_grid(cls):
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    base = cls(**KW)
    keep = StepSkipConfig(schedule=explicit(keep=[0, 1, 2, 5, 9, 14, 19], num=20)).keep(20)
    planned = plan_sampler(base, 20, keep)
    _, calls = _sample(planned, 20, noise)
    assert calls == len(keep) == 7
    full = cls.from_config(base.config)
    full.set_timesteps(20)
    torch.testing.assert_close(planned.timesteps, full.timesteps[list(keep)])
    assert torch.equal(planned.sigmas[:-1], full.sigmas[list(keep)]) and planned.sigmas[-1] == full.sigmas[-1]
    # the pipeline's own scheduler is untouched
    assert "set_timesteps" not in base.__dict__


def test_refusals():
    with pytest.raises(ValueError, match="DDIM, Euler and DPM-Solver"):
        plan_sampler(PNDMScheduler(), 10, [0, 2, 4])
    with pytest.raises(ValueError, match="static schedule"):
        StepSkipConfig(schedule=adaptive(0.1, "relative_change"))
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        StepSkipConfig(schedule=interval(0))
    with pytest.raises(ValueError, match="planned for 10 steps"):
        plan_sampler(EulerDiscreteScheduler(), 10, [0, 5]).set_timesteps(20)
    with pytest.raises(TypeError, match="enable_skip"):
        from mmskip.inject import apply

        from ._tiny import tiny_dit

        apply(tiny_dit(), StepSkipConfig())
    cfg = StepSkipConfig(schedule=interval(3, offset=2))
    assert SkipConfig.from_dict(cfg.to_json()) == cfg
    assert cfg.keep(8) == [0, 1, 2, 5]
