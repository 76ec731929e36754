"""Multi-UNet switching (A-SDM): the full denoiser on some steps, a lighter one on the others.

A-SDM validates "the multi-UNet switching method for improving network speed"
(https://arxiv.org/abs/2406.00210): early steps decide the layout, late steps the detail, and
they need not run the same network. :class:`UNetSwitchConfig` is a sampler-level technique:
for each pipeline call it routes every denoiser call of the chosen grid steps to the light
UNet (e.g. one built by :mod:`mmskip.diffusion.assembly`), through a hook on the pipeline's
own denoiser that is removed when the call ends: :meth:`UNetSwitchConfig.route` gives the
pipeline a :class:`UNetSwitchRoute` (the handle: ``attach`` / ``remove`` / ``stats``) holding
the call's :class:`UNetSwitchState`. It composes with feature inheritance: the
route sits inside inheritance's hooks, so inheritance still sees every step; on light steps
the full UNet's blocks do not run, and inheritance reuses the features of its last full step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..plan import SamplerConfig, SamplerPlan
from .hooks import UNetSwitchRoute

__all__ = ["UNetSwitchConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetSwitchConfig(SamplerConfig):
    """Run the light UNet ``light`` on part of the steps and the pipeline's own UNet on the rest.

    Multi-UNet switching from A-SDM (Zhu et al., 2024), https://arxiv.org/abs/2406.00210.
    Enable it with ``pipe.enable_skip(config)`` on an ``mmskip.pipelines`` pipeline (alone, or
    with a ``FeatureInheritanceConfig`` or step skipping).

    Args:
        light: a folder holding the light UNet (``save_assembled`` / ``save_pretrained``, or a
            pipeline folder with ``unet/``) or a zoo model name (e.g. ``"digits-sd-assembled"``).
            It must take the same inputs as the pipeline's UNet (an assembled UNet does).
        full_fraction: the fraction of the grid's steps that run the full UNet (default 0.5;
            rounded to whole steps).
        full_first: ``True`` (default): the full UNet runs the first (noisiest) steps, which set
            the layout, and the light one the rest; ``False``: the reverse.
    """

    technique: ClassVar[str] = "unet_switch"
    light: str = ""
    full_fraction: float = 0.5
    full_first: bool = True

    def __post_init__(self) -> None:
        if not self.light:
            raise ValueError("give light= : a folder with the light UNet or a zoo model name")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise ValueError(f"full_fraction must lie in [0, 1], got {self.full_fraction}")

    def validate(self, num_steps: int | None = None) -> None:
        self.folder()

    def folder(self) -> Path:
        """Where the light UNet is (a ``FileNotFoundError`` says what to do if nowhere)."""
        p = Path(self.light)
        if p.is_dir():
            return p
        from mmskip import zoo

        if self.light in zoo.NAMES:
            return zoo.path(self.light)
        raise FileNotFoundError(
            f"light={self.light!r} is neither a folder nor a zoo model; build one with "
            "mmskip.diffusion.assembly (python -m mmskip.diffusion.assembly) and pass its folder"
        )

    def full_steps(self, num_steps: int) -> set[int]:
        """The grid steps (of ``num_steps``) that run the full UNet."""
        k = round(self.full_fraction * num_steps)
        return set(range(k)) if self.full_first else set(range(num_steps - k, num_steps))

    def route(self, plan: SamplerPlan) -> UNetSwitchRoute:
        """The switch for one call that runs ``plan`` (attached by the pipeline); which steps run
        is unchanged (:meth:`plan` keeps the default), only which network runs them."""
        return UNetSwitchRoute(self, plan)
