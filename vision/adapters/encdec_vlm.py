"""Registry adapters (kind ``"encdec-vlm"``) for encoder-decoder vision-language models: Florence-2.

An :class:`EncDecVLMAdapter` says where an encoder-decoder VLM keeps what MuE early exits need:
the module whose ``get_placeholder_mask`` finds the image tokens (called in a plain forward and
inside ``generate``, where the encoder runs in ``_maybe_prepare_encoder_kwargs_for_generation``),
the unified encoder's layers (image and text tokens together), the decoder's layers and their
self-attention K/V projections (for the KV rule of exited tokens), the LM head, and the FLOPs
per token of each part. Registered when ``mmskip.vision.adapters`` is imported (importing
``mmskip.vision`` does it); an unsupported model raises :class:`mmskip.UnsupportedModelError`.

Checked on transformers 5.24 with a tiny random model: ``Florence2ForConditionalGeneration``
holds ``model`` (``Florence2Model``) whose ``language_model`` is a ``BartModel``: encoder layers
at ``model.model.language_model.encoder.layers`` (``BartEncoderLayer``, post-LN), decoder layers
at ``.decoder.layers`` (``BartDecoderLayer``), KV cache ``EncoderDecoderCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmskip.registry import UnsupportedModelError, register

__all__ = ["EncDecVLMAdapter", "UnsupportedLanguageModelError"]

_ENCODER_LAYER_PARTS = ("self_attn", "fc1", "fc2")
_DECODER_LAYER_PARTS = ("self_attn", "encoder_attn", "fc1", "fc2")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "layer_idx")


class UnsupportedLanguageModelError(UnsupportedModelError):
    """The encoder-decoder VLM class is known but its language model is not a supported (BART) one."""

    def __init__(self, model: nn.Module, text: nn.Module, why: str) -> None:
        TypeError.__init__(
            self,
            f"mmskip MuE supports {type(model).__name__} only with a BART language model (post-LN "
            f"BartEncoderLayer / BartDecoderLayer with self_attn.q_proj/k_proj/v_proj/out_proj, fc1, fc2); "
            f"this one has {type(text).__name__}: {why}",
        )


def _linear_flops(*modules: nn.Module) -> float:
    """2 x multiply-adds per token of the ``nn.Linear`` weights in ``modules``."""
    return float(sum(2 * m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear)))


@dataclass
class EncDecVLMAdapter:
    """Where things are in an encoder-decoder VLM (Florence-2). One instance per model."""

    model: nn.Module  # what the user applied the technique to
    mm_model: nn.Module  # the module with get_placeholder_mask (Florence2Model)
    encoder: nn.Module  # the unified encoder over image + text tokens (BartEncoder)
    decoder: nn.Module  # the autoregressive decoder (BartDecoder)
    head: nn.Module | None
    image_token_id: int

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_encoder_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.layers)

    # -- the decoder's self-attention K/V (the KV rule for exited tokens) --------------------------
    def cache_index(self, i: int) -> int:
        """The KV-cache layer index of decoder layer ``i``."""
        return int(self.decoder.layers[i].self_attn.layer_idx)

    def self_kv(self, i: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer ``i``'s self-attention keys and values for ``hidden`` (batch, q, d) as the
        layer itself computes them: BART is post-LN, so its attention reads the layer input as is.
        Shapes (batch, heads, q, head_dim), the KV cache's layout."""
        attn = self.decoder.layers[i].self_attn
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        return k, v

    # -- FLOPs per token (2 x multiply-adds of the weight matmuls; attention scores excluded) --------
    def encoder_costs(self, i: int) -> tuple[float, float]:
        """(K/V projections, the rest: Q + output projection + FFN) of encoder layer ``i``."""
        layer = self.encoder.layers[i]
        a = layer.self_attn
        return _linear_flops(a.k_proj, a.v_proj), _linear_flops(a.q_proj, a.out_proj, layer.fc1, layer.fc2)

    def decoder_costs(self, i: int) -> tuple[float, float]:
        """(self-attention K/V projections, the rest: self Q/out + cross Q/out + FFN) of decoder layer
        ``i`` per decoder token. The cross-attention K/V over the encoder states are computed once per
        generation (cached) and not counted here."""
        layer = self.decoder.layers[i]
        s, c = layer.self_attn, layer.encoder_attn
        rest = _linear_flops(s.q_proj, s.out_proj, c.q_proj, c.out_proj, layer.fc1, layer.fc2)
        return _linear_flops(s.k_proj, s.v_proj), rest

    def head_flops(self) -> float:
        return _linear_flops(self.head) if self.head is not None else 0.0


def _check(model: nn.Module, text: nn.Module, encoder: nn.Module, decoder: nn.Module) -> None:
    for stack, parts, what in ((encoder, _ENCODER_LAYER_PARTS, "encoder"), (decoder, _DECODER_LAYER_PARTS, "decoder")):
        layers = getattr(stack, "layers", None)
        if layers is None or len(layers) == 0:
            raise UnsupportedLanguageModelError(model, text, f"its {what} has no layers")
        layer = layers[0]
        for part in parts:
            if not hasattr(layer, part):
                raise UnsupportedLanguageModelError(model, text, f"its {what} layer has no {part!r}")
        for part in _ATTN_PARTS:
            if not hasattr(layer.self_attn, part):
                raise UnsupportedLanguageModelError(model, text, f"its {what} self-attention has no {part!r}")
        if getattr(stack, "layer_norm", None) is not None:  # mBART-style pre-LN stacks: K/V read a normed input
            raise UnsupportedLanguageModelError(model, text, f"its {what} is pre-LN (has a final layer_norm)")


@register("Florence2ForConditionalGeneration", "Florence2Model", kind="encdec-vlm")
def _florence2(model: nn.Module) -> EncDecVLMAdapter:
    mm = model if hasattr(model, "language_model") and hasattr(model, "vision_tower") else model.model
    text = mm.language_model
    encoder, decoder = getattr(text, "encoder", None), getattr(text, "decoder", None)
    if encoder is None or decoder is None:
        raise UnsupportedLanguageModelError(model, text, "it has no encoder/decoder")
    _check(model, text, encoder, decoder)
    return EncDecVLMAdapter(
        model=model, mm_model=mm, encoder=encoder, decoder=decoder, head=getattr(model, "lm_head", None),
        image_token_id=int(model.config.image_token_id),
    )
