"""Registry adapters (kind ``"encdec-vlm"``) for encoder-decoder vision-language models: Florence-2
here, T5Gemma 2 in :mod:`.t5gemma2`.

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

:class:`EncDecVLMAdapter` declares what MuE's hooks ask of a family (where the placeholder mask,
the layers and the cache are; how a packed encoder layer is called; a decoder layer's K/V of a
hidden state); :class:`BartEncDecAdapter` answers for Florence-2's post-LN BART.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmskip.registry import UnsupportedModelError, register

__all__ = ["EncDecVLMAdapter", "BartEncDecAdapter", "UnsupportedLanguageModelError", "gather_rows"]

_ENCODER_LAYER_PARTS = ("self_attn", "fc1", "fc2")
_DECODER_LAYER_PARTS = ("self_attn", "encoder_attn", "fc1", "fc2")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "layer_idx")


class UnsupportedLanguageModelError(UnsupportedModelError):
    """The encoder-decoder VLM class is known but its language model is not the layout its adapter reads."""

    _BART = ("a BART language model (post-LN BartEncoderLayer / BartDecoderLayer with "
             "self_attn.q_proj/k_proj/v_proj/out_proj, fc1, fc2)")

    def __init__(self, model: nn.Module, text: nn.Module, why: str, expected: str = _BART) -> None:
        TypeError.__init__(
            self,
            f"mmskip MuE supports {type(model).__name__} only with {expected}; this one has "
            f"{type(text).__name__}: {why}",
        )


def _linear_flops(*modules: nn.Module) -> float:
    """2 x multiply-adds per token of the ``nn.Linear`` weights in ``modules``."""
    return float(sum(2 * m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear)))


def gather_rows(mask: Any, idx: torch.Tensor) -> Any:
    """A 4-D attention mask restricted to the query rows ``idx`` (B, P); the keys stay. Packed
    encoder queries need the sdpa / eager masks (tensors)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mmskip MuE packs encoder queries and supports the sdpa / eager masks (tensors), got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        raise TypeError(
            "mmskip MuE: a padded batch under flash attention (2-D mask) cannot pack encoder queries; load the model "
            "with attn_implementation='sdpa' or 'eager', or do not pad"
        )
    if mask.dim() != 4:
        raise TypeError(f"mmskip MuE: unexpected encoder attention mask of shape {tuple(mask.shape)}")
    if mask.shape[2] == 1:
        return mask  # one row broadcast over every query
    B, P = idx.shape
    m = mask.expand(B, *mask.shape[1:])
    return m.gather(2, idx[:, None, :, None].expand(B, m.shape[1], P, m.shape[3]))


