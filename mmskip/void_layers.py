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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ._phase import ForwardState
from .inject import SkipConfig, SkipHandle, TechniqueState
from .layer_skip import SkipPlan, attach_layer_skipping
from .registry import get_adapter
from .schedules import AdaptiveSchedule

__all__ = ["VoidLayerConfig", "VoidLayerState", "lac_voids", "void_skip_set"]

logger = logging.getLogger(__name__)


def lac_voids(norms: torch.Tensor, alpha: float, lift_layers: int = 0) -> torch.Tensor:
    """LAC void mask. ``norms``: (L + 1, ...) residual L2 norms entering layer 0 and leaving each
    layer. Returns (L, ...) booleans: True where the layer is void for that token. The first
    ``lift_layers`` layers are never void and stay out of the threshold."""
    progress = (norms[1:] - norms[:-1])[lift_layers:]
    spread = progress.cummax(dim=0).values - progress.cummin(dim=0).values
    void = torch.zeros(norms.shape[0] - 1, *norms.shape[1:], dtype=torch.bool, device=norms.device)
    void[lift_layers:] = progress < alpha * spread
    return void


class _Tracer:
    """Collects per-token residual norms of one forward, layer by layer."""

    def __init__(self, num_layers: int, state: ForwardState, trace_decode: bool) -> None:
        self.num_layers = num_layers
        self.state = state
        self.trace_decode = trace_decode
        self.norms: list[torch.Tensor] = []
        self.records: list[dict[str, Any]] = []  # one per traced forward
        self.on_complete: list = []

    @property
    def tracing(self) -> bool:
        return self.state.phase == "prefill" or self.trace_decode

    def add(self, hidden: torch.Tensor) -> None:
        self.norms.append(hidden.float().norm(dim=-1))
        if len(self.norms) == self.num_layers + 1:
            norms = torch.stack(self.norms)
            self.norms = []
            mask = self.state.attention_mask if self.state.phase == "prefill" else None
            rec = {"phase": self.state.phase, "norms": norms, "valid": _valid(mask, norms)}
            self.records.append(rec)
            for fn in self.on_complete:
                fn(rec)


def _valid(mask: torch.Tensor | None, norms: torch.Tensor) -> torch.Tensor:
    shape = norms.shape[1:]
    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(shape)):
        logger.warning("LAC: attention_mask of shape %s does not match the prompt %s; counting every position, "
                       "padding included", tuple(mask.shape), tuple(shape))
        mask = None
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=norms.device)
    return mask.bool().to(norms.device)


class _NormHook(ModelHook):
    def __init__(self, tracer: _Tracer, first: bool) -> None:
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


def void_skip_set(rec: dict[str, Any], alpha: float, lift: int, min_fraction: float, max_layers: int) -> set[int]:
    """The layers a traced prompt ``rec`` (``{"norms", "valid"}``) lets generation skip: void for
    at least ``min_fraction`` of every sequence's valid tokens, most void first, at most
    ``max_layers``, never layer 0."""
    void = lac_voids(rec["norms"], alpha, lift)  # (L, B, T)
    valid = rec["valid"].unsqueeze(0)
    frac = (void & valid).sum(-1).float() / valid.sum(-1).clamp(min=1).float()  # (L, B)
    worst = frac.amin(dim=1)  # a layer is skipped only if void for every sequence in the batch
    worst[0] = -1.0  # layer 0 always runs: skipped layers copy their KV from a lower kept layer
    order = torch.argsort(worst, descending=True, stable=True)
    return {int(i) for i in order[:max_layers] if worst[i] >= min_fraction}


@dataclass
class VoidLayerState(TechniqueState):
    """State of an applied :class:`VoidLayerConfig`: the plan the prompt decided and the traces.

    ``records`` holds one entry per traced forward (``phase``, per-token ``norms`` of shape
    (L + 1, B, T), ``valid`` mask); ``reset()`` empties it.
    """

    forward: ForwardState
    plan: SkipPlan
    tracer: _Tracer

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.tracer.records

    def reset(self) -> None:
        self.tracer.records.clear()

    def stats(self) -> dict[str, Any]:
        return {"skipped_layers": sorted(self.plan.skip)}


@dataclass(frozen=True)
class VoidLayerConfig(SkipConfig):
    """Skip the prompt's void layers while generating (LAC, "Void in Language Models").

    Paper: Shemiranifar, 2025, "Void in Language Models", https://arxiv.org/abs/2505.14467.

    Args:
        schedule: ``schedules.adaptive(alpha, "l2_change", max_skip=...)``; default
            ``adaptive(0.5, "l2_change", max_skip=0.25)``. ``alpha`` is LAC's threshold factor
            (see the module docstring); ``max_skip`` caps the fraction of layers skipped.
        min_void_fraction: a layer is skipped when it is void for at least this fraction of
            every sequence's prompt tokens; default 0.5.
        lift_layers: leading layers left out of LAC's threshold and never void; default 1 (see
            the module docstring; 0 gives the paper's literal rule).
        trace_decode: also record LAC norms for generated tokens (``handle.state.records``), as
            :func:`mmskip.analysis.void_layers` does; default False.
    """

    technique: ClassVar[str] = "void_layers"
    schedule: AdaptiveSchedule = AdaptiveSchedule(threshold=0.5, signal="l2_change", max_skip=0.25)
    min_void_fraction: float = 0.5
    lift_layers: int = 1
    trace_decode: bool = False

    def __post_init__(self) -> None:
        if self.schedule.signal != "l2_change":
            raise ValueError("VoidLayerConfig.schedule must be schedules.adaptive(alpha, signal='l2_change', ...)")
        if not 0.0 <= self.schedule.threshold <= 1.0:
            raise ValueError(f"LAC alpha must lie in [0, 1], got {self.schedule.threshold}")
        if not 0.0 < self.min_void_fraction <= 1.0:
            raise ValueError(f"min_void_fraction must lie in (0, 1], got {self.min_void_fraction}")
        if self.lift_layers < 0:
            raise ValueError(f"lift_layers must be >= 0, got {self.lift_layers}")

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        adapter = get_adapter(model, "decoder")
        L = adapter.num_layers
        state, plan = attach_layer_skipping(adapter, handle, "decode", set(), hooked=range(1, L))
        tracer = _Tracer(L, state, self.trace_decode)
        for i in range(L):
            handle.add_hook(adapter.layers[i], _NormHook(tracer, first=i == 0), ".lac")
        max_layers = int(self.schedule.max_skip * L)
        alpha, lift, min_fraction = self.schedule.threshold, self.lift_layers, self.min_void_fraction

        def decide(rec: dict[str, Any], plan: SkipPlan = plan) -> None:
            if rec["phase"] == "prefill":
                plan.skip = frozenset(void_skip_set(rec, alpha, lift, min_fraction, max_layers))
                logger.debug("void layers for this prompt: %s", sorted(plan.skip))

        tracer.on_complete.append(decide)
        handle.state = VoidLayerState(state, plan, tracer)
