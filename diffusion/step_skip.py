"""Step skipping: the sampler visits only the steps the shared scheduler keeps.

Where the trajectory is near-linear the sampler takes one larger step instead of several
small ones (see :mod:`mmskip.diffusion.sampler` for how each supported sampler does it: DDIM,
Euler, DPM-Solver++; others are refused). The keep set is static (``interval``, ``explicit``,
:func:`mmskip.diffusion.step_schedules.nonuniform`, or
:func:`~mmskip.diffusion.step_schedules.from_changes` on changes measured in a calibration run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from mmskip.inject import SkipConfig, SkipHandle
from mmskip.schedules import AdaptiveSchedule, Schedule, interval

from .inheritance import step_computes

__all__ = ["StepSkipConfig"]


@dataclass(frozen=True)
class StepSkipConfig(SkipConfig):
    """Visit only the steps ``schedule`` keeps (step 0 always runs). A pipeline-level technique."""

    technique: ClassVar[str] = "step_skip"
    schedule: Schedule = field(default_factory=lambda: interval(2))

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be an mmskip.schedules schedule, got {type(self.schedule).__name__}")
        if isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError(
                "step skipping needs a static schedule (the sampler's grid is fixed before sampling); "
                "measure changes once and use mmskip.diffusion.step_schedules.from_changes(...)"
            )

    def keep(self, num_steps: int) -> list[int]:
        """The grid steps the sampler visits."""
        kept = [i for i in range(num_steps) if step_computes(self.schedule, i, num_steps)]
        return sorted(set(kept) | {0})

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        raise TypeError(
            "StepSkipConfig changes the sampler, not the model: use pipe.enable_skip(config) on an "
            "mmskip.pipelines pipeline"
        )
