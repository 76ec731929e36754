"""``VoidLayerConfig``: LAC's threshold factor, how void a layer must be to skip, what to trace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..inject import SkipConfig, SkipHandle
from ..schedules import AdaptiveSchedule

__all__ = ["VoidLayerConfig"]


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

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on causal LMs: LAC's alpha, the skip cap and the void fraction."""
        if context.kind != "lm" or not context.num_layers or context.num_layers < 3:
            return None
        from ..tuning.space import FloatRange, Space

        def build(v: dict[str, Any]) -> VoidLayerConfig:
            schedule = AdaptiveSchedule(threshold=v["alpha"], signal="l2_change", max_skip=v["max_skip"])
            return cls(schedule=schedule, min_void_fraction=v["min_void_fraction"])

        return Space(cls.technique, {"alpha": FloatRange(0.1, 0.9), "max_skip": FloatRange(0.1, 0.6),
                                     "min_void_fraction": FloatRange(0.3, 1.0)}, build,
                     seeds=({"alpha": 0.5, "max_skip": 0.25, "min_void_fraction": 0.5},))  # the defaults

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_void_layers

        attach_void_layers(self, model, handle)
