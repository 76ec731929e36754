"""The compatibility matrix: ControlNet, img2img / inpainting (strength), LoRA, from_pipe, on tiny models.

Each test is one cell (technique x feature) of the table in ``docs/pipelines.md``.
torch.compile and offloading are in ``test_compile_offload.py``; video (Wan) in
``test_family_pipelines.py``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    ControlNetModel,
    FluxControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from mmskip.diffusion import FeatureInheritanceConfig, GaussianStats, GaussianTeleportConfig, StepSkipConfig
from mmskip.pipelines import (
    SkipFluxControlNetPipeline,
    SkipStableDiffusionControlNetPipeline,
    SkipStableDiffusionImg2ImgPipeline,
    SkipStableDiffusionInpaintPipeline,
    SkipStableDiffusionPipeline,
)

from mmskip.inject import applied
from mmskip.schedules import explicit, interval

from ..diffusion._tiny import tiny_pipeline_components
from ..diffusion._tiny_families import family_inputs, tiny_family, tiny_family_pipeline_components


def _img(pipe, kw, seed=0):
    out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    return out.images if hasattr(out, "images") else out[0]


def _quiet(*pipes):
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def _timesteps(model):
    seen = []
    h = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float((kwargs.get("timestep") if "timestep" in kwargs else args[1]).flatten()[0])),
        with_kwargs=True,
    )
    return seen, h


# -- ControlNet ------------------------------------------------------------------------------------


def _unzero(controlnet):
    """ControlNets start with zero-initialised output layers (no effect): randomise them so control counts."""
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.any():
                p.normal_(0, 0.1)


def _sd_controlnet(seed=0):
    comps, kw = tiny_pipeline_components("sd", seed)
    torch.manual_seed(seed + 1)
    cn = ControlNetModel.from_unet(comps["unet"], conditioning_embedding_out_channels=(4, 8))
    _unzero(cn)
    comps["controlnet"] = cn
    kw = dict(kw, image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)), height=16, width=16)
    return comps, kw


def test_sd_controlnet_inherits_unet_features_and_runs_controlnet_every_step():
    comps, kw = _sd_controlnet()
    parent, skip = _quiet(StableDiffusionControlNetPipeline(**comps), SkipStableDiffusionControlNetPipeline(**comps))
    ref = _img(parent, kw)
    assert torch.equal(_img(skip, kw), ref)
    cn_calls, h = _timesteps(skip.controlnet)
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _img(skip, kw)
    h.remove()
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]
    assert len(cn_calls) == 6  # the ControlNet runs on every step, inherited or not
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.1
    # its residuals are added fresh: with the control image changed, inherited steps change too
    other = _img(skip, dict(kw, image=torch.zeros(1, 3, 16, 16)))
    assert not torch.equal(other, out)
    skip.enable_skip(StepSkipConfig(interval(2)))
    seen, h = _timesteps(skip.unet)
    _img(skip, kw)
    h.remove()
    assert len(seen) == 3


def test_sd_controlnet_for_another_unet_is_refused():
    comps, kw = _sd_controlnet()
    torch.manual_seed(5)
    other = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    comps["controlnet"] = ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(4, 8))
    (skip,) = _quiet(SkipStableDiffusionControlNetPipeline(**comps))
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    with pytest.raises(ValueError, match="gives 6 down-block residuals but the UNet has 4"):
        _img(skip, kw)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in skip.unet.modules())


def test_flux_controlnet_block_samples_are_added_fresh_between_inherited_blocks():
    """A range inherits the sum of its blocks' own contributions, so the ControlNet samples the
    model adds between blocks are the current step's: a range equals its blocks inherited one by one."""
    m = tiny_family("flux")
    g = torch.Generator().manual_seed(7)
    samples = [[torch.randn(2, 16, 32, generator=g) for _ in range(2)] for _ in range(2)]
    singles = [[torch.randn(2, 16, 32, generator=g) for _ in range(4)] for _ in range(2)]

    def run(cfg):
        with applied(m, cfg), torch.no_grad():
            outs = []
            for step, t in enumerate((0.9, 0.6)):
                kw = family_inputs(m, t)
                out = m(**kw, controlnet_block_samples=samples[step], controlnet_single_block_samples=singles[step])
                outs.append(out.sample)
        return outs

    keep0 = explicit(keep=[0])
    ranges = run(FeatureInheritanceConfig(keep0, targets=("transformer_blocks.0:2", "single_transformer_blocks.0:3")))
    units = run(FeatureInheritanceConfig(keep0, granularity="unit", targets=(
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1",
        "single_transformer_blocks.2")))
    torch.testing.assert_close(ranges[1], units[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ranges[0], units[0])


def test_flux_controlnet_pipeline():
    comps, kw = tiny_family_pipeline_components("flux")
    torch.manual_seed(3)
    comps["controlnet"] = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    _unzero(comps["controlnet"])
    comps.pop("image_encoder"), comps.pop("feature_extractor")
    (skip,) = _quiet(SkipFluxControlNetPipeline(**comps))
    kw = dict(kw, control_image=torch.rand(1, 3, 16, 16), controlnet_conditioning_scale=0.7)
    ref = _img(skip, kw)
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _img(skip, kw)
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert not torch.equal(_img(skip, dict(kw, controlnet_conditioning_scale=0.0)), out)


# -- img2img / inpainting: strength runs the last grid steps -----------------------------------------


def _sd_image_pipes(kind):
    comps, kw = tiny_pipeline_components("sd")
    kw = dict(kw, image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)), strength=0.5)
    if kind == "img2img":
        return (*_quiet(StableDiffusionImg2ImgPipeline(**comps), SkipStableDiffusionImg2ImgPipeline(**comps)), kw)
    kw.update(mask_image=torch.ones(1, 1, 16, 16), height=16, width=16)
    return (*_quiet(StableDiffusionInpaintPipeline(**comps), SkipStableDiffusionInpaintPipeline(**comps)), kw)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_strength_maps_schedules_onto_the_grid_steps_run(kind):
    parent, skip, kw = _sd_image_pipes(kind)
    full, h = _timesteps(parent.unet)
    ref = _img(parent, dict(kw, strength=1.0))
    h.remove()
    assert torch.equal(_img(skip, kw), _img(parent, kw))
    # inheritance: strength 0.5 of 6 runs grid steps 3, 4, 5; interval(2) recomputes grid step 4
    # (and 3, the first one run, which has nothing to inherit yet)
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _img(skip, kw)
    st = skip.skip_stats()
    assert st["visited_steps"] == [3, 4, 5] and st["recomputed_steps"] == [3, 4] and st["inherited_steps"] == 1
    assert not torch.equal(out, _img(parent, kw))
    # step skipping: grid steps 0, 2, 4 of which strength runs 4, from the noise level of step 4
    skip.enable_skip(StepSkipConfig(interval(2)))
    seen, h = _timesteps(skip.unet)
    out = _img(skip, kw)
    h.remove()
    assert skip.skip_stats()["visited_steps"] == [4]
    assert seen == [full[4]] and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_flux_img2img_strength_on_the_shifted_grid():
    from diffusers import FluxImg2ImgPipeline
    from mmskip.pipelines import SkipFluxImg2ImgPipeline

    comps, kw = tiny_family_pipeline_components("flux")
    comps.pop("image_encoder"), comps.pop("feature_extractor")
    parent, skip = _quiet(FluxImg2ImgPipeline(**comps), SkipFluxImg2ImgPipeline(**comps))
    kw = dict(kw, image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)), strength=0.5)
    full, h = _timesteps(parent.transformer)
    _img(parent, dict(kw, strength=1.0))
    h.remove()
    assert torch.equal(_img(skip, kw), _img(parent, kw))
    skip.enable_skip([FeatureInheritanceConfig(interval(2)), StepSkipConfig(explicit(keep=[0, 2, 3, 4, 5], num=6))])
    seen, h = _timesteps(skip.transformer)
    _img(skip, kw)
    h.remove()
    st = skip.skip_stats()
    assert st["visited_steps"] == [3, 4, 5] and st["recomputed_steps"] == [3, 4]
    assert seen == [full[i] for i in (3, 4, 5)]


