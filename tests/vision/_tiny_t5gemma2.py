"""A tiny random T5Gemma 2 (SigLIP + Gemma-3-style encoder-decoder) built from configs, and prompt
batches for it (CPU, float32): MuE's second encoder-decoder family.

A 16x16 image in 4x4 patches pools to ``N_IMAGE`` = 4 image tokens. Prompts are BOS, the image
tokens, the text and EOS. Encoder positions are 0..N-1 whatever the padding (rotary, not
padding-aware), so only a right-padded batch gives each row what it gives alone. Layers alternate
sliding-window (8) and full attention, as T5Gemma 2 does.
"""

from __future__ import annotations

import torch
from mmskip.vision.mue import MuEConfig
from transformers import SiglipVisionConfig, T5Gemma2Config, T5Gemma2ForConditionalGeneration
from transformers.models.t5gemma2.configuration_t5gemma2 import (
    T5Gemma2DecoderConfig,
    T5Gemma2EncoderConfig,
    T5Gemma2TextConfig,
)

PAD, EOS, BOS, IMAGE_TOKEN, EOI = 0, 1, 2, 99, 100
IMAGE_SIZE = 16
N_IMAGE = 4  # (16 / 4)^2 patches pooled 2x2
# MuE thresholds inside this model's cosine range (encoder ~0.5-0.93, decoder ~0.6-0.86 after layer 2)
EXITS = MuEConfig(image_threshold=0.85, text_threshold=0.8, decoder_threshold=0.8, decay=0.99, floor=0.75)


def tiny_t5gemma2(layers: int = 4, seed: int = 0, attn: str = "sdpa", std: float = 0.1) -> T5Gemma2ForConditionalGeneration:
    """Tiny random T5Gemma 2: a 1-layer SigLIP (16 wide) and a 32-wide encoder and decoder of
    ``layers`` layers each (2 query heads, 1 K/V head); greedy generation never stops early (no
    EOS). The 2-D weights are redrawn with ``std`` (0.1) so successive hidden states differ
    (cosines well below 1) and thresholds can separate tokens."""
    torch.manual_seed(seed)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2),
                max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                dropout_rate=0.0, attention_dropout=0.0)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=4)
    encoder = T5Gemma2EncoderConfig(text_config=T5Gemma2TextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=N_IMAGE, eoi_token_index=EOI, image_token_index=IMAGE_TOKEN)
    cfg = T5Gemma2Config(encoder=encoder.to_dict(), decoder=T5Gemma2DecoderConfig(**text).to_dict(),
                         image_token_index=IMAGE_TOKEN, eoi_token_index=EOI)
    cfg._attn_implementation = attn
    model = T5Gemma2ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the projector starts at zero (image tokens would all be equal): redraw it too
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def t5gemma2_prompts(text_lens: tuple[int, ...] = (6, 3, 1), seed: int = 1,
                     with_image: bool = True) -> dict[str, torch.Tensor]:
    """One image per row: BOS, ``N_IMAGE`` image tokens, ``n`` random text tokens, EOS; right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in text_lens:
        text = torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=g).tolist()
        rows.append([BOS] + ([IMAGE_TOKEN] * N_IMAGE if with_image else []) + text + [EOS])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if with_image:
        out["pixel_values"] = torch.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return out
