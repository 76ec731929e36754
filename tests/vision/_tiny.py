"""Tiny random LLaVA (CLIP vision tower + Llama text model) built from configs, and a left-padded batch."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 127
N_IMAGE = 16  # 16x16 px image, 4x4 patches, CLS dropped


def tiny_llava(layers: int = 4, hidden: int = 64, seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", image_seq_length=N_IMAGE)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def padded_prompts(text_lens: tuple[int, ...] = (6, 3, 1), seed: int = 1) -> dict[str, torch.Tensor]:
    """One image per row between a text prefix and a 2-token suffix, left-padded to one length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in text_lens:
        pre = torch.randint(3, 120, (n,), generator=g).tolist()
        post = torch.randint(3, 120, (2,), generator=g).tolist()
        rows.append(pre + [IMAGE_TOKEN] * N_IMAGE + post)
    ids, mask = _left_pad(rows)
    pixels = torch.randn(len(rows), 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_onevision(seed: int = 0):
    """Tiny random LLaVA-OneVision (SigLIP + Qwen2): one 16x16 image -> 36 vision tokens (anyres grid)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=None, eos_token_id=None)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=IMAGE_TOKEN - 1, image_grid_pinpoints=[[16, 16]],
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def onevision_prompts(text_lens: tuple[int, ...] = (5, 2), seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_image = 36
    rows = [torch.randint(3, 120, (n,), generator=g).tolist() + [IMAGE_TOKEN] * n_image + [7, 8] for n in text_lens]
    ids, mask = _left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(rows), 2, 3, 16, 16, generator=g),
            "image_sizes": torch.tensor([[16, 16]] * len(rows))}


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows with 0 to one width: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
