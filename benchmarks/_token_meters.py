"""Meters for the vision- and video-token benchmarks: prefill FLOPs, KV bytes and paired prefill time.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` inside the language model's
decoder layers (and over the whole forward); KV bytes are read off the cache a prefill leaves;
:func:`paired_prefill` times a config's prefill against the unmodified model's (``mmskip.timing``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmskip.registry import get_adapter
from mmskip.timing import Timing, paired


@torch.no_grad()
def prefill(model, inp: dict[str, torch.Tensor]):
    """One prefill: the last position's logits and the KV cache."""
    return model(**inp, logits_to_keep=1, use_cache=True)


def cache_bytes(out) -> int:
    """Bytes of every layer's cached K and V after a prefill."""
    cache = out.cache
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def kv_per_token(model) -> int:
    """Bytes of K and V one prompt token adds to the cache, over all layers (what MoDState counts)."""
    text = get_adapter(model, "vlm").text
    return sum(
        2 * text.attention(i).k_proj.out_features * text.attention(i).k_proj.weight.element_size()
        for i in range(text.num_layers)
    )


def eager_layer_flops(model, inp: dict[str, torch.Tensor]) -> float:
    """FLOPs inside the decoder layers of one prefill with eager attention (attention scores counted too)."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return layer_flops(model, inp)[0]
    finally:
        model.set_attn_implementation(impl)


def layer_flops(model, inp: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """(FLOPs inside the decoder layers, FLOPs of the whole forward, KV bytes) of one prefill."""
    names = {id(m): n for n, m in model.named_modules()}
    root = type(model).__name__
    keys = {f"{root}.{names[id(layer)]}" for layer in get_adapter(model, "vlm").text.layers}
    with FlopCounterMode(display=False) as fc:
        out = prefill(model, inp)
    counts = fc.get_flop_counts()
    inside = sum(sum(v.values()) for name, v in counts.items() if name in keys)
    return float(inside), float(fc.get_total_flops()), cache_bytes(out)



def paired_prefill(model, plain_inputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                   attach: Callable[[torch.nn.Module], Any], repeats: int) -> Timing:
    """The config's prefill of ``inputs`` against the unmodified model's of ``plain_inputs``, in paired,
    interleaved rounds. ``attach(twin)`` applies the config to a deep copy once (applying is not timed)
    and returns an object with ``remove()``, called at the end."""
    twin = copy.deepcopy(model)
    att = attach(twin)
    try:
        return paired(lambda: prefill(model, plain_inputs), {"config": lambda: prefill(twin, inputs)},
                      repeats=repeats)["config"]
    finally:
        att.remove()
