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

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["prepare", "crop", "length"]

_SUPPORTED = (DynamicLayer, DynamicSlidingWindowLayer)


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
