"""Tiny random-init denoisers of every supported class, for tests and smoke runs (no hub needed)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "tiny_unet", "tiny_dit", "tiny_pixart", "tiny_sd3", "tiny_vae", "tiny_pipeline_components", "example_inputs",
    "target_modules",
]


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16, sdxl: bool = False) -> nn.Module:
    """A 2-level ``UNet2DConditionModel`` (SD 1.x shape; ``sdxl=True`` adds SDXL's text-time embedding)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=cross_attention_dim + 6 * 4,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
        **extra,
    ).eval()


def tiny_dit(seed: int = 0, num_layers: int = 4) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    ).eval()


def tiny_pixart(seed: int = 0, num_layers: int = 4) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=16,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    ).eval()


def tiny_sd3(seed: int = 0, num_layers: int = 4) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()


def example_inputs(model: nn.Module, t: float, batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs for one denoiser call at timestep ``t`` (fixed conditioning, seeded latents)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ts = torch.full((batch,), float(t))
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        d = model.config.cross_attention_dim
        kw = dict(sample=x, timestep=ts, encoder_hidden_states=torch.randn(batch, 5, d, generator=g))
        if model.config.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = dict(
                text_embeds=torch.randn(batch, d, generator=g), time_ids=torch.zeros(batch, 6)
            )
        return kw
    if name == "DiTTransformer2DModel":
        return dict(hidden_states=x, timestep=ts, class_labels=torch.arange(batch) % 10)
    if name == "PixArtTransformer2DModel":
        return dict(
            hidden_states=x,
            timestep=ts,
            encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if name == "SD3Transformer2DModel":
        return dict(
            hidden_states=x,
            timestep=ts,
            encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
            pooled_projections=torch.randn(batch, 8, generator=g),
        )
    raise TypeError(f"no example inputs for {name}")


def tiny_vae(seed: int = 0, shift_factor: float | None = None) -> nn.Module:
    """A 2-level ``AutoencoderKL``: 16x16 RGB <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        shift_factor=shift_factor,
    ).eval()


def tiny_pipeline_components(kind: str, seed: int = 0) -> tuple[dict, dict]:
    """``(components, call_kwargs)`` for a tiny pipeline of ``kind`` (sd, sdxl, dit, pixart, sd3).

    Text encoders and tokenizers are left out (``None``); the call kwargs pass precomputed
    prompt embeddings instead, so no tokenizer files are needed.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(seed)
    ddim = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    out = dict(output_type="pt", num_inference_steps=6, guidance_scale=3.0)
    if kind == "sd":
        comps = dict(
            vae=tiny_vae(seed), text_encoder=None, tokenizer=None, unet=tiny_unet(seed), scheduler=ddim,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        out.update(prompt_embeds=torch.randn(2, 5, 16, generator=g), negative_prompt_embeds=torch.zeros(2, 5, 16))
        return comps, out
    if kind == "sdxl":
        comps = dict(
            vae=tiny_vae(seed), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=tiny_unet(seed, sdxl=True), scheduler=ddim,
        )
        out.update(
            prompt_embeds=torch.randn(2, 5, 16, generator=g), negative_prompt_embeds=torch.zeros(2, 5, 16),
            pooled_prompt_embeds=torch.randn(2, 16, generator=g), negative_pooled_prompt_embeds=torch.zeros(2, 16),
            height=16, width=16,
        )
        return comps, out
    if kind == "dit":
        comps = dict(transformer=tiny_dit(seed), vae=tiny_vae(seed), scheduler=ddim)
        out.pop("output_type")
        out.update(class_labels=[1, 3], output_type="np")
        return comps, out
    if kind == "pixart":
        comps = dict(tokenizer=None, text_encoder=None, vae=tiny_vae(seed), transformer=tiny_pixart(seed), scheduler=ddim)
        out.update(
            prompt_embeds=torch.randn(2, 5, 16, generator=g), prompt_attention_mask=torch.ones(2, 5, dtype=torch.long), negative_prompt=None,
            negative_prompt_embeds=torch.zeros(2, 5, 16), negative_prompt_attention_mask=torch.ones(2, 5, dtype=torch.long),
            height=16, width=16, use_resolution_binning=False,
        )
        return comps, out
    if kind == "sd3":
        comps = dict(
            transformer=tiny_sd3(seed), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(seed, shift_factor=0.0),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        out.update(
            prompt_embeds=torch.randn(2, 5, 16, generator=g), negative_prompt_embeds=torch.zeros(2, 5, 16),
            pooled_prompt_embeds=torch.randn(2, 8, generator=g), negative_pooled_prompt_embeds=torch.zeros(2, 8),
            height=16, width=16,
        )
        return comps, out
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; use sd, sdxl, dit, pixart or sd3")


def target_modules(targets: list[str]) -> list[str]:
    """Module names behind inheritance targets: a range ``"blocks.a:b"`` becomes ``blocks.a`` .. ``blocks.b-1``."""
    out: list[str] = []
    for t in targets:
        if ":" in t:
            prefix, _, span = t.rpartition(".")
            a, b = map(int, span.split(":"))
            out += [f"{prefix}.{i}" for i in range(a, b)]
        else:
            out.append(t)
    return out
