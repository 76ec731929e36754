"""``digits-video``'s architecture: a tiny ``LlavaOnevisionForConditionalGeneration``, untrained.

``recipes/video.py`` trains it; tests and benchmarks build it at random.
"""

from __future__ import annotations

from typing import Any

from . import video_data as D

__all__ = ["SIZES", "make_model"]

# (vision layers, vision width, text layers, text width)
SIZES: dict[str, tuple[int, int, int, int]] = {"base": (2, 64, 6, 128), "tiny": (1, 32, 1, 32)}


def make_model(size: str | tuple[int, int, int, int] = "base") -> Any:
    """CLIP vision tower (patch 4 on 32×32 -> 64 tokens, CLS dropped) + LLaVA MLP projector + 2×2 pooling
    (16 tokens a frame) + Llama (vocabulary: the tokenizer's, rounded up to a multiple of 8), sdpa attention."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    tok = D.build_tokenizer()
    vocab_size = -(-len(tok) // 8) * 8
    v_layers, dv, t_layers, d = SIZES[size] if isinstance(size, str) else size  # or (vision layers, dv, text layers, d)
    vision = CLIPVisionConfig(hidden_size=dv, intermediate_size=4 * dv, num_hidden_layers=v_layers,
                              num_attention_heads=max(1, dv // 32), image_size=D.FRAME_SIZE, patch_size=D.PATCH,
                              num_channels=3, projection_dim=dv, hidden_act="gelu")
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=t_layers,
                       num_attention_heads=max(1, d // 32), num_key_value_heads=max(1, d // 32),
                       max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids(D.IMAGE_TOKEN),
                               video_token_index=tok.convert_tokens_to_ids(D.VIDEO_TOKEN),
                               vision_feature_select_strategy="default", vision_feature_layer=-1,
                               projector_hidden_act="gelu", image_grid_pinpoints=[[D.FRAME_SIZE, D.FRAME_SIZE]],
                               tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model
