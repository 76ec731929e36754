"""``digits-florence``'s architecture: a tiny ``Florence2ForConditionalGeneration``, untrained.

``recipes/florence.py`` trains it (with MuE's layer-wise loss); tests and benchmarks build it at random.
"""

from __future__ import annotations

from typing import Any

from . import florence_data as D

__all__ = ["SIZES", "MAX_NEW_TOKENS", "make_model"]

# (encoder layers, decoder layers, d_model, DaViT stage widths)
SIZES: dict[str, tuple[int, int, int, tuple[int, int]]] = {"base": (4, 4, 128, (32, 64)), "tiny": (2, 2, 32, (8, 16))}
MAX_NEW_TOKENS = 12  # the generation config's default


def make_model(size: str = "base") -> Any:
    """DaViT (2 stages, 3×3 stride-2 convs: an 8×24 strip -> 2×6 tokens + 1 pooled) + BART (post-LN, tied
    embeddings/LM head); vocabulary: the tokenizer's, rounded up to a multiple of 8."""
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    tok = D.build_tokenizer()
    enc, dec, d, widths = SIZES[size]
    heads = max(1, d // 32)
    vision = Florence2VisionConfig(
        depths=(1, 1), patch_size=(3, 3), patch_stride=(2, 2), patch_padding=(1, 1), patch_prenorm=(False, True),
        embed_dim=widths, num_heads=(1, 2), num_groups=(1, 2), window_size=2, drop_path_rate=0.0,
        projection_dim=d, max_position_embeddings=8, max_temporal_embeddings=1)
    text = BartConfig(
        vocab_size=-(-len(tok) // 8) * 8, d_model=d, encoder_layers=enc, decoder_layers=dec,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None,
        forced_bos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    cfg = Florence2Config(vision_config=vision, text_config=text,
                          image_token_id=tok.convert_tokens_to_ids(D.IMAGE_TOKEN))
    model = Florence2ForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.decoder_start_token_id = tok.eos_token_id
    gc.forced_eos_token_id = gc.forced_bos_token_id = None
    gc.max_new_tokens = MAX_NEW_TOKENS
    return model
