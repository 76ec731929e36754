"""``digits-llava``'s architecture: a tiny ``LlavaForConditionalGeneration``, untrained.

``recipes/llava.py`` trains it; tests and benchmarks build it at random.
"""

from __future__ import annotations

from typing import Any

from . import llava_data as D

__all__ = ["SIZES", "make_model"]

# (vision layers, text layers, width); the p-MoD technique needs >= 8 decoder layers
SIZES: dict[str, tuple[int, int, int]] = {"base": (4, 8, 128), "tiny": (1, 2, 32)}


def make_model(size: str = "base") -> Any:
    """CLIP vision tower (patch 4 on 32×32 -> 64 tokens, CLS dropped) + LLaVA MLP projector + Llama
    (vocabulary: the tokenizer's, rounded up to a multiple of 8)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = D.build_tokenizer()
    vocab_size = -(-len(tok) // 8) * 8
    v_layers, t_layers, d = SIZES[size]
    heads = max(1, d // 32)
    vision = CLIPVisionConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=v_layers,
                              num_attention_heads=heads, image_size=D.IMAGE_SIZE, patch_size=D.PATCH,
                              num_channels=3, projection_dim=d, hidden_act="gelu")
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=t_layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(D.IMAGE_TOKEN),
                      image_seq_length=D.N_IMAGE_TOKENS, vision_feature_select_strategy="default",
                      vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model
