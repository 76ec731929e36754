"""SkipFluxPipeline, SkipQwenImagePipeline, SkipWanPipeline on tiny random components.

Flow-matching Euler with dynamic shifting (Flux, Qwen-Image) or a fixed shift (Wan): disabled ==
parent, inheritance skips blocks, step skipping visits a subset of the pipeline's own shifted
grid, the analytic jump is refused where the grid depends on the call.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, WanPipeline
from mmskip.diffusion import FeatureInheritanceConfig, GaussianStats, GaussianTeleportConfig, StepSkipConfig
from mmskip.pipelines import SkipFluxPipeline, SkipQwenImagePipeline, SkipWanPipeline

from mmskip.schedules import interval

from ..diffusion._tiny_families import tiny_family_pipeline_components

PAIRS = {
    "flux": (FluxPipeline, SkipFluxPipeline),
    "qwen_image": (QwenImagePipeline, SkipQwenImagePipeline),
    "wan": (WanPipeline, SkipWanPipeline),
}


def _pipes(kind):
    comps, kw = tiny_family_pipeline_components(kind)
    parent_cls, skip_cls = PAIRS[kind]
    parent, skip = parent_cls(**comps), skip_cls(**comps)
    for p in (parent, skip):
        p.set_progress_bar_config(disable=True)
    return parent, skip, kw


def _call(pipe, kw, seed=0):
    out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    return out.images if hasattr(out, "images") else out.frames


def _record_timesteps(pipe):
    seen = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True
    )
    return seen, h


@pytest.fixture(scope="module", params=list(PAIRS))
def pipes(request):
    return request.param, *_pipes(request.param)


def test_disabled_equals_parent_and_inheritance_skips(pipes):
    kind, parent, skip, kw = pipes
    ref = _call(parent, kw)
    assert torch.equal(_call(skip, kw), ref)
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _call(skip, kw)
    st = skip.skip_stats()
    skip.disable_skip()
    assert st["recomputed_steps"] == [0, 2, 4] and st["visited_steps"] == [0, 1, 2, 3, 4, 5]
    assert st["flops_fraction"] < 0.9
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.2
    # the pipeline owns its skipping per call: the parent sharing the transformer is unchanged
    assert torch.equal(_call(parent, kw), ref)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in skip.transformer.modules())


def test_step_skip_visits_a_subset_of_the_shifted_grid(pipes):
    kind, parent, skip, kw = pipes
    full, h = _record_timesteps(parent)
    ref = _call(parent, kw)
    h.remove()
    skip.enable_skip(StepSkipConfig(interval(2)))
    seen, h = _record_timesteps(skip)
    out = _call(skip, kw)
    h.remove()
    skip.disable_skip()
    per_step = len(full) // 6  # Qwen-Image's true CFG calls the transformer twice per step
    grid = full[::per_step]
    assert seen[::per_step] == [grid[i] for i in (0, 2, 4)]
    assert not torch.equal(out, ref) and torch.isfinite(out).all()


def test_teleport_refused_with_dynamic_shifting(tmp_path):
    parent, skip, kw = _pipes("flux")
    path = tmp_path / "g.safetensors"
    GaussianStats.fit(torch.randn(8, 4, 8, 8), rank=4).save(path)
    skip.enable_skip(GaussianTeleportConfig(str(path), 0.5))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        _call(skip, kw)
    skip.disable_skip()
    assert torch.equal(_call(skip, kw), _call(parent, kw))


def test_two_expert_wan_refuses_inheritance():
    comps, kw = tiny_family_pipeline_components("wan")
    pipe = SkipWanPipeline(**comps)
    pipe.register_modules(transformer_2=comps["transformer"])
    with pytest.raises(ValueError, match="transformer_2"):
        pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    pipe.enable_skip(StepSkipConfig(interval(2)))  # sampler-level techniques still work
