"""Drop-in pipelines: disabled == parent output; inheritance, step skipping and teleport take effect."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DiTPipeline,
    PixArtAlphaPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from mmskip.diffusion import (
    FeatureInheritanceConfig,
    GaussianStats,
    GaussianTeleportConfig,
    SamplerConfig,
    SamplerPlan,
    StepSkipConfig,
    nonuniform,
)
from mmskip.diffusion.gaussian_teleport import teleport_step
from mmskip.diffusion.sampler import plan_sampler
from mmskip.pipelines import (
    SKIP_CONFIG_NAME,
    SkipDiTPipeline,
    SkipPixArtAlphaPipeline,
    SkipStableDiffusion3Pipeline,
    SkipStableDiffusionPipeline,
    SkipStableDiffusionXLPipeline,
)

from mmskip.inject import _CONFIGS, ConcurrentUseError, applied
from mmskip.schedules import explicit, interval

from .._ops import op_counts
from ..diffusion._tiny import tiny_pipeline_components

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


def _stats_file(tmp_path, scale=1.0, name="latents.safetensors"):
    stats = GaussianStats.fit(torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * scale, rank=8)
    return str(stats.save(tmp_path / name)), stats


@pytest.mark.parametrize("kind", list(PAIRS))
def test_disabled_equals_parent_and_inheritance_equals_standalone(kind):
    parent, skip, kw = _pipes(kind)
    ref = _call(parent, kw)
    assert torch.equal(_call(skip, kw), ref)
    cfg = FeatureInheritanceConfig(schedule=interval(2))
    skip.enable_skip(cfg)
    fast = _call(skip, kw)
    stats = skip.skip_stats()
    assert stats["recomputed_steps"] == [0, 2, 4] and stats["inherited_steps"] == 3
    assert stats["flops_fraction"] < 0.85
    skip.disable_skip()
    assert torch.equal(_call(skip, kw), ref)
    assert not skip.skip_enabled
    # reference: the same config applied to the parent's denoiser with mmskip.apply (no drop-in)
    with applied(getattr(parent, "unet", None) or parent.transformer, cfg):
        assert torch.equal(_call(parent, kw), fast)
    assert not torch.equal(fast, ref)


def _teleport_reference(parent, kw, stats, start, keep, n, seed=0):
    """What teleport + planned sampler must give: the parent run from hand-teleported latents."""
    planned = plan_sampler(parent.scheduler, n, keep)
    planned.set_timesteps(n)
    batch = kw["prompt_embeds"].shape[0] * kw.get("num_images_per_prompt", 1)
    model = getattr(parent, "unet", None) or parent.transformer
    shape = (batch, model.config.in_channels, 8, 8)
    noise = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    sigma = float(getattr(planned, "init_noise_sigma", 1.0))
    latents = teleport_step(stats, start)(noise * sigma, planned)
    original = parent.scheduler
    parent.scheduler = plan_sampler(original, n, keep)
    try:
        if type(parent).__name__.startswith("StableDiffusion3"):
            return _call(parent, dict(kw, latents=latents), seed)
        return _call(parent, dict(kw, latents=latents / sigma), seed)
    finally:
        parent.scheduler = original


def test_step_skip_and_teleport_in_pipeline(tmp_path):
    parent, skip, kw = _pipes("sd")
    ref = _call(parent, kw)
    skip.enable_skip(StepSkipConfig(schedule=interval(2)))
    calls, h = _count_denoiser_calls(skip)
    out = _call(skip, kw)
    assert len(calls) == 3 and skip.skip_stats()["visited_steps"] == [0, 2, 4]
    parent.scheduler = plan_sampler(skip.scheduler, 6, [0, 2, 4])
    assert torch.equal(_call(parent, kw), out)  # reference: the parent on the planned sampler
    parent.scheduler = skip.scheduler
    path, stats = _stats_file(tmp_path)
    skip.enable_skip(GaussianTeleportConfig(stats_path=path, skip_fraction=0.5))
    calls.clear()
    out = _call(skip, kw)
    h.remove()
    assert len(calls) == 3 and skip.skip_stats()["visited_steps"] == [3, 4, 5]
    torch.testing.assert_close(out, _teleport_reference(parent, kw, stats, 3, [3, 4, 5], 6), rtol=1e-5, atol=1e-5)
    assert "set_timesteps" not in skip.scheduler.__dict__  # the pipeline's scheduler was not modified
    skip.disable_skip()
    assert torch.equal(_call(skip, kw), ref)


def test_flow_matching_teleport_and_skip(tmp_path):
    parent, skip, kw = _pipes("sd3")
    path, stats = _stats_file(tmp_path, scale=0.5)
    skip.enable_skip([GaussianTeleportConfig(stats_path=path, skip_fraction=0.34), StepSkipConfig(interval(2))])
    out = _call(skip, kw)
    assert skip.skip_stats()["visited_steps"] == [2, 4]
    torch.testing.assert_close(out, _teleport_reference(parent, kw, stats, 2, [2, 4], 6), rtol=1e-5, atol=1e-5)


def test_schedules_index_the_pipeline_grid_when_steps_are_skipped(tmp_path):
    """The README's combinations: inheritance schedules over num_inference_steps, whatever the sampler visits."""
    _, skip, kw = _pipes("sd")
    kw = dict(kw, num_inference_steps=10)
    path, _ = _stats_file(tmp_path)
    fi = FeatureInheritanceConfig(nonuniform(10, 4))  # recomputes grid steps 0, 1, 4, 9
    assert fi.schedule.keep() == (0, 1, 4, 9)
    skip.enable_skip([fi, GaussianTeleportConfig(path, 0.2)])
    _call(skip, kw)
    st = skip.skip_stats()
    assert st["visited_steps"] == list(range(2, 10))
    assert st["recomputed_steps"] == [2, 4, 9]  # 2: the first visited step has nothing to inherit
    skip.enable_skip([fi, StepSkipConfig(interval(2))])
    _call(skip, kw)
    st = skip.skip_stats()
    assert st["visited_steps"] == [0, 2, 4, 6, 8] and st["recomputed_steps"] == [0, 4]
    with pytest.raises(ValueError, match="num_inference_steps=6"):
        _call(skip, dict(kw, num_inference_steps=6))  # a 10-step schedule on a 6-step grid


