"""A tiny random Florence-2 (DaViT + BART) built from configs, and prompt batches for it (CPU, float32).

A 32x32 image gives ``N_IMAGE`` = 17 image tokens (a 4x4 grid after two DaViT stages, plus the
pooled spatial token). Prompts are laid out as Florence-2's processor does: the image tokens,
then BOS, the text and EOS; its BART tokenizer pads on the right. BART's encoder positions are
absolute (0..N-1, not padding-aware), so only a right-padded batch gives each row what it gives
alone; ``florence_prompts(padding="left")`` exists to show that exits never couple rows.
"""

from __future__ import annotations

import torch
from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration
from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

IMAGE_TOKEN, BOS, PAD, EOS = 99, 0, 1, 2
IMAGE_SIZE = 32
N_IMAGE = 17  # (32 / 4 / 2)^2 patches + 1 pooled token


def tiny_florence(encoder_layers: int = 4, decoder_layers: int = 4, seed: int = 0, attn: str = "sdpa",
                  std: float = 0.1) -> Florence2ForConditionalGeneration:
    """Tiny random Florence-2: a 2-stage DaViT (16/32 channels) and a 32-wide BART; greedy
    generation never stops early (no EOS).

    BART's default init (std 0.02) makes every layer nearly the identity (successive hidden
    states at cosine ~0.9999, greedy output one repeated token); the BART weight matrices are
    redrawn with ``std`` (0.1: cosines ~0.85-0.97, varied tokens) so thresholds can separate
    tokens and rows."""
    torch.manual_seed(seed)
    vision = Florence2VisionConfig(
        depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1), patch_prenorm=(False, True),
        embed_dim=(16, 32), num_heads=(1, 2), num_groups=(1, 2), window_size=2, drop_path_rate=0.0,
        projection_dim=32, max_position_embeddings=16, max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=100, d_model=32, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=96, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    cfg._attn_implementation = attn
    model = Florence2ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the embeddings are tied to the LM head
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def florence_prompts(text_lens: tuple[int, ...] = (6, 3, 1), padding: str = "right", seed: int = 1,
                     with_image: bool = True) -> dict[str, torch.Tensor]:
    """One image per row: ``N_IMAGE`` image tokens, BOS, ``n`` random text tokens, EOS; padded with
    ``PAD`` on the ``padding`` side to one width."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in text_lens:
        text = torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=g).tolist()
        rows.append(([IMAGE_TOKEN] * N_IMAGE if with_image else []) + [BOS] + text + [EOS])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        at = slice(0, len(r)) if padding == "right" else slice(width - len(r), width)
        ids[i, at] = torch.tensor(r)
        mask[i, at] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if with_image:
        out["pixel_values"] = torch.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return out


def row(batch: dict[str, torch.Tensor], i: int, trim: bool = True) -> dict[str, torch.Tensor]:
    """Row ``i`` of a batch alone; ``trim`` drops its padding (right-padded batches only)."""
    out = {k: v[i: i + 1] for k, v in batch.items()}
    if trim:
        n = int(out["attention_mask"].sum())
        out["input_ids"], out["attention_mask"] = out["input_ids"][:, :n], out["attention_mask"][:, :n]
    return out
