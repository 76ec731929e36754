"""Tiny random-init transformers of the families diffusers' block registry describes, for tests.

Flux, Flux2, Qwen-Image, Z-Image, Wan, HunyuanVideo, LTX-Video and CogVideoX, each a few blocks
wide and ~10-400k parameters, with :func:`family_inputs` for one call at a timestep. Timesteps
are given on each family's own scale as its pipeline passes them (Flux, Qwen-Image and Z-Image
take ``t / 1000``; Z-Image's grows from noise to data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FAMILIES", "tiny_family", "family_inputs", "family_timesteps"]


def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )


def _flux2() -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    )


def _qwen_image() -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )


def _z_image() -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=4, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32],
    )


def _wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32,
    )


def _hunyuan_video() -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=3,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )


def _ltx() -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=4, caption_channels=16,
    )


def _cogvideox() -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=16,
        num_layers=4, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=16,
    )


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "flux": _flux,
    "flux2": _flux2,
    "qwen_image": _qwen_image,
    "z_image": _z_image,
    "wan": _wan,
    "hunyuan_video": _hunyuan_video,
    "ltx": _ltx,
    "cogvideox": _cogvideox,
}


def tiny_family(name: str, seed: int = 0) -> nn.Module:
    """A tiny random-init transformer of family ``name`` (a key of :data:`FAMILIES`), in eval mode."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    return FAMILIES[name]().eval()


def family_timesteps(name: str, n: int = 4) -> list[float]:
    """``n`` timesteps of one trajectory, noisiest first, on the scale the family's pipeline passes."""
    frac = [1.0 - (i + 0.5) / n for i in range(n)]  # noise level, decreasing
    if name == "z_image":
        return [1.0 - f for f in frac]  # (1000 - t) / 1000: grows along the trajectory
    if name in ("flux", "flux2", "qwen_image"):
        return frac
    return [1000.0 * f for f in frac]


def family_inputs(model: nn.Module, t: float, batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs for one call of a :func:`tiny_family` model at timestep ``t`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.full((batch,), float(t))
    name = type(model).__name__

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if name == "FluxTransformer2DModel":
        return dict(
            hidden_states=r(batch, 16, 4), encoder_hidden_states=r(batch, 8, 32), pooled_projections=r(batch, 32),
            timestep=ts, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
        )
    if name == "Flux2Transformer2DModel":
        return dict(
            hidden_states=r(batch, 16, 4), encoder_hidden_states=r(batch, 8, 32), timestep=ts,
            img_ids=torch.zeros(batch, 16, 4), txt_ids=torch.zeros(batch, 8, 4), guidance=torch.ones(batch),
        )
    if name == "QwenImageTransformer2DModel":
        return dict(
            hidden_states=r(batch, 16, 16), encoder_hidden_states=r(batch, 7, 16),
            encoder_hidden_states_mask=torch.ones(batch, 7), timestep=ts, img_shapes=[[(1, 4, 4)]] * batch,
        )
    if name == "ZImageTransformer2DModel":
        return dict(x=[r(4, 1, 8, 8) for _ in range(batch)], t=ts, cap_feats=[r(7, 16) for _ in range(batch)])
    if name == "WanTransformer3DModel":
        return dict(hidden_states=r(batch, 4, 2, 8, 8), timestep=ts, encoder_hidden_states=r(batch, 7, 16))
    if name == "HunyuanVideoTransformer3DModel":
        return dict(
            hidden_states=r(batch, 4, 1, 8, 8), timestep=ts, encoder_hidden_states=r(batch, 7, 16),
            encoder_attention_mask=torch.ones(batch, 7), pooled_projections=r(batch, 8),
            guidance=torch.full((batch,), 1000.0),
        )
    if name == "LTXVideoTransformer3DModel":
        return dict(
            hidden_states=r(batch, 2 * 8 * 8, 4), encoder_hidden_states=r(batch, 7, 16), timestep=ts,
            encoder_attention_mask=torch.ones(batch, 7), num_frames=2, height=8, width=8,
        )
    if name == "CogVideoXTransformer3DModel":
        return dict(hidden_states=r(batch, 3, 4, 8, 8), encoder_hidden_states=r(batch, 16, 16), timestep=ts)
    raise TypeError(f"no example inputs for {name}")


def tiny_family_pipeline_components(kind: str, seed: int = 0) -> tuple[dict, dict]:
    """``(components, call_kwargs)`` for a tiny ``FluxPipeline`` / ``QwenImagePipeline`` / ``WanPipeline``.

    ``kind`` is ``"flux"``, ``"qwen_image"`` or ``"wan"``. Text encoders and tokenizers are left
    out; the call passes precomputed prompt embeddings. Flow-matching Euler with the families'
    dynamic shifting (Flux, Qwen-Image) or a fixed shift (Wan).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ._tiny import tiny_vae

    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    torch.manual_seed(seed)
    if kind == "flux":
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        ).eval()
        sched = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
        )
        comps = dict(
            scheduler=sched, vae=tiny_vae(seed, shift_factor=0.0), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer, image_encoder=None, feature_extractor=None,
        )
        call = dict(
            prompt_embeds=r(1, 8, 32), pooled_prompt_embeds=r(1, 32), height=16, width=16, num_inference_steps=6,
            guidance_scale=3.5, output_type="pt",
        )
        return comps, call
    if kind == "qwen_image":
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        ).eval()
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ).eval()
        sched = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=0.9
        )
        comps = dict(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
        call = dict(
            prompt_embeds=r(1, 7, 16), prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
            negative_prompt_embeds=torch.zeros(1, 7, 16), negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
            true_cfg_scale=2.0, height=16, width=16, num_inference_steps=6, output_type="pt",
        )
        return comps, call
    if kind == "wan":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32,
        ).eval()
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ).eval()
        comps = dict(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            transformer=transformer,
        )
        call = dict(
            prompt_embeds=r(1, 7, 16), negative_prompt_embeds=torch.zeros(1, 7, 16), guidance_scale=4.0, height=16,
            width=16, num_frames=5, num_inference_steps=6, output_type="pt",
        )
        return comps, call
    raise ValueError(f"no tiny pipeline of kind {kind!r}; choose flux, qwen_image or wan")