def test_strength_with_a_plan_that_runs_none_of_its_steps_is_refused(tmp_path):
    parent, skip, kw = _sd_image_pipes("img2img")
    skip.enable_skip(StepSkipConfig(explicit(keep=[0, 1], num=6)))
    with pytest.raises(ValueError, match="visits none of"):
        _img(skip, kw)
    path = tmp_path / "g.safetensors"
    GaussianStats.fit(torch.randn(8, 4, 8, 8), rank=4).save(path)
    skip.enable_skip(GaussianTeleportConfig(str(path), 0.34))
    with pytest.raises(ValueError, match="strength=1"):
        _img(skip, kw)
    skip.disable_skip()
    assert torch.equal(_img(skip, kw), _img(parent, kw))  # nothing was left changed


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("config", [FeatureInheritanceConfig(), StepSkipConfig(interval(2))], ids=["inherit", "steps"])
@pytest.mark.parametrize("strength", [0.0, 0.1])
def test_strength_that_runs_no_step_is_refused_about_strength(kind, config, strength):
    """int(6 * strength) = 0 steps: diffusers' inpainting refuses it (its img2img fails inside);
    the drop-in says so about strength, whichever technique is enabled, and changes nothing."""
    parent, skip, kw = _sd_image_pipes(kind)
    kw = dict(kw, strength=strength)
    if kind == "inpaint":
        with pytest.raises(ValueError, match="strength"):
            _img(parent, kw)
    skip.enable_skip(config)
    with pytest.raises(ValueError, match=rf"strength={strength} runs none of the 6 denoising steps.*0\.167") as err:
        _img(skip, kw)
    assert "step-skip" not in str(err.value)
    kw = dict(kw, strength=0.5)
    ref = _img(skip, kw)
    skip.disable_skip()
    assert torch.equal(_img(skip, kw), _img(parent, kw)) and not torch.equal(ref, _img(parent, kw))


