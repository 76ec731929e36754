"""Fault tests: a KeyboardInterrupt inside a denoiser forward, mid pipeline call, leaves nothing behind.

For every diffusion technique (feature inheritance, step skipping, the Gaussian teleport, UNet
switching): the next call equals a fresh pipeline's output, ``disable_skip()`` gives the plain
parent's output exactly, and no hook, scheduler or patched method is left on the pipeline.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from mmskip.diffusion import (
    FeatureInheritanceConfig,
    GaussianStats,
    GaussianTeleportConfig,
    StepSkipConfig,
    UNetSwitchConfig,
)
from mmskip.diffusion.assembly import assemble_unet, save_assembled
from mmskip.pipelines import SkipStableDiffusionPipeline

import mmskip
from mmskip.schedules import interval

from ..diffusion._tiny import tiny_pipeline_components


def _img(pipe, kw):
    return pipe(generator=torch.Generator().manual_seed(0), **kw).images


def _hooks(module):
    return {n for m in module.modules() if getattr(m, "_diffusers_hook", None) for n in m._diffusers_hook.hooks}


def _skip_pipe():
    comps, kw = tiny_pipeline_components("sd")
    pipe = SkipStableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


class InterruptAt:
    """Raises KeyboardInterrupt in ``module``'s ``nth`` forward (a torch forward pre-hook)."""

    def __init__(self, module, nth):
        self.nth, self.calls = nth, 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.nth:
            raise KeyboardInterrupt


def _configs(kind, tmp_path, unet):
    if kind == "inheritance":
        return [FeatureInheritanceConfig(interval(2))]
    if kind == "inheritance+steps":
        return [FeatureInheritanceConfig(interval(2), granularity="unit"), StepSkipConfig(interval(2, offset=1))]
    if kind == "step_skip":
        return [StepSkipConfig(interval(2))]
    if kind == "teleport":
        stats = GaussianStats.fit(torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(5)), rank=6)
        return [GaussianTeleportConfig(str(stats.save(tmp_path / "stats.safetensors")), 0.34)]
    if kind == "unet_switch":
        save_assembled(assemble_unet(unet, ["mid", "up_attn.1"]), tmp_path / "light")
        return [FeatureInheritanceConfig(interval(2)), UNetSwitchConfig(light=str(tmp_path / "light"))]
    raise AssertionError(kind)


KINDS = ["inheritance", "inheritance+steps", "step_skip", "teleport", "unet_switch"]


@pytest.mark.parametrize("where", ["denoiser", "block"])
@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_mid_call_leaves_the_next_call_exact(kind, where, tmp_path):
    pipe, kw = _skip_pipe()
    plain = _img(pipe, kw)
    configs = _configs(kind, tmp_path, pipe.unet)
    fresh, _ = _skip_pipe()
    fresh.enable_skip(configs)
    expected = _img(fresh, kw)
    assert not torch.equal(expected, plain)

    pipe.enable_skip(configs)
    scheduler, unet = pipe.scheduler, pipe.unet
    # the third denoiser call, or the UNet's first up block within it (a computing step's target)
    module = unet if where == "denoiser" else unet.up_blocks[0]
    trap = InterruptAt(module, nth=3)
    with pytest.raises(KeyboardInterrupt):
        _img(pipe, kw)
    trap.handle.remove()
    assert trap.calls == 3
    assert not _hooks(unet) and pipe.scheduler is scheduler
    assert not {"get_timesteps", "prepare_latents"} & set(vars(pipe))  # no per-call patches left
    assert torch.equal(_img(pipe, kw), expected)
    assert pipe.skip_stats() == fresh.skip_stats()
    pipe.disable_skip()
    assert torch.equal(_img(pipe, kw), plain) and not _hooks(unet)


def test_interrupt_under_mmskip_apply_then_remove_is_exact():
    """The same with the technique applied to a plain pipeline's UNet by hand (no drop-in)."""
    comps, kw = tiny_pipeline_components("sd")
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    plain = _img(pipe, kw)
    cfg = FeatureInheritanceConfig(interval(2))
    fresh_comps, _ = tiny_pipeline_components("sd")
    fresh = StableDiffusionPipeline(**fresh_comps)
    fresh.set_progress_bar_config(disable=True)
    with mmskip.applied(fresh.unet, cfg):
        expected = _img(fresh, kw)
    handle = mmskip.apply(pipe.unet, cfg)
    trap = InterruptAt(pipe.unet.up_blocks[0], nth=3)
    with pytest.raises(KeyboardInterrupt):
        _img(pipe, kw)
    trap.handle.remove()
    assert torch.equal(_img(pipe, kw), expected)  # the next trajectory starts afresh
    handle.remove()
    assert torch.equal(_img(pipe, kw), plain) and not _hooks(pipe.unet)
