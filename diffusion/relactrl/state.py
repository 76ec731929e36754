"""RelaCtrl control skipping's state (``handle.state``): the control positions one application skips."""

from __future__ import annotations

import logging
from typing import Any

from mmskip.inject import TechniqueState

__all__ = ["ControlSkipState"]

logger = logging.getLogger(__name__)


class ControlSkipState(TechniqueState):
    """The skipped control positions (names, in the ControlNet's order). Nothing is remembered
    between calls: every call skips the same positions."""

    def __init__(self, positions: tuple[str, ...]) -> None:
        self.positions = positions

    def stats(self) -> dict[str, Any]:
        return {"skipped_positions": list(self.positions)}