@pytest.mark.parametrize("kind", ["controlnet", "img2img", "inpaint"])
def test_teleport_with_image_conditioned_pipelines_at_full_strength(kind, tmp_path):
    path = tmp_path / "g.safetensors"
    GaussianStats.fit(torch.randn(8, 4, 8, 8), rank=4).save(path)
    if kind == "controlnet":
        comps, kw = _sd_controlnet()
        (skip,) = _quiet(SkipStableDiffusionControlNetPipeline(**comps))
    else:
        _, skip, kw = _sd_image_pipes(kind)
        kw = dict(kw, strength=1.0)
    skip.enable_skip(GaussianTeleportConfig(str(path), 0.34))
    seen, h = _timesteps(skip.unet)
    out = _img(skip, kw)
    h.remove()
    assert skip.skip_stats()["visited_steps"] == [2, 3, 4, 5] and len(seen) == 4 and torch.isfinite(out).all()


# -- LoRA ------------------------------------------------------------------------------------------


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def test_lora_layers_under_inheritance_hooks_and_load_lora_weights(tmp_path):
    from peft.utils import get_peft_model_state_dict

    comps, kw = tiny_pipeline_components("sd")
    base = _img(SkipStableDiffusionPipeline(**comps), kw)
    torch.manual_seed(0)
    comps["unet"].add_adapter(_lora_config())
    parent, skip = _quiet(StableDiffusionPipeline(**comps), SkipStableDiffusionPipeline(**comps))
    ref = _img(parent, kw)
    assert not torch.equal(ref, base)  # the adapter is active
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _img(skip, kw)
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]
    assert torch.equal(_img(parent, kw), ref)  # peft layers intact after mmskip removed its hooks
    # the same adapter through diffusers' load_lora_weights, then fused
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(comps["unet"]))
    comps2, _ = tiny_pipeline_components("sd")
    (loaded,) = _quiet(SkipStableDiffusionPipeline(**comps2))
    loaded.load_lora_weights(tmp_path)
    loaded.enable_skip(FeatureInheritanceConfig(interval(2)))
    torch.testing.assert_close(_img(loaded, kw), out)
    loaded.fuse_lora()
    torch.testing.assert_close(_img(loaded, kw), out, rtol=1e-4, atol=1e-4)


# -- from_pipe -------------------------------------------------------------------------------------


def test_from_pipe_shares_the_denoiser_and_keeps_settings_per_pipeline():
    comps, kw = tiny_pipeline_components("sd")
    (txt,) = _quiet(SkipStableDiffusionPipeline(**comps))
    ref = _img(txt, kw)
    txt.enable_skip(FeatureInheritanceConfig(interval(2)))
    img2img = SkipStableDiffusionImg2ImgPipeline.from_pipe(txt)
    img2img.set_progress_bar_config(disable=True)
    assert img2img.unet is txt.unet and not img2img.skip_enabled
    img_kw = dict(kw, image=torch.rand(1, 3, 16, 16), strength=0.5)
    plain = _img(img2img, img_kw)
    img2img.enable_skip(StepSkipConfig(interval(2)))
    _img(img2img, img_kw)
    assert img2img.skip_stats()["visited_steps"] == [4]
    txt.disable_skip()
    assert torch.equal(_img(txt, kw), ref)
    img2img.disable_skip()
    assert torch.equal(_img(img2img, img_kw), plain)