def test_save_pretrained_keeps_parent_class_and_skip_configs(tmp_path):
    _, skip, kw = _pipes("dit")
    configs = [FeatureInheritanceConfig(interval(3), granularity="unit"), StepSkipConfig(explicit(keep=[0, 1, 3, 5]))]
    skip.enable_skip(configs)
    out = _call(skip, kw)
    skip.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert (tmp_path / SKIP_CONFIG_NAME).is_file()
    plain = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(plain) is DiTPipeline
    again = SkipDiTPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.skip_configs == tuple(configs)
    assert torch.equal(_call(again, kw), out)
    assert again.skip_stats()["recomputed_steps"] == [0, 3] and again.skip_stats()["visited_steps"] == [0, 1, 3, 5]
    override = SkipDiTPipeline.from_pretrained(tmp_path, skip_config=StepSkipConfig())
    assert override.skip_configs == (StepSkipConfig(),)
    skip.disable_skip()
    skip.save_pretrained(tmp_path)  # disabled: the stale config file is removed
    assert not (tmp_path / SKIP_CONFIG_NAME).exists()


def test_enable_skip_is_atomic_and_validates_before_the_call(tmp_path):
    _, skip, kw = _pipes("dit")
    cfg = FeatureInheritanceConfig(schedule=interval(2))
    skip.enable_skip(cfg)
    ref = _call(skip, kw)
    bad = [
        ("fast please", TypeError, "enable_skip"),
        ([StepSkipConfig(), StepSkipConfig()], ValueError, "two StepSkipConfig"),
        (FeatureInheritanceConfig(targets=("transformer_blocks.9",)), ValueError, "no module"),
        (GaussianTeleportConfig(str(tmp_path / "missing.safetensors")), FileNotFoundError, "no stats file"),
    ]
    for config, err, match in bad:
        with pytest.raises(err, match=match):
            skip.enable_skip(config)
        assert skip.skip_configs == (cfg,)
        assert not any(hasattr(m, "_diffusers_hook") for m in skip.transformer.modules())  # clean between calls
        assert torch.equal(_call(skip, kw), ref)
    with pytest.raises(ValueError, match="out of range"):
        StepSkipConfig(explicit(keep=[0, 99], num=50))
    skip.enable_skip(StepSkipConfig(explicit(keep=[0, 99])))  # the step count is known at call time only
    calls, h = _count_denoiser_calls(skip)
    scheduler = skip.scheduler
    with pytest.raises(ValueError, match="num_inference_steps=6"):
        _call(skip, kw)
    h.remove()
    assert not calls and skip.scheduler is scheduler  # refused before anything ran or changed


