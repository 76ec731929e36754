"""The vision section of ``gpu_campaign.py``: p-MoD, VideoLLM-MoD and MuE at real widths, random weights.

* **LLaVA-OneVision-shaped**: SigLIP-so400m/14 at 384 px (hidden 1152, 4 of 27 layers: the tower runs
  the same in both arms) and a Qwen2-7B-wide decoder (hidden 3584, 28 heads, 4 KV heads, intermediate
  18944, vocab 152064) with ``--vision-layers`` layers. One 384x384 image in the anyres layout =
  729 base + 729 crop + 27 newline tokens; a video frame = 27x27 patches pooled to 14x14 = 196 tokens.
  Prefill (one forward over the prompt) of plain vs p-MoD (``MoDConfig()``) on the image prompt and
  VideoLLM-MoD (``VideoMoDConfig()``) on ``--vision-frames`` frames, batch 1; FLOPs bound = 1 /
  ``prefill_flops_fraction``.
* **Florence-2-large-shaped**: DaViT (256/512/1024/2048 channels, depths 1/1/9/1) at 768 px = 577
  image tokens, BART-large (d=1024, 12 + 12 layers); greedy generation of 16 tokens, plain vs
  ``MuEConfig()``; bound = layer-tokens over layer-tokens run (encoder + decoder layers only).

Timing: ``device_check._paired_on_copy`` (the technique applied once on a copy; paired, interleaved).
The smoke run builds the same architectures at tiny widths (as ``tests/vision/_tiny*.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from _campaign_rows import Context, host_sync, timing_fields
from device_check import _paired_on_copy
from mmskip.vision import MoDConfig, MuEConfig, VideoMoDConfig

import mmskip

__all__ = ["run"]


def onevision(ctx: Context) -> tuple[torch.nn.Module, dict[str, int]]:
    """A LLaVA-OneVision built from configs on the device, and its geometry (image side, patch, token ids)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if ctx.smoke:
        geo = dict(image=16, patch=4, vocab=160)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=16, patch_size=4, vision_use_head=False)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    else:
        geo = dict(image=384, patch=14, vocab=152064)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=4,
                                    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
    geo.update(image_token=geo["vocab"] - 2, video_token=geo["vocab"] - 3)
    qwen = Qwen2Config(num_hidden_layers=ctx.args.vision_layers, vocab_size=geo["vocab"], max_position_embeddings=32768,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None, **text)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=qwen, image_token_index=geo["image_token"],
                               video_token_index=geo["video_token"], image_grid_pinpoints=[[geo["image"]] * 2],
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    with ctx.device:
        model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=ctx.dtype).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model, geo


def _text(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab - 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image_prompt(geo: dict[str, int], ctx: Context) -> dict[str, torch.Tensor]:
    """Text, one image (base + one anyres crop + a newline per crop row), text."""
    side = geo["image"] // geo["patch"]
    n = 2 * side * side + side
    ids = _text(16, geo["vocab"], 1) + [geo["image_token"]] * n + _text(8, geo["vocab"], 2)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 2, 3, geo["image"], geo["image"], generator=g)
    return {"input_ids": torch.tensor([ids], device=ctx.device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=ctx.device),
            "pixel_values": pixels.to(ctx.device, ctx.dtype),
            "image_sizes": torch.tensor([[geo["image"]] * 2], device=ctx.device)}


def video_prompt(geo: dict[str, int], frames: int, ctx: Context) -> dict[str, torch.Tensor]:
    """Text, one video (each frame's patch grid pooled 2x2, one newline after the video), text."""
    pooled = math.ceil(geo["image"] // geo["patch"] / 2)
    n = frames * pooled * pooled + 1
    ids = _text(16, geo["vocab"], 4) + [geo["video_token"]] * n + _text(8, geo["vocab"], 5)
    pixels = torch.randn(1, frames, 3, geo["image"], geo["image"], generator=torch.Generator().manual_seed(6))
    return {"input_ids": torch.tensor([ids], device=ctx.device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=ctx.device),
            "pixel_values_videos": pixels.to(ctx.device, ctx.dtype)}


def _prefill_row(ctx: Context, model: torch.nn.Module, shape: str, technique: str, config: mmskip.SkipConfig,
                 inputs: dict[str, torch.Tensor]) -> None:
    def prefill(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(**inputs).logits[:, -1].float()

    def measure() -> dict[str, Any]:
        t, plain, skipped, stats = _paired_on_copy(model, config, prefill, ctx.repeats)
        frac = stats.get("prefill_flops_fraction")
        with mmskip.applied(model, config):
            sync = host_sync(lambda: prefill(model), ctx.device)
        cos = float(torch.nn.functional.cosine_similarity(plain, skipped, dim=-1).mean())
        return {**timing_fields(t), "flops_bound": 1 / frac if frac else None, "kv_fraction": stats.get("kv_fraction"),
                "tokens": int(inputs["input_ids"].shape[1]), "last_logits_cosine": cos, "host_sync": sync}

    ctx.attempt(shape, technique, 1, "eager", measure, need_s=5.0)


def florence(ctx: Context) -> tuple[torch.nn.Module, dict[str, int]]:
    """A Florence-2 built from configs on the device (large widths, or tiny with ``--smoke``) and its geometry."""
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    if ctx.smoke:
        geo = dict(image=32, vocab=100, n_image=17)
        vision = Florence2VisionConfig(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                                       patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(1, 2),
                                       num_groups=(1, 2), window_size=2, projection_dim=32, max_position_embeddings=16,
                                       max_temporal_embeddings=4, drop_path_rate=0.0)
        bart = dict(d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=96)
    else:  # Florence-2-large
        geo = dict(image=768, vocab=51289, n_image=577)
        vision = Florence2VisionConfig(embed_dim=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64),
                                       num_groups=(8, 16, 32, 64), depths=(1, 1, 9, 1), window_size=12,
                                       projection_dim=1024, drop_path_rate=0.0)
        bart = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024)
    geo["image_token"] = geo["vocab"] - 1
    text = BartConfig(vocab_size=geo["vocab"], pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                      forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **bart)
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=geo["image_token"])
    torch.manual_seed(0)
    with ctx.device:
        model = Florence2ForConditionalGeneration._from_config(cfg, dtype=ctx.dtype).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.forced_eos_token_id, gc.pad_token_id = None, None, 1
    return model, geo


