"""``FFNSkipConfig``: FFN-SkipLLM's saturation threshold, cold layers and skip span."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..inject import SkipConfig, SkipHandle
from ..schedules import AdaptiveSchedule

__all__ = ["FFNSkipConfig"]


@dataclass(frozen=True)
class FFNSkipConfig(SkipConfig):
    """Input-adaptive FFN skipping during decoding (FFN-SkipLLM).

    Paper: Jaiswal et al., 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with
    Adaptive Feed Forward Skipping", https://arxiv.org/abs/2404.03865.

    Args:
        schedule: ``schedules.adaptive(threshold, "cosine", warmup, max_skip)``; default
            ``adaptive(0.95, "cosine", warmup=4, max_skip=0.25)``. After a hot FFN whose
            input/output cosine similarity is >= ``threshold`` the next ``span`` hot FFNs are
            skipped; the first ``warmup`` generated tokens run in full; at most ``max_skip`` of a
            token's FFN blocks are skipped (the paper's operating point is 25-30 %).
        cold: ``(first, last)`` numbers of layers at the bottom and top whose FFNs never skip;
            default ``None``: about 15 % at the bottom and 10 % at the top.
        span: hot FFNs skipped after each saturated one; default 2.
    """

    technique: ClassVar[str] = "ffn_skip"
    schedule: AdaptiveSchedule = AdaptiveSchedule(threshold=0.95, signal="cosine", warmup=4, max_skip=0.25)
    cold: tuple[int, int] | None = None
    span: int = 2

    def __post_init__(self) -> None:
        if self.schedule.signal != "cosine":
            raise ValueError("FFNSkipConfig.schedule must be schedules.adaptive(threshold, signal='cosine', ...)")
        if self.span < 1:
            raise ValueError(f"FFNSkipConfig.span must be >= 1, got {self.span}")
        if self.cold is not None and min(self.cold) < 0:
            raise ValueError(f"FFNSkipConfig.cold must be (first, last) non-negative layer counts, got {self.cold}")

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on causal LMs: the cosine threshold, the skip cap and the span."""
        if context.kind != "lm" or not context.num_layers or context.num_layers < 4:
            return None
        from ..tuning.space import FloatRange, IntRange, Space

        def build(v: dict[str, Any]) -> FFNSkipConfig:
            schedule = AdaptiveSchedule(threshold=v["threshold"], signal="cosine", warmup=4, max_skip=v["max_skip"])
            return cls(schedule=schedule, span=v["span"])

        return Space(cls.technique, {"threshold": FloatRange(0.8, 0.999), "max_skip": FloatRange(0.1, 0.6),
                                     "span": IntRange(1, 3)}, build,
                     seeds=({"threshold": 0.95, "max_skip": 0.25, "span": 2},))  # the paper's operating point

    def hot_layers(self, num_layers: int) -> range:
        first, last = self.cold if self.cold is not None else (round(0.15 * num_layers), round(0.10 * num_layers))
        if first + last >= num_layers:
            raise ValueError(f"cold={first, last} leaves no hot layer in a {num_layers}-layer model")
        return range(first, num_layers - last)

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_ffn_skip

        attach_ffn_skip(self, model, handle)
