"""``digits-sd``'s architecture: its ``UNet2DConditionModel`` and ``CLIPTextModel``, untrained.

``recipes/sd.py`` trains them; benchmarks build them at random for smoke runs.
"""

from __future__ import annotations

from typing import Any

from .sd_tokenizer import MAX_LENGTH

__all__ = ["make_unet", "make_text_encoder"]


def make_unet() -> Any:
    """The UNet (blocks 48/96, cross-attention at 8×8 and in the mid block) on ``digits-vae`` latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(48, 96), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                attention_head_dim=8, norm_num_groups=16)


def make_text_encoder(vocab_size: int, bos: int, eos: int) -> Any:
    """The text encoder: a 2-layer, width-128 ``CLIPTextModel`` over :data:`~mmskip.zoo.sd_tokenizer.MAX_LENGTH` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos, projection_dim=128)
    return CLIPTextModel(cfg)
