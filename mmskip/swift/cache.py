"""The KV-cache rule of the SWIFT loop: one cache, cut back to the verified length per layer.

Past tokens always hold the full model's K/V. The draft appends K/V for drafted tokens only at
the layers whose attention it runs, so layers differ in length until :func:`crop` cuts every
layer back to the verified length. Full-attention layers (``DynamicLayer``) are sliced;
sliding-window layers (``DynamicSlidingWindowLayer``, e.g. Mistral) record their past while the
loop runs (:func:`prepare`, transformers' own ``activate_past_recording``, as its assisted
decoding does) and are cropped by their own ``crop``, which also trims them back to the window.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["unsupported", "prepare", "crop", "length", "full_layers"]

_SUPPORTED = (DynamicLayer, DynamicSlidingWindowLayer)


def unsupported(cache: Any) -> str | None:
    """Why SWIFT cannot decode into ``cache`` (None when it can): it needs an empty, not offloaded
    ``DynamicCache`` of full or sliding-window layers (the default cache of ``generate``)."""
    layers = getattr(cache, "layers", None) or []
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False) \
            or any(type(layer) not in _SUPPORTED for layer in layers) \
            or getattr(cache, "layer_class_to_replicate", None) not in (None, *_SUPPORTED):
        return (f"SWIFT needs the default dynamic cache (no cache_implementation, or 'dynamic'; got "
                f"{type(cache).__name__}{', offloaded' if getattr(cache, 'offloading', False) else ''})")
    if cache.get_seq_length() > 0:
        return "SWIFT starts from an empty cache (got past_key_values that already hold tokens)"
    return None


def prepare(cache: Any) -> None:
    """Check that every layer can be rolled back; make sliding-window layers record their past.

    Call after the prefill (as transformers does), so a long prompt is not held in full."""
    for layer in getattr(cache, "layers", None) or []:
        if type(layer) not in _SUPPORTED:
            raise TypeError(
                f"self-speculative decoding supports DynamicCache layers (full or sliding-window), got "
                f"{type(layer).__name__}; use the default cache (no cache_implementation)"
            )
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.activate_past_recording()


def length(layer: Any) -> int:
    """Tokens a cache layer has seen (the sliding-window layer counts those it dropped)."""
    return layer.get_seq_length() if layer.is_initialized else 0


def crop(cache: Any, n: int) -> None:
    """Cut every cache layer back to ``n`` tokens (layers the draft skipped may already be there)."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        extra = length(layer) - n
        if extra < 0:
            raise RuntimeError(f"cache layer holds {length(layer)} tokens, fewer than the {n} verified ones")
        layer.crop(-extra)  # crop(0) trims a sliding-window layer back to its window
        if extra and type(layer) is DynamicLayer:  # a view into the longer tensor: give it its own storage, so
            # a compiled forward sees the strides of any other cache of this length (one graph for all lengths)
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()


def full_layers(cache: Any) -> list[DynamicLayer]:
    """The cache's initialised full-attention layers (their keys and values grow with the sequence)."""
    return [layer for layer in getattr(cache, "layers", None) or []
            if type(layer) is DynamicLayer and layer.is_initialized]
