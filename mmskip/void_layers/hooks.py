"""Void layers (Shemiranifar, 2025): detect unactivated layers with L2 Adaptive Computation (LAC).

LAC watches the L2 norm of each token's residual stream as it leaves every layer. Layer ``l``'s
progress is ``d_l = ||h_l|| - ||h_(l-1)||``; its dynamic, per-token threshold is ``alpha`` times
the range (max - min) of the progress values of layers ``0..l``. A layer whose progress falls
below its threshold is a *void* for that token; the others are *active*.

One deviation, on by default (``lift_layers=1``): Llama-style models lift the tiny embedding
norm into the residual stream's scale in their first layer (0.8 -> 62 on the zoo's stdlib-lm),
and that single jump would set every later layer's threshold, marking all of them void. The
first ``lift_layers`` layers are therefore left out of the threshold and never count as void;
``lift_layers=0`` gives the literal rule.

``VoidLayerConfig`` traces the prompt (prompt processing, PP) through the full model, then
skips during response generation (RG) the layers that were void for at least
``min_void_fraction`` of every sequence's prompt tokens. The prompt decides, decoding
follows: the skip set is fixed for the whole generation, so the KV cache is filled exactly as
in Unified Layer Skipping (copy from the nearest lower kept layer).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from ..inject import SkipHandle
from ..layer_skip.hooks import LayerSkipHook, attach_layer_skipping
from ..layer_skip.state import SkipPlan
from ..registry import get_adapter
from .lac import void_skip_set
from .state import NormTracer, VoidLayerState, VoidRecord

if TYPE_CHECKING:
    from .config import VoidLayerConfig

__all__ = ["attach_void_layers"]

logger = logging.getLogger(__name__)


class _NormHook(ModelHook):
    """LAC's trace on a layer that never skips: the residual norm leaving it (and, on layer 0, entering it)."""

    def __init__(self, tracer: NormTracer, first: bool) -> None:
        super().__init__()
        self.tracer = tracer
        self.first = first

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.first and self.tracer.tracing:
            self.tracer.norms = []
            self.tracer.add(args[0] if args else kwargs["hidden_states"])
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.tracer.tracing:
            self.tracer.add(output[0] if isinstance(output, tuple) else output)
        return output


class _TracedSkipHook(LayerSkipHook):
    """Layer skipping and LAC's trace in one hook, so a decode step pays one hook call per layer."""

    def __init__(self, index: int, plan: SkipPlan, handle: SkipHandle, adapter: Any, tracer: NormTracer) -> None:
        super().__init__(index, plan, handle, adapter)
        self.tracer = tracer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = super().new_forward(module, *args, **kwargs)
        if self.tracer.tracing:
            self.tracer.add(output[0] if isinstance(output, tuple) else output)
        return output


def attach_void_layers(config: VoidLayerConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """What :meth:`VoidLayerConfig._attach` does: LAC's norm tracing on every layer, skip hooks on
    layers 1..L-1 (none skipping yet; no skip hook at all when the cap allows no layer), and the
    prompt's decision of the skip set."""
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    max_layers = int(config.schedule.max_skip * L)
    state, plan = attach_layer_skipping(adapter, handle, "decode", set(), hooked=())
    tracer = NormTracer(L, state, config.trace_decode)
    for i in range(L):
        if i == 0 or max_layers == 0:
            hook: ModelHook = _NormHook(tracer, first=i == 0)
        else:
            hook = _TracedSkipHook(i, plan, handle, adapter, tracer)
        handle.add_hook(adapter.layers[i], hook, ".lac")
    alpha, lift, min_fraction = config.schedule.threshold, config.lift_layers, config.min_void_fraction

    def decide(rec: VoidRecord, plan: SkipPlan = plan) -> None:
        if rec.phase == "prefill":
            plan.skip = frozenset(void_skip_set(rec, alpha, lift, min_fraction, max_layers))
            logger.debug("void layers for this prompt: %s", sorted(plan.skip))

    if max_layers > 0:  # a cap of 0 skips nothing whatever the prompt: no decision to make
        tracer.on_complete.append(decide)
    handle.state = VoidLayerState(state, plan, tracer)
