"""What an applied :class:`~mmskip.layer_skip.LayerSkipConfig` remembers: which layers skip, when."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..inject import TechniqueState

if TYPE_CHECKING:
    from .._phase import ForwardState
    from ..registry import DecoderAdapter

__all__ = ["LayerSkipState", "SkipPlan"]


class SkipPlan:
    """Which layers the current forward skips; shared by all layer hooks of one handle."""

    def __init__(self, adapter: DecoderAdapter, state: ForwardState, phase: str, skip: set[int]) -> None:
        self.state = state
        self.phase = phase
        self.skip = frozenset(skip)
        self.cache_idx = [getattr(adapter.attention(i), "layer_idx", i) for i in range(adapter.num_layers)]

    def skips(self, i: int) -> bool:
        # the phase first: a compiled prompt forward of a decode-phase plan then never reads the skip
        # set, so it does not guard on it (void layers change the set with every prompt)
        return (self.phase == "all" or self.state.phase == "decode") and i in self.skip

    def splices(self, i: int) -> bool:
        """A ``generate(use_cache=False)`` step: layer ``i`` runs, but only for the prompt's tokens."""
        return self.phase == "decode" and self.state.phase == "recompute" and i in self.skip

    def source(self, i: int) -> int | None:
        """Nearest lower kept layer: the one whose KV a skipped layer ``i`` copies."""
        for j in range(i - 1, -1, -1):
            if j not in self.skip:
                return j
        return None


@dataclass
class LayerSkipState(TechniqueState):
    """State of an applied :class:`LayerSkipConfig`: the forward tracker and the skip plan."""

    forward: ForwardState
    plan: SkipPlan

    def stats(self) -> dict[str, Any]:
        return {"skipped_layers": sorted(self.plan.skip), "phase": self.plan.phase}
