"""Registry adapters (kind ``"vlm"``) for transformers' vision-language models.

A :class:`VLMAdapter` says where a multimodal model's parts are: the module that receives
``input_ids`` (where vision-token positions are read: decoder layers never see ids), the
language model's decoder adapter (layers, attention, MLP, FLOPs per token) and the LM head.
Registered on ``import mmskip.vision``; an unsupported model raises
:class:`mmskip.UnsupportedModelError`.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_layers(self) -> int:
        return self.text.num_layers

    def vision_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq) bool: True at vision-token (image/video placeholder) positions."""
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for t in self.vision_token_ids:
                mask |= input_ids == t
            return mask
        if inputs_embeds is None:
            raise ValueError("mmskip.vision: the model was called without input_ids or inputs_embeds")
        embed = self.mm_model.get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:-1], dtype=torch.bool, device=inputs_embeds.device)
        for t in self.vision_token_ids:  # what transformers' get_placeholder_mask does without ids
            ref = embed(torch.full((), t, dtype=torch.long, device=inputs_embeds.device))
            mask |= (inputs_embeds == ref).all(-1)
        return mask


def _check_layers(model: nn.Module, text_model: nn.Module, text: DecoderAdapter) -> None:
    layer = text.layers[0]
    for part in _LAYER_PARTS:
        if not hasattr(layer, part):
            raise UnsupportedTextModelError(model, text_model, f"its decoder layer has no {part!r}")
    for part in _ATTN_PARTS:
        if not hasattr(layer.self_attn, part):
            raise UnsupportedTextModelError(model, text_model, f"its attention has no {part!r}")


def _llava_like(model: nn.Module, token_attrs: tuple[str, ...]) -> VLMAdapter:
    mm = model if hasattr(model, "language_model") and hasattr(model, "vision_tower") else model.model
    text_model = mm.language_model
    try:
        text = get_adapter(text_model, "decoder")
    except UnsupportedModelError as err:
        raise UnsupportedTextModelError(model, text_model, str(err)) from None
    _check_layers(model, text_model, text)
    ids = tuple(int(getattr(model.config, a)) for a in token_attrs if getattr(model.config, a, None) is not None)
    if not ids:
        raise UnsupportedModelError(model, "vlm")
    return VLMAdapter(model=model, mm_model=mm, text=text, head=getattr(model, "lm_head", None), vision_token_ids=ids)


@register("LlavaForConditionalGeneration", "LlavaModel", kind="vlm")
def _llava(model: nn.Module) -> VLMAdapter:
    return _llava_like(model, ("image_token_id",))


@register("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel", kind="vlm")
def _llava_onevision(model: nn.Module) -> VLMAdapter:
    return _llava_like(model, ("image_token_id", "video_token_id"))
