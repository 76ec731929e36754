"""MuE's hooks on a model (:mod:`mmskip.vision.mue`): :func:`attach_mue` puts them on.

The encoder's hooks (image-token mask, exit mask, packed layers) are in
:mod:`mmskip.vision.mue.encoder`, the decoder's (per-token exits, the KV rule) in
:mod:`mmskip.vision.mue.decoder`; the per-call passes they share are in :mod:`mmskip.vision.mue.state`;
where the layers are and how a family's layers are called, in the registry's ``"encdec-vlm"`` adapters.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from mmskip._phase import HeadCounter
from mmskip.inject import CallGuard, SkipHandle
from mmskip.registry import get_adapter

from ..adapters import EncDecVLMAdapter
from ..generation_replay import bind_generations
from .decoder import DecoderHook, DecoderLayerHook, own_wrapper_code
from .encoder import EncoderHook, EncoderKVHook, EncoderLayerHook, PlaceholderHook
from .state import MuEState

if TYPE_CHECKING:
    from .config import MuEConfig

__all__ = [
    "PlaceholderHook",
    "EncoderHook",
    "EncoderLayerHook",
    "EncoderKVHook",
    "DecoderHook",
    "DecoderLayerHook",
    "attach_mue",
]

logger = logging.getLogger("mmskip.vision.mue")


def attach_mue(config: MuEConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """Attach MuE to ``model``: the placeholder, encoder and decoder hooks, one hook per encoder layer
    (and its attention's K/V) and per decoder layer, the head counter; ``handle.state`` = a new
    :class:`MuEState`. Called by ``mmskip.apply(model, config)``."""
    adapter: EncDecVLMAdapter = get_adapter(model, "encdec-vlm")
    L = adapter.num_decoder_layers
    if config.decoder_schedule is not None:
        asked, name = max(1, config.decoder_schedule.warmup), "decoder_schedule.warmup"
    else:
        asked, name = config.min_layers, "min_layers"
    if asked is not None and asked >= L:
        raise ValueError(
            f"MuEConfig.{name}={asked} leaves no decoder layer to exit after: "
            f"{type(model).__name__}'s decoder has {L} layers and a token can exit after layers 1..{L - 1}"
        )
    for sched_name in ("image_schedule", "text_schedule"):
        sched = getattr(config, sched_name)
        if sched is not None and sched.num is not None and sched.num != adapter.num_encoder_layers:
            raise ValueError(
                f"MuEConfig.{sched_name} was built for num={sched.num} layers but {type(model).__name__}'s encoder "
                f"has {adapter.num_encoder_layers}; leave num=None"
            )
    min_layers = asked if asked is not None else max(1, math.ceil(L / 3))
    state = MuEState(config=config, adapter=adapter, min_layers=min_layers)
    guard = CallGuard(config.technique)
    counts = handle.counts
    for i in range(adapter.num_encoder_layers):
        kv, rest = adapter.encoder_costs(i)
        counts.cost[f"encoder.{i}"], counts.cost[f"encoder.{i}.kv"] = rest, kv
    for i in range(L):
        kv, rest = adapter.decoder_costs(i)
        counts.cost[f"decoder.{i}"], counts.cost[f"decoder.{i}.kv"] = rest, kv
    # a part whose thresholds never trigger (>= 1, None) gets no layer hooks: its outer hook counts
    encoder_exits, decoder_exits = config.encoder_active(), config.decoder_active() and L > 1
    handle.add_hook(adapter.mm_model, PlaceholderHook(state), ".placeholder")
    handle.add_hook(adapter.encoder, EncoderHook(state, handle, guard, encoder_exits), ".encoder")
    for i, layer in enumerate(adapter.encoder_layers if encoder_exits else ()):
        kv_hook = EncoderKVHook(adapter)
        handle.add_hook(layer.self_attn, kv_hook, ".kv")
        handle.add_hook(layer, EncoderLayerHook(i, state, handle, kv_hook), ".layer")
    handle.add_hook(adapter.decoder, DecoderHook(state, handle, guard, decoder_exits), ".decoder")
    if decoder_exits:  # generate(use_cache=False) replays its exits
        bind_generations(handle, model, state.generations)
    for i, layer in enumerate(adapter.decoder_layers if decoder_exits else ()):
        handle.add_hook(layer, DecoderLayerHook(i, state, handle), ".layer")
    if adapter.head is not None:
        counts.fixed_cost = adapter.head_flops()
        handle.add_hook(adapter.head, HeadCounter(handle), ".head")
    # made now, outside any compiled graph (a graph that made one would be compiled again once it exists):
    # the decoder's threshold table (its first read is a host read) and the device-side counters
    state.decoder_thresholds(0, 1, torch.device("cpu"))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for part, depth in (("encoder", adapter.num_encoder_layers), ("decoder", L)):
        counts.declare([n for i in range(depth) for n in (f"{part}.{i}", f"{part}.{i}.kv")], device)
    # the hooked modules on a compiled forward's call chain (the layers run inside the eager passes)
    hooked = {"mm": adapter.mm_model, "encoder": adapter.encoder, "decoder": adapter.decoder, "head": adapter.head}
    for tag, module in hooked.items():
        if module is not None:
            own_wrapper_code(module, "mue_" + tag)
    handle.state = state
    logger.debug("mue: %d encoder / %d decoder layers, decoder min_layers %d", adapter.num_encoder_layers, L,
                 min_layers)
