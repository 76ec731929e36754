"""Model assembly's bypass as a technique: UNet modules that run as if removed.

A-SDM's model assembly (Zhu et al., 2024, https://arxiv.org/abs/2406.00210) measures what each
candidate edit is worth by bypassing its modules in the teacher (:mod:`.importance`);
:class:`AssemblyBypassConfig` is that bypass, applied with ``mmskip.apply(unet, config)`` (or
:func:`.importance.bypassed` for a ``with`` block).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mmskip.inject import SkipHandle

from ..plan import DenoiserConfig

__all__ = ["AssemblyBypassConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyBypassConfig(DenoiserConfig):
    """Bypass modules of a ``UNet2DConditionModel``: each returns its input stream, as if removed
    (a residual unit contributes nothing; the mid block passes its hidden states on).

    Model assembly from A-SDM (Zhu et al., 2024, "A-SDM: Accelerating Stable Diffusion through
    Model Assembly and Feature Inheritance Strategies"), https://arxiv.org/abs/2406.00210: the
    bypassed teacher computes exactly what the assembled UNet without those modules computes with
    the teacher's weights (:func:`~mmskip.diffusion.assembly.assemble_unet`).
    ``mmskip.apply(unet, config)``; ``handle.remove()`` restores the UNet exactly.

    Args:
        modules: the names of the UNet's modules to bypass, e.g. an edit's
            ``candidate_edits(unet)[i].modules``; each must be a residual unit (a ResNet, a
            Transformer2D or transformer block) or the mid block. Default ``()`` bypasses nothing.
    """

    technique: ClassVar[str] = "assembly"
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            raise TypeError("modules must be a tuple of module names, not a single string")

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach

        attach(self, model, handle)
