"""Drop-in pipelines: disabled == parent output; inheritance, step skipping and teleport take effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DiTPipeline,
    PixArtAlphaPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from mmskip.diffusion import FeatureInheritanceConfig, GaussianStats, GaussianTeleportConfig, StepSkipConfig
from mmskip.diffusion.testing import tiny_pipeline_components
from mmskip.pipelines import (
    SkipDiTPipeline,
    SkipPixArtAlphaPipeline,
    SkipStableDiffusion3Pipeline,
    SkipStableDiffusionPipeline,
    SkipStableDiffusionXLPipeline,
)

from mmskip.schedules import interval

PAIRS = {
    "sd": (StableDiffusionPipeline, SkipStableDiffusionPipeline),
    "sdxl": (StableDiffusionXLPipeline, SkipStableDiffusionXLPipeline),
    "dit": (DiTPipeline, SkipDiTPipeline),
    "pixart": (PixArtAlphaPipeline, SkipPixArtAlphaPipeline),
    "sd3": (StableDiffusion3Pipeline, SkipStableDiffusion3Pipeline),
}


def _call(pipe, kw, seed=0):
    return torch.as_tensor(np.asarray(pipe(generator=torch.Generator().manual_seed(seed), **kw)[0]))


def _pipes(kind):
    comps, kw = tiny_pipeline_components(kind)
    parent_cls, skip_cls = PAIRS[kind]
    parent, skip = parent_cls(**comps), skip_cls(**comps)
    for p in (parent, skip):
        p.set_progress_bar_config(disable=True)
    return parent, skip, kw


def _count_denoiser_calls(pipe):
    model = getattr(pipe, "unet", None) or pipe.transformer
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, h


@pytest.mark.parametrize("kind", list(PAIRS))
def test_disabled_equals_parent_and_inheritance_skips(kind):
    parent, skip, kw = _pipes(kind)
    ref = _call(parent, kw)
    assert torch.equal(_call(skip, kw), ref)
    skip.enable_skip(FeatureInheritanceConfig(schedule=interval(2)))
    fast = _call(skip, kw)
    stats = skip.skip_stats()
    assert stats["recomputed_steps"] == [0, 2, 4] and stats["inherited_steps"] == 3
    assert stats["flops_fraction"] < 0.85
    assert fast.shape == ref.shape and not torch.equal(fast, ref)
    skip.disable_skip()
    assert torch.equal(_call(skip, kw), ref)
    assert not skip.skip_enabled


def test_step_skip_and_teleport_in_pipeline(tmp_path):
    parent, skip, kw = _pipes("sd")
    ref = _call(parent, kw)
    skip.enable_skip(StepSkipConfig(schedule=interval(2)))
    calls, h = _count_denoiser_calls(skip)
    out = _call(skip, kw)
    assert len(calls) == 3 and skip.skip_stats()["visited_steps"] == [0, 2, 4]
    assert out.shape == ref.shape and not torch.equal(out, ref)
    # teleport over half of the steps, stats of the (random) latent distribution cached in a file
    stats = GaussianStats.fit(torch.randn(64, 4, 8, 8), rank=8)
    path = tmp_path / "latents.pt"
    stats.save(path)
    skip.enable_skip([GaussianTeleportConfig(stats_path=str(path), skip_fraction=0.5), FeatureInheritanceConfig()])
    calls.clear()
    out = _call(skip, kw)
    h.remove()
    assert len(calls) == 3 and skip.skip_stats()["visited_steps"] == [3, 4, 5]
    assert torch.isfinite(out).all()
    assert "set_timesteps" not in skip.scheduler.__dict__  # the pipeline's scheduler was not modified
    skip.disable_skip()
    assert torch.equal(_call(skip, kw), ref)


def test_flow_matching_teleport_and_skip():
    parent, skip, kw = _pipes("sd3")
    stats = GaussianStats.fit(torch.randn(32, 4, 8, 8) * 0.5, rank=4)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        stats.save(f"{d}/s.pt")
        skip.enable_skip([GaussianTeleportConfig(stats_path=f"{d}/s.pt", skip_fraction=0.34), StepSkipConfig(interval(2))])
        out = _call(skip, kw)
    assert skip.skip_stats()["visited_steps"] == [2, 4]
    assert torch.isfinite(out).all()


def test_from_pretrained_with_skip_config(tmp_path):
    parent, _, kw = _pipes("dit")
    parent.save_pretrained(tmp_path)
    cfg = FeatureInheritanceConfig(schedule=interval(3), granularity="unit")
    pipe = SkipDiTPipeline.from_pretrained(tmp_path, skip_config=cfg)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, DiTPipeline) and pipe.skip_handle.config == cfg
    _call(pipe, kw)
    assert pipe.skip_stats()["recomputed_steps"] == [0, 3]


def test_bad_inputs():
    _, skip, kw = _pipes("dit")
    with pytest.raises(TypeError, match="enable_skip"):
        skip.enable_skip("fast please")
    with pytest.raises(ValueError, match="two StepSkipConfig"):
        skip.enable_skip([StepSkipConfig(), StepSkipConfig()])
    skip.scheduler = PNDMScheduler.from_config(skip.scheduler.config)
    skip.enable_skip(StepSkipConfig())
    with pytest.raises(ValueError, match="DDIM, Euler and DPM-Solver"):
        _call(skip, kw)


def test_num_images_per_prompt_and_nothing_to_skip_is_exact():
    parent, skip, kw = _pipes("sd")
    kw = dict(kw, num_images_per_prompt=2)
    ref = _call(parent, kw)
    assert ref.shape[0] == 4
    skip.enable_skip(FeatureInheritanceConfig(schedule=interval(1)))  # recompute every step
    assert torch.equal(_call(skip, kw), ref)
    skip.enable_skip(FeatureInheritanceConfig(schedule=interval(2), granularity="layer"))
    out = _call(skip, kw)
    assert out.shape == ref.shape and skip.skip_stats()["recomputed_steps"] == [0, 2, 4]