def test_bad_inputs():
    _, skip, kw = _pipes("dit")
    skip.scheduler = PNDMScheduler.from_config(skip.scheduler.config)
    skip.enable_skip(StepSkipConfig())
    with pytest.raises(ValueError, match="DDIM, Euler and DPM-Solver"):
        _call(skip, kw)
    _, sd, kw = _pipes("sd")
    sd.enable_skip(StepSkipConfig())
    with pytest.raises(ValueError, match="custom timesteps"):
        _call(sd, dict(kw, timesteps=[900, 500]))


def test_a_new_sampler_technique_needs_no_pipeline_code():
    class LastHalf(SamplerConfig):
        """Run only the second half of the grid (a test technique).

        Args:
            none: nothing.
        """

        technique = "test_last_half"

        def plan(self, scheduler, plan):
            return SamplerPlan(plan.num_steps, tuple(k for k in plan.keep if k >= plan.num_steps // 2))

    try:
        _, skip, kw = _pipes("dit")
        skip.enable_skip(LastHalf())
        calls, h = _count_denoiser_calls(skip)
        _call(skip, kw)
        h.remove()
        assert len(calls) == 3 and skip.skip_stats()["visited_steps"] == [3, 4, 5]
    finally:
        _CONFIGS.pop(LastHalf.technique)  # registered by subclassing; keep the registry as it was


def test_concurrent_pipeline_calls_are_refused():
    import threading

    _, skip, kw = _pipes("dit")
    skip.enable_skip(StepSkipConfig())
    entered, release = threading.Event(), threading.Event()

    def block(*_):
        entered.set()
        release.wait(10)

    h = skip.transformer.register_forward_pre_hook(block)
    t = threading.Thread(target=_call, args=(skip, kw))
    t.start()
    assert entered.wait(10)
    try:
        with pytest.raises(ConcurrentUseError):
            _call(skip, kw)
    finally:
        release.set()
        t.join()
        h.remove()


def test_num_images_per_prompt_and_nothing_to_skip_is_exact():
    parent, skip, kw = _pipes("sd")
    kw = dict(kw, num_images_per_prompt=2)
    ref = _call(parent, kw)
    assert ref.shape[0] == 4
    skip.enable_skip(FeatureInheritanceConfig(schedule=interval(1)))  # recompute every step
    assert torch.equal(_call(skip, kw), ref)
    cfg = FeatureInheritanceConfig(schedule=interval(2), granularity="layer")
    skip.enable_skip(cfg)
    out = _call(skip, kw)
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]
    skip.disable_skip()
    with applied(parent.unet, cfg):
        assert torch.equal(_call(parent, kw), out)


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_nothing_to_skip_runs_the_parent_ops(kind):
    """A step plan that keeps every step runs exactly the parent pipeline's ops; inheritance that
    recomputes every step adds only the timestep read per denoiser call. The drop-in's own
    per-call bookkeeping reads the parent's signature once per class, not per call."""
    from mmskip.pipelines import mixin

    parent, skip, kw = _pipes(kind)
    steps = kw["num_inference_steps"]
    ref, plain = op_counts(lambda: _call(parent, kw))
    skip.enable_skip(StepSkipConfig(schedule=interval(1)))
    _call(skip, kw)
    read = mixin._call_signature.cache_info().misses
    out, zero = op_counts(lambda: _call(skip, kw))
    assert torch.equal(out, ref) and zero == plain and mixin._call_signature.cache_info().misses == read
    skip.enable_skip(FeatureInheritanceConfig(schedule=interval(1), measure_flops=False))
    out, zero = op_counts(lambda: _call(skip, kw))
    assert torch.equal(out, ref) and plain - zero == Counter()
    assert set(zero - plain) <= {"select", "view", "_local_scalar_dense"}
    assert sum((zero - plain).values()) <= 3 * steps
