"""Registry adapter (kind ``"encdec-vlm"``) for T5Gemma 2, the second encoder-decoder VLM MuE runs on.

Checked on transformers 5.25 with a tiny random model: ``T5Gemma2ForConditionalGeneration`` holds
``model`` (``T5Gemma2Model``) with ``encoder`` (``T5Gemma2Encoder``: a SigLIP vision tower, the
projector and ``get_image_placeholder_mask``, which its own ``forward`` calls, also inside
``generate``) whose ``text_model`` (``T5Gemma2TextEncoder``) runs the unified encoder layers over
image + text tokens, and ``decoder`` (``T5Gemma2Decoder``). Unlike BART the layers are pre-norm
(RMSNorm before and after each sublayer), the attention uses rotary positions, q/k norms and
grouped K/V heads, and a decoder layer's *merged* attention attends over its own tokens and the
encoder states in one softmax (the same K/V projections for both). The layers are called with
positional arguments: encoder ``(hidden, position_embeddings, mask, position_ids)``, decoder
``(hidden, position_embeddings, merged_mask, position_ids, cache, use_cache, encoder_states)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmskip.registry import register

from .encdec_vlm import EncDecVLMAdapter, UnsupportedLanguageModelError, _linear_flops, gather_rows

__all__ = ["T5Gemma2Adapter"]

_LAYER_PARTS = ("self_attn", "pre_self_attn_layernorm", "mlp")
_EXPECTED = "T5Gemma 2's pre-norm layers (self_attn with q/k/v/o_proj, q_norm, k_norm; pre_self_attn_layernorm; mlp)"
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "head_dim", "layer_idx", "scaling")


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``x`` (B, heads, n, hd) with cos/sin (B or 1, n, hd), as the model does."""
    from transformers.models.t5gemma2.modeling_t5gemma2 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, cos, sin)[0]


@dataclass
class T5Gemma2Adapter(EncDecVLMAdapter):
    """T5Gemma 2: pre-norm layers with rotary positions; the image mask from the encoder's
    ``get_image_placeholder_mask``. A packed encoder layer gathers the queries' rotary cos/sin and
    mask rows; its attention takes keys/values from every token's normed state at their own
    positions. A decoder layer's K/V of a hidden state are ``k_norm(k_proj(norm(h)))`` rotated to
    the token's position and ``v_proj(norm(h))``."""

    placeholder_method: ClassVar[str] = "get_image_placeholder_mask"

    def pack_encoder_call(self, queries: torch.Tensor, idx: torch.Tensor, args: tuple,
                          kwargs: dict) -> tuple[tuple, dict]:
        cos, sin = _arg(args, kwargs, 1, "position_embeddings")
        mask = _arg(args, kwargs, 2, "attention_mask")
        B, P = idx.shape
        at = idx[..., None].expand(B, P, cos.shape[-1])
        pos = (cos.expand(B, *cos.shape[1:]).gather(1, at), sin.expand(B, *sin.shape[1:]).gather(1, at))
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "position_embeddings", "attention_mask")}
        return (queries, pos, gather_rows(mask, idx), *args[3:]), rest

    def encoder_kv_source(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        layer = self.encoder.layers[i]
        return layer.pre_self_attn_layernorm(hidden), _arg(args, kwargs, 1, "position_embeddings")

    def packed_attention(self, attn: nn.Module, forward: Any, source: Any, args: tuple, kwargs: dict) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.t5gemma2.modeling_t5gemma2 import eager_attention_forward

        kw = dict(kwargs)
        x = args[0] if args else kw.pop("hidden_states")
        cos_q, sin_q = kw.pop("position_embeddings")
        mask = kw.pop("attention_mask", None)
        kw.pop("cache", None)
        src, (cos_k, sin_k) = source
        hd = attn.head_dim
        q = attn.q_norm(attn.q_proj(x).view(*x.shape[:-1], -1, hd).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(src).view(*src.shape[:-1], -1, hd).transpose(1, 2))
        v = attn.v_proj(src).view(*src.shape[:-1], -1, hd).transpose(1, 2)
        q, k = _rotate(q, cos_q, sin_q), _rotate(k, cos_k, sin_k)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, weights = interface(attn, q, k, v, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                                 scaling=attn.scaling, sliding_window=attn.sliding_window, **kw)
        return attn.o_proj(out.reshape(*x.shape[:-1], -1).contiguous()), weights

    def decoder_layer_cache(self, args: tuple, kwargs: dict) -> Any:
        return _arg(args, kwargs, 4, "cache")  # the merged attention appends whenever it has a cache

    def self_kv(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.decoder.layers[i]
        attn = layer.self_attn
        x = layer.pre_self_attn_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_norm(attn.k_proj(x).view(shape).transpose(1, 2))
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = _arg(args, kwargs, 1, "position_embeddings")
        return _rotate(k, cos, sin), v

    def encoder_costs(self, i: int) -> tuple[float, float]:
        layer = self.encoder.layers[i]
        a = layer.self_attn
        return _linear_flops(a.k_proj, a.v_proj), _linear_flops(a.q_proj, a.o_proj, layer.mlp)

    def decoder_costs(self, i: int) -> tuple[float, float]:
        layer = self.decoder.layers[i]
        a = layer.self_attn  # merged attention: one query / output projection serves self and cross
        return _linear_flops(a.k_proj, a.v_proj), _linear_flops(a.q_proj, a.o_proj, layer.mlp)


def _check(model: nn.Module, text: nn.Module, stack: nn.Module, what: str) -> None:
    layers = getattr(stack, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedLanguageModelError(model, text, f"its {what} has no layers", _EXPECTED)
    missing = [p for p in _LAYER_PARTS if not hasattr(layers[0], p)]
    missing += [f"self_attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(layers[0], "self_attn", None), p)]
    if missing:
        raise UnsupportedLanguageModelError(model, text, f"its {what} layer has no {', '.join(missing)}",
                                            _EXPECTED)


@register("T5Gemma2ForConditionalGeneration", "T5Gemma2Model", kind="encdec-vlm")
def _t5gemma2(model: nn.Module) -> EncDecVLMAdapter:
    inner = model if hasattr(model, "encoder") and hasattr(model, "decoder") else model.model
    mm, decoder = inner.encoder, inner.decoder
    encoder = mm.text_model
    _check(model, inner, encoder, "encoder")
    _check(model, inner, decoder, "decoder")
    return T5Gemma2Adapter(
        model=model, mm_model=mm, encoder=encoder, decoder=decoder, head=getattr(model, "lm_head", None),
        image_token_id=int(model.config.image_token_index),
    )