@dataclass
class EncDecVLMAdapter:
    """Where things are in an encoder-decoder VLM, and the per-family calls MuE's hooks make. One
    instance per model; a family subclasses it and answers every method."""

    model: nn.Module  # what the user applied the technique to
    mm_model: nn.Module  # the module whose ``placeholder_method`` finds the image tokens
    encoder: nn.Module  # the unified encoder over image + text tokens (its ``layers``)
    decoder: nn.Module  # the autoregressive decoder (its ``layers``)
    head: nn.Module | None
    image_token_id: int
    placeholder_method: ClassVar[str] = "get_placeholder_mask"

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

    def cache_index(self, i: int) -> int:
        """The KV-cache layer index of decoder layer ``i``."""
        return int(self.decoder.layers[i].self_attn.layer_idx)

    # -- packed encoder layers: running tokens as queries, every token as keys/values -------------
    def pack_encoder_call(self, queries: torch.Tensor, idx: torch.Tensor, args: tuple,
                          kwargs: dict) -> tuple[tuple, dict]:
        """The encoder layer's call arguments for the packed ``queries`` (B, P, D), the tokens ``idx``."""
        raise NotImplementedError(f"{type(self).__name__}.pack_encoder_call")

    def encoder_kv_source(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """What encoder layer ``i``'s attention reads its keys/values from, given the full ``hidden``."""
        raise NotImplementedError(f"{type(self).__name__}.encoder_kv_source")

    def packed_attention(self, attn: nn.Module, forward: Any, source: Any, args: tuple, kwargs: dict) -> Any:
        """Encoder self-attention ``attn`` (its original ``forward``) on the packed queries of its call,
        keys/values from ``source`` (what :meth:`encoder_kv_source` returned)."""
        raise NotImplementedError(f"{type(self).__name__}.packed_attention")

    # -- the decoder's self-attention K/V (the KV rule for exited tokens) --------------------------
    def decoder_layer_cache(self, args: tuple, kwargs: dict) -> Any:
        """The cache a decoder layer call appends its self-attention K/V to (None: it keeps none)."""
        raise NotImplementedError(f"{type(self).__name__}.decoder_layer_cache")

    def self_kv(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer ``i``'s self-attention keys and values for ``hidden`` (batch, q, d) as the
        layer computes them in the call ``args, kwargs``; shapes (batch, kv heads, q, head_dim)."""
        raise NotImplementedError(f"{type(self).__name__}.self_kv")

    def append_self_kv(self, i: int, cache: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Append decoder layer ``i``'s K/V of ``hidden`` to ``cache`` (what the skipped layer would have)."""
        k, v = self.self_kv(i, hidden, args, kwargs)
        target = cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache
        target.update(k, v, self.cache_index(i))

    # -- FLOPs per token (2 x multiply-adds of the weight matmuls; attention scores excluded) --------
    def encoder_costs(self, i: int) -> tuple[float, float]:
        """(K/V projections, the rest: Q + output projection + FFN) of encoder layer ``i``."""
        raise NotImplementedError(f"{type(self).__name__}.encoder_costs")

    def decoder_costs(self, i: int) -> tuple[float, float]:
        """(self-attention K/V projections, the rest) of decoder layer ``i`` per decoder token. The
        cross-attention K/V over the encoder states are computed once per generation (cached) and not
        counted here."""
        raise NotImplementedError(f"{type(self).__name__}.decoder_costs")

    def head_flops(self) -> float:
        return _linear_flops(self.head) if self.head is not None else 0.0


@dataclass
class BartEncDecAdapter(EncDecVLMAdapter):
    """Florence-2's post-LN BART: layers called as ``(hidden, attention_mask, ...)``; the attention
    takes ``key_value_states``; a decoder layer gets ``cache=`` / ``use_cache=`` by name."""

    def pack_encoder_call(self, queries: torch.Tensor, idx: torch.Tensor, args: tuple,
                          kwargs: dict) -> tuple[tuple, dict]:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
        return (queries, gather_rows(mask, idx), *args[2:]), rest

    def encoder_kv_source(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        return hidden  # post-LN: the attention reads the layer input as is

    def packed_attention(self, attn: nn.Module, forward: Any, source: Any, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **{**kwargs, "key_value_states": source})

    def decoder_layer_cache(self, args: tuple, kwargs: dict) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return None if kwargs.get("use_cache", True) is False else cache

    def self_kv(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.decoder.layers[i].self_attn  # post-LN: the attention reads the layer input as is
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        return k, v

    def encoder_costs(self, i: int) -> tuple[float, float]:
        layer = self.encoder.layers[i]
        a = layer.self_attn
        return _linear_flops(a.k_proj, a.v_proj), _linear_flops(a.q_proj, a.out_proj, layer.fc1, layer.fc2)

    def decoder_costs(self, i: int) -> tuple[float, float]:
        layer = self.decoder.layers[i]
        s, c = layer.self_attn, layer.encoder_attn
        rest = _linear_flops(s.q_proj, s.out_proj, c.q_proj, c.out_proj, layer.fc1, layer.fc2)
        return _linear_flops(s.k_proj, s.v_proj), rest


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
    return BartEncDecAdapter(
        model=model, mm_model=mm, encoder=encoder, decoder=decoder, head=getattr(model, "lm_head", None),
        image_token_id=int(model.config.image_token_id),
    )
