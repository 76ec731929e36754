"""Tiny random-init denoisers of every supported class, for tests and smoke runs (no hub needed)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_unet", "tiny_dit", "tiny_pixart", "tiny_sd3", "example_inputs"]


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
        num_embeds_ada_norm=10,
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
