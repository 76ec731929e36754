"""When SWIFT cannot serve a ``generate`` call: the reasons, and the fallback to transformers.

The routed ``model.generate`` (:mod:`mmskip.swift.route`) runs transformers' ``generate``
with the SWIFT loop as its decoding method. The loop first asks :func:`decode_reason` whether it
can serve what ``generate`` prepared (batch size, decoding mode, cache, model inputs, ...); if
not, it raises :class:`Fallback` before any forward, and the route reruns the call as the plain
``generate`` of the model (the draft's hooks are inactive outside a draft forward, so that is the
full model) and warns once per reason per handle. :func:`call_reason` catches, before
``generate`` runs, what ``generate`` does not hand a custom decoding loop (an assistant model,
the tokenizer that stop strings need, ``synced_gpus``). Values count, not presence:
``streamer=None``, ``output_scores=False`` or ``past_key_values=None`` are the defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import GenerationMode

from . import cache as kv

__all__ = ["Fallback", "call_reason", "decode_reason"]

# model kwargs generate() prepares for a decoder-only LM; any other (not None) makes SWIFT fall back
MODEL_KWARGS = {"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep"}
_SERVED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class Fallback(ValueError):
    """SWIFT cannot serve this call. ``key`` names the reason (one warning per key and handle),
    ``why`` says what in the call it is (e.g. "SWIFT serves batch size 1 only (got batch 3)")."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(
            f"{why}. custom_generate=swift_decode cannot fall back by itself: call model.generate without it "
            "(while SWIFT is applied, model.generate falls back to transformers' decoding)"
        )
        self.key, self.why = key, why


def call_reason(model: torch.nn.Module, kwargs: dict[str, Any]) -> Fallback | None:
    """What ``generate`` would not hand the SWIFT loop, from the call's own arguments."""
    if kwargs.get("assistant_model") is not None:
        return Fallback("assisted", "SWIFT drafts with the model itself and does not take an assistant_model")
    if kwargs.get("synced_gpus"):
        return Fallback("synced_gpus", "SWIFT does not run with synced_gpus=True")
    if kwargs.get("tokenizer") is not None:
        configs = (kwargs.get("generation_config"), getattr(model, "generation_config", None))
        wants = [kwargs.get("stop_strings"), kwargs.get("token_healing")]
        wants += [getattr(c, a, None) for c in configs for a in ("stop_strings", "token_healing")]
        if any(w is not None and w is not False for w in wants):
            return Fallback(
                "tokenizer",
                "transformers gives a custom decoding loop no tokenizer, which stop_strings and token_healing need "
                "(to keep SWIFT, pass stopping_criteria=[StopStringCriteria(tokenizer, stop_strings)] instead)",
            )
    return None


def decode_reason(input_ids: torch.Tensor, gen: GenerationConfig, processor: Any,
                  model_kwargs: dict[str, Any]) -> Fallback | None:
    """What in the prepared call the SWIFT loop cannot serve, or None when it can."""
    mode = gen.get_generation_mode()
    if mode not in _SERVED_MODES:
        key = "num_beams" if (gen.num_beams or 1) > 1 else "assisted" if mode == GenerationMode.ASSISTED_GENERATION \
            else "mode"
        return Fallback(key, f"SWIFT decodes greedily or by sampling only (got {mode.value}, num_beams={gen.num_beams})")
    if model_kwargs.get("inputs_embeds") is not None:
        return Fallback("inputs_embeds", "SWIFT needs the prompt as input_ids (got inputs_embeds)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return Fallback("batch", f"SWIFT serves batch size 1 only (got batch {input_ids.shape[0]})")
    if gen.output_attentions or gen.output_hidden_states:
        return Fallback("outputs", "SWIFT does not return attentions or hidden states "
                                   "(output_attentions / output_hidden_states)")
    if any(type(p).__name__ == "UnbatchedClassifierFreeGuidanceLogitsProcessor" for p in processor or ()):
        return Fallback("guidance", "SWIFT does not run classifier-free guidance (guidance_scale), whose processor "
                                    "keeps its own cache of the unconditional sequence")
    unknown = sorted(k for k, v in model_kwargs.items() if k not in MODEL_KWARGS and v is not None)
    if unknown:
        return Fallback("model_inputs", f"SWIFT does not pass the model inputs {unknown}")
    if model_kwargs.get("use_cache") is False or model_kwargs.get("cache") is None:
        return Fallback("use_cache", "SWIFT needs the KV cache (got use_cache=False)")
    why = kv.unsupported(model_kwargs["cache"])
    if why:
        return Fallback("cache", why)
    mask = model_kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or bool((mask[0, 1:] < mask[0, :-1]).any())):
        return Fallback("attention_mask", "SWIFT takes an attention_mask of left padding only (zeros, then ones)")
    return None
