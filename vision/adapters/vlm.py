"""Registry adapters (kind ``"vlm"``) for transformers' vision-language models.

A :class:`VLMAdapter` says where a multimodal model's parts are: the module that receives
``input_ids`` (where vision-token positions are read: decoder layers never see ids), the
language model's decoder adapter (layers, attention, MLP, FLOPs per token) and the LM head.
Registered on ``import mmskip.vision``; an unsupported model raises
:class:`mmskip.UnsupportedModelError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmskip.registry import DecoderAdapter, UnsupportedModelError, get_adapter, register

__all__ = ["VLMAdapter", "UnsupportedTextModelError"]

# what a decoder layer must have for vision-token skipping (Llama / Mistral / Qwen2 / Gemma style)
_LAYER_PARTS = ("input_layernorm", "self_attn", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "head_dim", "scaling")


class UnsupportedTextModelError(UnsupportedModelError):
    """The multimodal class is known but its language model is not a supported decoder."""

    def __init__(self, model: nn.Module, text: nn.Module, why: str) -> None:
        TypeError.__init__(
            self,
            f"mmskip.vision supports {type(model).__name__} only with a Llama-style language model "
            f"(decoder layers with input_layernorm, self_attn.q_proj/k_proj and mlp); this one has "
            f"{type(text).__name__}: {why}",
        )


@dataclass
class VLMAdapter:
    """Where things are in a transformers vision-language model. One instance per model."""

    model: nn.Module  # what the user applied the technique to
    mm_model: nn.Module  # the module whose forward receives input_ids (LlavaModel & co)
    text: DecoderAdapter  # the language model's decoder (layers, attention, MLP)
    head: nn.Module | None
    vision_token_ids: tuple[int, ...]
    video_token_ids: tuple[int, ...] = ()
    # the frame layout of the videos in a forward's arguments, in order: (tokens per frame,
    # frames, trailing tokens after the frames); None on image-only models
    video_layout: Callable[[dict[str, Any]], list[tuple[int, int, int]] | None] | None = None
    frames_in_positions: bool = False  # M-RoPE: position_ids[-3] is each token's temporal position

    @property
    def num_layers(self) -> int:
        return self.text.num_layers

    @property
    def takes_video(self) -> bool:
        return self.video_layout is not None and bool(self.video_token_ids)

    def vision_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, video_only: bool = False
    ) -> torch.Tensor:
        """(batch, seq) bool: True at vision-token (image/video placeholder) positions."""
        ids = self.video_token_ids if video_only else self.vision_token_ids
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for t in ids:
                mask |= input_ids == t
            return mask
        if inputs_embeds is None:
            raise ValueError("mmskip.vision: the model was called without input_ids or inputs_embeds")
        embed = self.mm_model.get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:-1], dtype=torch.bool, device=inputs_embeds.device)
        for t in ids:  # what transformers' get_placeholder_mask does without ids
            ref = embed(torch.full((), t, dtype=torch.long, device=inputs_embeds.device))
            mask |= (inputs_embeds == ref).all(-1)
        return mask

    def frame_groups(self, arguments: dict[str, Any], video: torch.Tensor) -> torch.Tensor:
        """(batch, seq) long: a frame id at each video token that belongs to a frame, -1 elsewhere
        (text, images, a video's trailing separator). ``video`` is the video-token mask; videos
        fill it in row-major order, as transformers scatters their features."""
        groups = torch.full(video.shape, -1, dtype=torch.long)
        n = int(video.sum())
        if n == 0:
            return groups.to(video.device)
        layout = self.video_layout(arguments) if self.video_layout is not None else None
        if not layout and self.frames_in_positions:
            positions = arguments.get("position_ids")
            if isinstance(positions, torch.Tensor) and positions.dim() == 3:
                # M-RoPE: a frame's tokens share one temporal position, distinct from every other
                # frame of the row (what generate passes once the features are precomputed)
                temporal = positions[-3].expand(video.shape).to(video.device)
                return torch.where(video, temporal.long(), -1)
        if not layout:
            raise ValueError(
                f"mmskip VideoMoD: {n} video tokens but no video frames in this call ({type(self.model).__name__} "
                "needs pixel_values_videos / video_grid_thw with the tokens); pass the clip's pixels with its tokens"
            )
        parts, frame = [], 0
        for per_frame, frames, trailing in layout:
            parts.append(torch.arange(frame, frame + frames).repeat_interleave(per_frame))
            parts.append(torch.full((trailing,), -1, dtype=torch.long))
            frame += frames
        flat = torch.cat(parts)
        if flat.numel() != n:
            raise ValueError(
                f"mmskip VideoMoD: the videos' frames account for {flat.numel()} tokens but the prompt has {n} video "
                "tokens; build the prompt with the processor that belongs to the model"
            )
        groups[video.cpu()] = flat
        return groups.to(video.device)


def _check_layers(model: nn.Module, text_model: nn.Module, text: DecoderAdapter) -> None:
    layer = text.layers[0]
    for part in _LAYER_PARTS:
        if not hasattr(layer, part):
            raise UnsupportedTextModelError(model, text_model, f"its decoder layer has no {part!r}")
    for part in _ATTN_PARTS:
        if not hasattr(layer.self_attn, part):
            raise UnsupportedTextModelError(model, text_model, f"its attention has no {part!r}")


def _llava_like(
    model: nn.Module, token_attrs: tuple[str, ...], video_attr: str | None = None,
    video_layout: Callable[[dict[str, Any]], list[tuple[int, int, int]] | None] | None = None,
) -> VLMAdapter:
    towers = ("vision_tower", "visual")  # LLaVA family / Qwen-VL
    mm = model if hasattr(model, "language_model") and any(hasattr(model, t) for t in towers) else model.model
    text_model = mm.language_model
    try:
        text = get_adapter(text_model, "decoder")
    except UnsupportedModelError as err:
        raise UnsupportedTextModelError(model, text_model, str(err)) from None
    _check_layers(model, text_model, text)
    ids = tuple(int(getattr(model.config, a)) for a in token_attrs if getattr(model.config, a, None) is not None)
    if not ids:
        raise UnsupportedModelError(model, "vlm")
    video = getattr(model.config, video_attr, None) if video_attr else None
    return VLMAdapter(
        model=model, mm_model=mm, text=text, head=getattr(model, "lm_head", None), vision_token_ids=ids,
        video_token_ids=() if video is None else (int(video),), video_layout=video_layout if video is not None else None,
    )


@register("LlavaForConditionalGeneration", "LlavaModel", kind="vlm")
def _llava(model: nn.Module) -> VLMAdapter:
    return _llava_like(model, ("image_token_id",))


@register("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel", kind="vlm")
def _llava_onevision(model: nn.Module) -> VLMAdapter:
    vision = model.config.vision_config
    side = math.ceil(vision.image_size // vision.patch_size / 2)  # features are pooled 2x2 per frame

    def layout(arguments: dict[str, Any]) -> list[tuple[int, int, int]] | None:
        # each video: frames x (pooled tokens), then one image_newline token
        pixels = arguments.get("pixel_values_videos")
        if pixels is not None:
            return [(side * side, int(pixels.shape[1]), 1)] * int(pixels.shape[0])
        encoded = (arguments.get("mm_encoder_outputs") or {}).get("video")  # generate precomputes features
        if encoded is None:
            return None
        videos, tokens = encoded.pooler_output.shape[:2]
        return [(side * side, (int(tokens) - 1) // (side * side), 1)] * int(videos)

    return _llava_like(model, ("image_token_id", "video_token_id"), "video_token_id", layout)


def _qwen_vl(model: nn.Module) -> VLMAdapter:
    merge = int(model.config.vision_config.spatial_merge_size)

    def layout(arguments: dict[str, Any]) -> list[tuple[int, int, int]] | None:
        grid = arguments.get("video_grid_thw")
        if grid is None:
            return None
        # each video: t temporal patches (2 frames each) of h*w/merge^2 tokens
        return [(int(h) * int(w) // (merge * merge), int(t), 0) for t, h, w in grid.tolist()]

    adapter = _llava_like(model, ("image_token_id", "video_token_id"), "video_token_id", layout)
    adapter.frames_in_positions = True
    return adapter


register("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
         kind="vlm")(_qwen_vl)
