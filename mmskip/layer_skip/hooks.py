"""Whole-layer skipping in decoder LMs: Unified Layer Skipping and its KV-cache rule.

Unified Layer Skipping (Liu et al., 2024) picks the skipped layers from the target speedup
alone, so every sample in a batch skips the same layers and KV caching keeps working. With
``phase="decode"`` the prompt runs through every layer and only generated tokens skip; a
skipped layer still gets a cache entry for each new token, copied from the nearest lower
kept layer (whose output is exactly the hidden state the skipped layer passes on), so every
layer's cache keeps the sequence length that masks and later calls expect. Dynamic and static
caches are both filled this way, so ``cache_implementation="static"`` and a ``torch.compile``d
decoding step (``fullgraph=True``) work. ``generate(use_cache=False)`` recomputes the prompt at
every step: there a skipped layer runs and passes its input on for the generated tokens only,
which gives the same tokens as the cached run.

A skipped layer computes no attention: with ``output_attentions=True`` its entry is all zeros
(batch, heads, queries, keys), so the tuple keeps one entry per layer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.utils.output_capturing import _active_collector

from .._phase import ForwardState, get_cache, track_forwards
from ..inject import SkipHandle
from ..registry import DecoderAdapter, get_adapter
from .state import LayerSkipState, SkipPlan

if TYPE_CHECKING:
    from .config import LayerSkipConfig

__all__ = ["LayerSkipHook", "attach_layer_skip", "attach_layer_skipping", "fill_skipped_kv", "record_skipped_attention"]

logger = logging.getLogger(__name__)


def fill_skipped_kv(cache: Any, plan: SkipPlan, i: int, q_len: int) -> None:
    """Append the nearest lower kept layer's K/V for the last ``q_len`` tokens to layer ``i``'s cache."""
    src = plan.source(i)
    if src is None:
        raise ValueError(
            f"layer {i} is skipped and no lower layer is kept, so its KV cache cannot be filled. "
            "Keep layer 0 (unified schedules always do) or generate with use_cache=False."
        )
    layer = cache.layers[plan.cache_idx[src]]
    if isinstance(layer, StaticLayer) and not layer.is_sliding:
        # the source wrote this forward's tokens just below its (tensor) length: no host sync
        pos = torch.arange(q_len, device=layer.keys.device) + (layer.cumulative_length - q_len)
        keys, values = layer.keys.index_select(2, pos), layer.values.index_select(2, pos)
    elif isinstance(layer, DynamicLayer):
        keys, values = layer.keys[:, :, -q_len:], layer.values[:, :, -q_len:]
    else:
        raise TypeError(
            f"mmskip layer skipping fills skipped layers' KV in dynamic and static full-attention caches, got "
            f"{type(layer).__name__}; generate with cache_implementation='dynamic' or 'static'."
        )
    cache.update(keys, values, plan.cache_idx[i])


def record_skipped_attention(adapter: DecoderAdapter, cache_idx: int, hidden: torch.Tensor,
                             kwargs: dict[str, Any]) -> None:
    """With ``output_attentions=True``, give a skipped layer (cache slot ``cache_idx``) an all-zero
    attention map, so the attentions tuple keeps one entry per layer (transformers records them
    from attention modules)."""
    collected = _active_collector.get()
    # an empty list: the kept layers below returned no weights (sdpa / flash attention), neither do we
    if collected is None or not collected.get("attentions"):
        return
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        keys = mask.shape[-1]
    else:
        cache = get_cache(kwargs)
        layer = cache.layers[cache_idx] if cache is not None else None
        if isinstance(layer, StaticLayer):
            keys = layer.max_cache_len
        elif isinstance(layer, DynamicLayer) and layer.is_initialized:
            keys = layer.keys.shape[-2]
        else:
            keys = hidden.shape[1]
    config = adapter.model.config.get_text_config(decoder=True)
    collected["attentions"].append(hidden.new_zeros(hidden.shape[0], config.num_attention_heads, hidden.shape[1], keys))


class LayerSkipHook(ModelHook):
    """Replaces a decoder layer's forward by the identity when the plan says so."""

    def __init__(self, index: int, plan: SkipPlan, handle: SkipHandle, adapter: DecoderAdapter) -> None:
        super().__init__()
        self.index = index
        self.plan = plan
        self.handle = handle
        self.adapter = adapter
        self.name = f"layer.{index}"

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.plan.splices(self.index):
            return self._splice(args, kwargs)
        if not self.plan.skips(self.index):
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = get_cache(kwargs)
        if cache is not None and kwargs.get("use_cache", True) is not False:
            fill_skipped_kv(cache, self.plan, self.index, hidden.shape[1])
        record_skipped_attention(self.adapter, self.plan.cache_idx[self.index], hidden, kwargs)
        self.handle.counts.record(self.name, 0, hidden.shape[0] * hidden.shape[1], like=hidden)
        return self.adapter.skipped("layer", args, kwargs)

    def _splice(self, args: tuple, kwargs: dict) -> Any:
        """Run the layer, then pass the input on for the generated tokens (``use_cache=False`` steps)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        out = self.fn_ref.original_forward(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        g = self.plan.state.gen_from
        first = torch.cat([first[:, :g], hidden[:, g:]], dim=1)
        return (first, *out[1:]) if isinstance(out, tuple) else first


def attach_layer_skipping(
    adapter: DecoderAdapter, handle: SkipHandle, phase: str, skip: set[int], hooked: range | set[int] | None = None
) -> tuple[ForwardState, SkipPlan]:
    """Shared by the layer-level techniques: phase tracking, FLOPs costs and one hook per layer
    in ``hooked`` (default: the layers in ``skip``)."""
    costs = {f"layer.{i}": adapter.layer_flops(i) for i in range(adapter.num_layers)}
    state = track_forwards(adapter, handle, costs)
    plan = SkipPlan(adapter, state, phase, skip)
    for i in sorted(skip if hooked is None else hooked):
        handle.add_hook(adapter.layers[i], LayerSkipHook(i, plan, handle, adapter), ".layer")
    return state, plan


def attach_layer_skip(config: LayerSkipConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """What :meth:`LayerSkipConfig._attach` does: the schedule's skip set, then one hook per skipped layer."""
    adapter = get_adapter(model, "decoder")
    num_layers = adapter.num_layers
    ratios = config.schedule.ratios(num_layers)
    if any(0.0 < r < 1.0 for r in ratios):
        raise ValueError(
            "mmskip.LayerSkipConfig skips whole layers; this schedule has fractional (token) keep ratios"
        )
    skip = {i for i, r in enumerate(ratios) if r == 0.0}
    if len(skip) == num_layers:
        raise ValueError("the schedule skips every layer; keep at least one")
    forward, plan = attach_layer_skipping(adapter, handle, config.phase, skip)
    handle.state = LayerSkipState(forward, plan)
    logger.debug("layer skipping: %d of %d layers skipped (%s)", len(skip), num_layers, config.phase)
