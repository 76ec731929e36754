"""What an applied :class:`~mmskip.first_routers.RouterConfig` remembers: the routers, the skip plan
and what the routers decided for each prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..inject import TechniqueState

if TYPE_CHECKING:
    from .._phase import ForwardState
    from ..layer_skip.state import SkipPlan
    from .routers import Routers

__all__ = ["RouterState"]


class RouterDecisions:
    """What the routers decided for the current prompt; read by the layer hooks."""

    def __init__(self) -> None:
        self.keep_prob: dict[int, torch.Tensor] = {}  # layer -> (batch,) mean keep probability
        self.log: list[list[int]] = []  # skip set of every prefill, in call order


@dataclass
class RouterState(TechniqueState):
    """State of an applied :class:`RouterConfig`: the routers, the plan and their decisions.

    ``decisions.log`` lists the skip set of every prefill in call order; ``reset()`` empties it.
    """

    forward: ForwardState
    plan: SkipPlan
    routers: Routers
    decisions: RouterDecisions = field(default_factory=RouterDecisions)

    def reset(self) -> None:
        self.decisions.log.clear()
        self.decisions.keep_prob.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "skipped_layers": sorted(self.plan.skip),
            "keep_prob": {i: [float(x) for x in p] for i, p in sorted(self.decisions.keep_prob.items())},
        }