def _mue_row(ctx: Context, batch: int) -> None:
    def measure() -> dict[str, Any]:
        model, geo = florence(ctx)
        ids = [[geo["image_token"]] * geo["n_image"] + [0] + _text(8, geo["vocab"] - 1, 7 + i) + [2]
               for i in range(batch)]
        inputs = {"input_ids": torch.tensor(ids, device=ctx.device),
                  "attention_mask": torch.ones(batch, len(ids[0]), dtype=torch.long, device=ctx.device),
                  "pixel_values": torch.randn(batch, 3, geo["image"], geo["image"],
                                              generator=torch.Generator().manual_seed(8)).to(ctx.device, ctx.dtype)}
        n = 3 if ctx.smoke else 16

        def gen(m: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        config = MuEConfig()
        t, plain, out, stats = _paired_on_copy(model, config, gen, ctx.repeats)
        enc, dec = stats["encoder"], stats["decoder"]
        total = sum(enc[k]["layer_tokens"] for k in ("image", "text")) + dec["layer_tokens"]
        run = sum(enc[k]["run"] for k in ("image", "text")) + dec["run"]
        start = torch.full((batch, 1), 2, dtype=torch.long, device=ctx.device)
        with mmskip.applied(model, config):
            sync = host_sync(lambda: model(**inputs, decoder_input_ids=start), ctx.device)
        return {**timing_fields(t), "flops_bound": total / run if run else None,
                "bound_kind": "encoder + decoder layer-tokens (vision tower and LM head excluded)",
                "mean_exit_layer": {"image": enc["image"]["mean_exit_layer"], "text": enc["text"]["mean_exit_layer"],
                                    "decoder": dec["mean_exit_layer"]},
                "agreement_with_plain": float((plain == out).float().mean()), "host_sync": sync,
                "note": "random weights: where tokens exit depends on the random model's cosines"}

    shape = "Florence-2-large-shaped" if not ctx.smoke else "tiny Florence-2"
    ctx.attempt(shape, "MuE (default thresholds)", batch, "eager", measure, need_s=10.0)


def _onevision_rows(ctx: Context) -> None:
    model, geo = onevision(ctx)
    shape = (f"{'tiny' if ctx.smoke else 'LLaVA-OneVision-7B-shaped'} OneVision, {ctx.args.vision_layers} decoder "
             f"layers, d={model.config.text_config.hidden_size}")
    print(f"[vision] {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params", flush=True)
    image = image_prompt(geo, ctx)
    ctx.attempt(shape, "plain", 1, "eager",
                lambda: {"host_sync": host_sync(lambda: model(**image), ctx.device),
                         "tokens": int(image["input_ids"].shape[1])})
    _prefill_row(ctx, model, shape, "p-MoD (default: progressive, attention)", MoDConfig(), image)
    for frames in ctx.args.vision_frames:
        _prefill_row(ctx, model, f"{shape}, {frames} frames", "VideoLLM-MoD (default: r=0.2)", VideoMoDConfig(),
                     video_prompt(geo, frames, ctx))


def run(ctx: Context) -> None:
    """p-MoD on an image, VideoLLM-MoD per frame count, then MuE."""
    try:
        _onevision_rows(ctx)
    except Exception as err:  # building the model failed: MuE still runs
        ctx.row("LLaVA-OneVision-shaped", "(build)", 1, "eager", error=f"{type(err).__name__}: {str(err)[:400]}")
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    for batch in (1,) if ctx.smoke else (1, 8):
        _mue_row(ctx, batch)
