"""Multi-UNet switching: exact with the same UNet in both slots, exact routing, composes with inheritance."""

from __future__ import annotations

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig, UNetSwitchConfig
from mmskip.diffusion.assembly import assemble_unet, save_assembled
from mmskip.pipelines import SkipStableDiffusionPipeline

from mmskip.schedules import explicit, interval

from ._tiny import tiny_pipeline_components


def _pipe():
    comps, kw = tiny_pipeline_components("sd")
    pipe = SkipStableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(kw, num_inference_steps=6)


def _img(pipe, kw):
    return pipe(generator=torch.Generator().manual_seed(0), **kw).images


def test_same_unet_in_both_slots_is_the_plain_pipeline(tmp_path):
    pipe, kw = _pipe()
    ref = _img(pipe, kw)
    pipe.unet.save_pretrained(tmp_path / "same")
    pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "same"), full_fraction=0.5))
    out = _img(pipe, kw)
    assert torch.equal(out, ref)
    stats = pipe.skip_stats()
    assert stats["full_unet_steps"] == [0, 1, 2] and stats["light_unet_steps"] == [3, 4, 5]
    assert not hasattr(pipe.unet, "_diffusers_hook") or not pipe.unet._diffusers_hook.hooks


@pytest.mark.parametrize("full_first", [True, False])
def test_routes_exactly_the_chosen_steps(tmp_path, full_first):
    pipe, kw = _pipe()
    light = assemble_unet(pipe.unet, ["mid", "up_attn.1"])
    save_assembled(light, tmp_path / "light")
    plain = _img(pipe, kw)
    # all steps light == the pipeline with the light UNet in place
    pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "light"), full_fraction=0.0))
    all_light = _img(pipe, kw)
    comps, _ = tiny_pipeline_components("sd")
    comps["unet"] = light
    other = SkipStableDiffusionPipeline(**comps)
    other.set_progress_bar_config(disable=True)
    assert torch.equal(all_light, _img(other, kw))
    pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "light"), full_fraction=1.0))
    assert torch.equal(_img(pipe, kw), plain)
    pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "light"), full_fraction=0.5, full_first=full_first))
    mixed = _img(pipe, kw)
    assert not torch.equal(mixed, plain) and not torch.equal(mixed, all_light)
    full = pipe.skip_stats()["full_unet_steps"]
    assert full == ([0, 1, 2] if full_first else [3, 4, 5])


def test_composes_with_feature_inheritance(tmp_path):
    """Inheritance acts on the full UNet's steps; the light steps compute in full (here the same UNet)."""
    pipe, kw = _pipe()
    pipe.unet.save_pretrained(tmp_path / "same")
    # interval(2) on the full steps 0-2 inherits only step 1; steps 3-5 run the light UNet
    pipe.enable_skip(FeatureInheritanceConfig(explicit(skip=[1], num=6)))
    ref = _img(pipe, kw)
    pipe.enable_skip([UNetSwitchConfig(light=str(tmp_path / "same"), full_fraction=0.5),
                      FeatureInheritanceConfig(interval(2))])
    out = _img(pipe, kw)
    assert torch.equal(out, ref)  # inheritance still counts every step through the switch
    assert pipe.skip_stats()["light_unet_steps"] == [3, 4, 5]
    pipe.disable_skip()
    assert not torch.equal(out, _img(pipe, kw))


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="full_fraction"):
        UNetSwitchConfig(light=str(tmp_path), full_fraction=1.5)
    with pytest.raises(ValueError, match="light="):
        UNetSwitchConfig()
    pipe, _ = _pipe()
    with pytest.raises(FileNotFoundError, match="python -m mmskip.diffusion.assembly"):
        pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "nowhere")))


def test_img2img_strength_routes_the_grid_steps_it_runs(tmp_path):
    """strength=0.5 of 6 steps runs grid steps 3..5: with full_first and full_fraction 0.5 the
    full UNet owns grid steps 0..2, so every step this call runs goes to the light UNet."""
    from mmskip.pipelines import SkipStableDiffusionImg2ImgPipeline

    comps, kw = tiny_pipeline_components("sd")
    kw = dict(kw, num_inference_steps=6, strength=0.5,
              image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)))
    pipe = SkipStableDiffusionImg2ImgPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    light = assemble_unet(pipe.unet, ["mid", "up_attn.1"])
    save_assembled(light, tmp_path / "light")
    pipe.enable_skip(UNetSwitchConfig(light=str(tmp_path / "light"), full_fraction=0.5, full_first=True))
    out = _img(pipe, kw)
    stats = pipe.skip_stats()
    assert stats["full_unet_steps"] == [] and stats["light_unet_steps"] == [3, 4, 5]
    comps2, _ = tiny_pipeline_components("sd")
    comps2["unet"] = light
    other = SkipStableDiffusionImg2ImgPipeline(**comps2)
    other.set_progress_bar_config(disable=True)
    assert torch.equal(out, _img(other, kw))  # the same as the light UNet alone
