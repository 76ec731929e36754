"""FiRST: per-layer routers that pick, from the prompt, which layers a sequence skips (Jain et al., 2024).

Every routed layer ``i`` (1..L-1; layer 0 always runs) has a small router, a two-layer MLP on
the RMS-normalised residual stream entering the layer. During prefill the router's per-token
"keep" probabilities are averaged over the prompt's (non-pad) tokens; the layer is skipped when
that mean is below ``threshold``. Decisions are made layer by layer while the prompt flows
through the model (a skipped layer changes what later routers see), and the skip set is then
fixed for the whole decode, prompt and generated tokens alike (FiRST's KV-cache-compatible
rule); a skipped layer's cache entries are copied from the nearest lower kept layer, as in
:mod:`mmskip.layer_skip`. In a batch a layer is skipped only if every sequence's router skips it.

Routers are trained with :mod:`mmskip.train.first` (routers only, optionally with LoRA) and
saved with :meth:`Routers.save` as a folder (``routers.safetensors`` + ``routers.json``);
``RouterConfig(path=folder)`` loads them. ``threshold`` is the
inference-time sparsity/quality knob (training's is the sparsity weight).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .._phase import ForwardState
from ..inject import SkipHandle
from ..layer_skip.hooks import attach_layer_skipping
from ..layer_skip.state import SkipPlan
from ..registry import get_adapter
from .routers import Router
from .state import RouterDecisions, RouterState

if TYPE_CHECKING:
    from .config import RouterConfig

__all__ = ["attach_first_routers"]

logger = logging.getLogger(__name__)


class _RouterHook(ModelHook):
    """At prefill, decides whether layer ``i`` runs for this prompt; runs before the layer's skip hook."""

    def __init__(self, index: int, router: Router, plan: SkipPlan, state: ForwardState, config: RouterConfig,
                 budget: int, last: bool, decisions: RouterDecisions) -> None:
        super().__init__()
        self.index, self.router, self.plan, self.state = index, router, plan, state
        self.threshold, self.budget, self.last, self.decisions = config.threshold, budget, last, decisions

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.state.phase == "prefill":
            self._decide(args[0] if args else kwargs["hidden_states"])
        return args, kwargs

    @torch.compiler.disable
    def _decide(self, h: torch.Tensor) -> None:
        """The prompt's decision, eager under ``torch.compile``: a data-dependent branch, and Python
        bookkeeping (the decision log, the keep probabilities) that a graph would guard on."""
        mask = self.state.attention_mask
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(h.shape[:2])):
            logger.warning(
                "FiRST router of layer %d: attention_mask of shape %s does not match the prompt %s; averaging "
                "keep probabilities over every position, padding included", self.index, tuple(mask.shape),
                tuple(h.shape[:2]),
            )
            mask = None
        with torch.no_grad():
            p = self.router.sequence_keep(h, mask)
        self.decisions.keep_prob[self.index] = p
        if bool((p < self.threshold).all()) and len(self.plan.skip) < self.budget:
            self.plan.skip = self.plan.skip | {self.index}
        if self.last:
            self.decisions.log.append(sorted(self.plan.skip))


def attach_first_routers(config: RouterConfig, model: nn.Module, handle: SkipHandle) -> None:
    """What :meth:`RouterConfig._attach` does: load the routers, hook layers 1..L-1 for skipping and
    put each router before its layer's skip hook, deciding at prefill."""
    routers = config.load_routers()
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    hidden = model.config.get_text_config(decoder=True).hidden_size
    if routers.num_layers != L or routers.hidden_size != hidden:
        raise ValueError(
            f"the routers in {config.path!r} were trained for a model with {routers.num_layers} layers and hidden "
            f"size {routers.hidden_size}; {type(model).__name__} has {L} layers and hidden size {hidden}. Train "
            "routers for this model with `python -m mmskip.train.first`."
        )
    ref = next(model.parameters())
    routers = routers.to(ref.device).eval()
    state, plan = attach_layer_skipping(adapter, handle, "all", set(), hooked=range(1, L))

    def reset(s: ForwardState) -> None:  # a new prompt: the routers decide again
        if s.phase == "prefill":
            plan.skip = frozenset()

    state.listeners.append(reset)
    tstate = RouterState(state, plan, routers)
    budget = int(config.max_skip * L)
    routed = routers.routed
    for i in routed:  # registered after the skip hooks, so each router runs before its layer's skip hook
        hook = _RouterHook(i, routers[i], plan, state, config, budget, i == routed[-1], tstate.decisions)
        handle.add_hook(adapter.layers[i], hook, ".router")
    handle.state = tstate
