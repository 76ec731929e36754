"""Multi-UNet switching's state: which grid step each denoiser call of one pipeline call belongs
to, and the steps each network ran (the pipeline's ``skip_stats()``)."""

from __future__ import annotations

import logging
from typing import Any

from mmskip.inject import TechniqueState

from ..tracker import StepTracker

__all__ = ["UNetSwitchState"]

logger = logging.getLogger(__name__)


class UNetSwitchState(TechniqueState):
    """What one call's switch remembers: the grid step of each denoiser call (``tracker``) and
    the grid steps each network ran (``steps_full``, ``steps_light``)."""

    def __init__(self, full: set[int]) -> None:
        self.full = full
        self.tracker = StepTracker()
        self.steps_full: list[int] = []
        self.steps_light: list[int] = []

    def reset(self) -> None:
        self.tracker.reset()

    def stats(self) -> dict[str, Any]:
        return {"full_unet_steps": list(self.steps_full), "light_unet_steps": list(self.steps_light)}
