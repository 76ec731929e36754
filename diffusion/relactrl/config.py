"""RelaCtrl's control skipping as a technique: which control positions of a ControlNet do not run.

RelaCtrl (Cao et al., 2025, https://arxiv.org/abs/2502.14377) scores every control position of a
trained transformer ControlNet by skipping it at inference (:func:`.relevance.relevance`);
:class:`ControlSkipConfig` is that skipping, applied with ``mmskip.apply(controlnet, config)``
(or :func:`.positions.skipped_control` for a ``with`` block).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mmskip.inject import SkipConfig, SkipHandle

__all__ = ["ControlSkipConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlSkipConfig(SkipConfig):
    """Skip control positions of a transformer ControlNet: each skipped control block passes its
    input on and its output projection adds a zero residual; neither is computed.

    RelaCtrl (Cao et al., 2025, "RelaCtrl: Relevance-Guided Efficient Control for Diffusion
    Transformers"), https://arxiv.org/abs/2502.14377: its relevance probe skips one position at a
    time. Apply it to the ControlNet (``FluxControlNetModel``, ``SD3ControlNetModel``, PixArt-style
    branches, :class:`~mmskip.diffusion.relactrl.RelaCtrlFluxNet`):
    ``mmskip.apply(controlnet, config)``; ``handle.remove()`` restores it exactly.

    Args:
        positions: the names of the control positions to skip, ``"double.i"`` / ``"single.i"``
            (see :func:`~mmskip.diffusion.relactrl.control_positions`); default ``()`` skips
            nothing. A name the ControlNet does not have is refused when applied.
    """

    technique: ClassVar[str] = "relactrl"
    positions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.positions, str):
            raise TypeError("positions must be a tuple of control position names, not a single string")
        if len(set(self.positions)) != len(self.positions):
            raise ValueError(f"positions {list(self.positions)} name a control position twice; give each once")

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach

        attach(self, model, handle)
