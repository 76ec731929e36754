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


VIDEO_TOKEN = IMAGE_TOKEN - 1  # tiny_onevision's video placeholder
ONEVISION_FRAME = 4  # 16x16 frame, 4x4 patches pooled 2x2 -> 2x2 tokens


def onevision_video_prompts(videos_per_row: tuple[int, ...] = (1, 2), frames: int = 3, text_lens=(4, 2),
                            seed: int = 3) -> dict[str, torch.Tensor]:
    """Rows of text + videos (each ``frames`` x 4 tokens + 1 newline) + 2 text tokens, left-padded."""
    g = torch.Generator().manual_seed(seed)
    per_video = frames * ONEVISION_FRAME + 1
    rows = [torch.randint(3, 120, (n,), generator=g).tolist() + [VIDEO_TOKEN] * (per_video * v) + [7, 8]
            for n, v in zip(text_lens, videos_per_row)]
    ids, mask = _left_pad(rows)
    pixels = torch.randn(sum(videos_per_row), frames, 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels}


QWEN_VIDEO, QWEN_START, QWEN_END = 152, 150, 149


def tiny_qwen2vl(seed: int = 0, attn: str = "sdpa"):
    """Tiny random Qwen2-VL: 3-D M-RoPE text model, 2x2 patch merge, temporal patch 2."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=160, max_position_embeddings=512, pad_token_id=0,
                bos_token_id=None, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151, video_token_id=QWEN_VIDEO,
                        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    cfg._attn_implementation = attn
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def qwen_clip(t: int = 3, h: int = 4, w: int = 8, seed: int = 4) -> dict[str, torch.Tensor]:
    """One video's processor outputs: flattened patches and its (t, h, w) grid (t*h*w/4 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 2 * 2, generator=g),
            "video_grid_thw": torch.tensor([[t, h, w]])}


def qwen_video_prompt(clips: list[dict[str, torch.Tensor]], pre=(5, 6), post=(7, 8)) -> dict[str, torch.Tensor]:
    """One row: ``pre`` + each clip's video tokens (between vision start/end) + ``post``, with
    mm_token_type_ids (batch 1), as Qwen2-VL's processor lays them out."""
    ids = list(pre)
    for c in clips:
        t, h, w = c["video_grid_thw"][0].tolist()
        ids += [QWEN_START] + [QWEN_VIDEO] * (t * h * w // 4) + [QWEN_END]
    ids += list(post)
    ids = torch.tensor([ids])
    return {"input_ids": ids, "mm_token_type_ids": torch.where(ids == QWEN_VIDEO, 2, 0),
            "pixel_values_videos": torch.cat([c["pixel_values_videos"] for c in clips]),
            "video_grid_thw": torch.cat([c["video_grid_thw"] for c in clips])}
