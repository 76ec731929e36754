"""Model assembly's bypass state (``handle.state``): the UNet modules one application bypasses."""

from __future__ import annotations

import logging
from typing import Any

from mmskip.inject import TechniqueState

__all__ = ["BypassState"]

logger = logging.getLogger(__name__)


class BypassState(TechniqueState):
    """The bypassed module names. Nothing is remembered between calls: every call bypasses the
    same modules."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules

    def stats(self) -> dict[str, Any]:
        return {"bypassed": list(self.modules)}
