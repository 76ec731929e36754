"""``LayerSkipConfig``: Unified Layer Skipping's whole-layer skip schedule and its KV-cache phase."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..inject import SkipConfig, SkipHandle
from ..schedules import AdaptiveSchedule, Schedule, UnifiedSchedule

__all__ = ["LayerSkipConfig"]

_PHASES = ("decode", "all")


@dataclass(frozen=True)
class LayerSkipConfig(SkipConfig):
    """Skip whole decoder layers chosen by a static schedule (Unified Layer Skipping).

    Paper: Liu et al., 2024, "Accelerating Inference in Large Language Models with a Unified
    Layer Skipping Strategy", https://arxiv.org/abs/2404.06954. Not the same as diffusers'
    ``diffusers.hooks.LayerSkipConfig`` (which skips blocks of diffusion transformers).

    Args:
        schedule: which layers to skip; default ``schedules.unified(speedup=2.0)``. Any static
            schedule (``unified``, ``interval``, ``explicit``) giving 0 or 1 per layer.
        phase: ``"decode"`` (default): the prompt runs through every layer, generated tokens
            skip, and a skipped layer's KV for new tokens is copied from the nearest lower kept
            layer. ``"all"``: skip the layers for every token, prompt included.
    """

    technique: ClassVar[str] = "layer_skip"
    schedule: Schedule = UnifiedSchedule(speedup=2.0)
    phase: str = "decode"

    def __post_init__(self) -> None:
        if isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError(
                "mmskip.LayerSkipConfig takes a static schedule (unified, interval, explicit); for input-adaptive "
                "skipping use mmskip.FFNSkipConfig or mmskip.VoidLayerConfig"
            )
        if self.phase not in _PHASES:
            raise ValueError(f"mmskip.LayerSkipConfig.phase must be one of {_PHASES}, got {self.phase!r}")

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on causal LMs: the unified schedule's target speedup and the phase."""
        if context.kind != "lm" or not context.num_layers or context.num_layers < 3:
            return None
        from ..schedules import unified
        from ..tuning.space import Choice, FloatRange, Space

        top = min(3.0, context.num_layers / 2)
        return Space(cls.technique, {"speedup": FloatRange(1.05, top), "phase": Choice(("decode", "all"))},
                     lambda v: cls(schedule=unified(speedup=v["speedup"]), phase=v["phase"]),
                     seeds=({"speedup": 1.5, "phase": "decode"}, {"speedup": 2.0, "phase": "decode"}))

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_layer_skip

        attach_layer_skip(self, model, handle)
