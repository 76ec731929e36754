"""The Skip pipelines are drop-ins: the parent's signature, and pipelines that share a denoiser
compute what their own settings say (issue: diffusers' own pipeline tests on the drop-ins)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DiTPipeline, EulerDiscreteScheduler, StableDiffusionPipeline
from mmskip.diffusion import FeatureInheritanceConfig
from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

from mmskip.inject import applied
from mmskip.schedules import interval

from ..diffusion._tiny import tiny_pipeline_components
from .test_skip_pipelines import PAIRS


def _call(pipe, kw, seed=0):
    return torch.as_tensor(np.asarray(pipe(generator=torch.Generator().manual_seed(seed), **kw)[0]))


def _hooked(module) -> bool:
    return any(hasattr(m, "_diffusers_hook") for m in module.modules())


@pytest.mark.parametrize("kind", list(PAIRS))
def test_call_signature_and_docstring_are_the_parents(kind):
    parent, skip = PAIRS[kind]
    assert inspect.signature(skip.__call__) == inspect.signature(parent.__call__)
    assert skip.__call__.__doc__ == parent.__call__.__doc__


def test_pipelines_sharing_a_denoiser_each_do_what_they_say():
    comps, kw = tiny_pipeline_components("dit")
    fast = SkipDiTPipeline(**comps)
    fast.enable_skip(FeatureInheritanceConfig(schedule=interval(2)))
    plain, disabled = DiTPipeline(**comps), SkipDiTPipeline(**fast.components)
    other = SkipDiTPipeline(**comps)
    other.enable_skip(FeatureInheritanceConfig(schedule=interval(3)))  # a second technique on the same denoiser
    for p in (fast, plain, disabled, other):
        p.set_progress_bar_config(disable=True)
    ref = _call(plain, kw)
    with applied(comps["transformer"], FeatureInheritanceConfig(schedule=interval(2))):
        want_fast = _call(plain, kw)
    with applied(comps["transformer"], FeatureInheritanceConfig(schedule=interval(3))):
        want_other = _call(plain, kw)
    assert not torch.equal(ref, want_fast)
    for _ in range(2):  # interleaved calls: nothing leaks from one pipeline into another
        assert torch.equal(_call(fast, kw), want_fast)
        assert not _hooked(comps["transformer"])
        assert torch.equal(_call(disabled, kw), ref) and not disabled.skip_enabled
        assert torch.equal(_call(plain, kw), ref)
        assert torch.equal(_call(other, kw), want_other)
    assert fast.skip_stats()["inherited_steps"] == 3 and other.skip_stats()["inherited_steps"] == 4


def test_from_pipe_both_ways():
    comps, kw = tiny_pipeline_components("dit")
    plain = DiTPipeline(**comps)
    plain.set_progress_bar_config(disable=True)
    ref = _call(plain, kw)
    fast = SkipDiTPipeline.from_pipe(plain)
    assert isinstance(fast, SkipDiTPipeline) and not fast.skip_enabled
    fast.set_progress_bar_config(disable=True)
    assert torch.equal(_call(fast, kw), ref)
    fast.enable_skip(FeatureInheritanceConfig(schedule=interval(2)))
    skipped = _call(fast, kw)
    assert not torch.equal(skipped, ref)
    back = DiTPipeline.from_pipe(fast)
    back.set_progress_bar_config(disable=True)
    assert torch.equal(_call(back, kw), ref)  # a plain pipeline over the same denoiser never skips
    direct = SkipDiTPipeline.from_pipe(plain, skip_config=FeatureInheritanceConfig(schedule=interval(2)))
    direct.set_progress_bar_config(disable=True)
    assert direct.skip_enabled and torch.equal(_call(direct, kw), skipped)  # the one-liner the errors suggest
    assert torch.equal(_call(fast, kw), skipped)


def test_custom_timesteps_work_with_inheritance():
    comps, kw = tiny_pipeline_components("sd")
    comps["scheduler"] = EulerDiscreteScheduler.from_config(comps["scheduler"].config)
    parent, skip = StableDiffusionPipeline(**comps), SkipStableDiffusionPipeline(**comps)
    for p in (parent, skip):
        p.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in kw.items() if k != "num_inference_steps"}
    kw["timesteps"] = [999, 800, 600, 400, 200, 1]
    cfg = FeatureInheritanceConfig(schedule=interval(2))
    skip.enable_skip(cfg)
    got = _call(skip, kw)
    with applied(comps["unet"], cfg):
        want = _call(parent, kw)
    assert torch.equal(got, want)
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]


def test_saved_skip_pipeline_loads_in_plain_diffusers(tmp_path):
    comps, kw = tiny_pipeline_components("dit")
    fast = SkipDiTPipeline(**comps)
    fast.enable_skip(FeatureInheritanceConfig(schedule=interval(2)))
    fast.save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert type(loaded) is DiTPipeline
    again = SkipDiTPipeline.from_pretrained(tmp_path / "p")
    assert again.skip_configs == fast.skip_configs
