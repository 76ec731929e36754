"""Step skipping: the sampler visits only the steps the shared scheduler keeps.

Where the trajectory is near-linear the sampler takes one larger step instead of several
small ones (see :mod:`mmskip.diffusion.sampler` for how each supported sampler does it: DDIM,
Euler, DPM-Solver++; others are refused). The keep set is static (``interval``, ``explicit``,
:func:`mmskip.diffusion.step_schedules.nonuniform`, or
:func:`~mmskip.diffusion.step_schedules.from_changes` on changes measured in a calibration run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmskip.schedules import AdaptiveSchedule, Schedule, interval

from ..plan import SamplerConfig, SamplerPlan, check_step_schedule

__all__ = ["StepSkipConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSkipConfig(SamplerConfig):
    """Visit only the grid steps ``schedule`` keeps; the sampler steps straight between them.

    A sampler-level technique: enable it with ``pipe.enable_skip(config)`` on an
    ``mmskip.pipelines`` pipeline (``mmskip.apply`` refuses it). No paper: this is the
    sampler run on a coarser subset of its own grid.

    Args:
        schedule: which of the pipeline's ``num_inference_steps`` grid steps run (default
            ``interval(2)``: every other step). A static ``mmskip.schedules`` schedule indexed by
            grid step; one built with ``num=`` must match ``num_inference_steps`` (checked at the
            start of each call). Grid step 0 always runs.
    """

    technique: ClassVar[str] = "step_skip"
    schedule: Schedule = field(default_factory=lambda: interval(2))

    def __post_init__(self) -> None:
        if isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError(
                "step skipping needs a static schedule (the sampler's grid is fixed before sampling); "
                "measure changes once and use mmskip.diffusion.step_schedules.from_changes(...)"
            )
        own = getattr(self.schedule, "num", None)
        if own is not None:
            self.validate(own)

    def validate(self, num_steps: int | None = None) -> None:
        if num_steps is not None:
            check_step_schedule(self.schedule, num_steps, "StepSkipConfig")

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on a pipeline's denoiser: the fraction of the grid visited and how the visited
        steps bunch (``power`` > 1: denser early, < 1: denser late; 1 is plain fewer steps, which
        the target measures anyway). Built for the sampled ``num_inference_steps``."""
        if context.kind != "denoiser" or not context.num_steps or context.num_steps < 4:
            return None
        from mmskip.tuning.space import FloatRange, Space

        from ..step_schedules import nonuniform

        def build(v: dict[str, Any]) -> StepSkipConfig:
            n = int(v.get("num_inference_steps") or context.num_steps)
            if n < 4:
                raise ValueError(f"step skipping needs at least 4 grid steps, got {n}")
            plannable = context.facts.get("plannable_samplers")
            if plannable is not None and v.get("sampler") not in plannable:
                raise ValueError(f"step skipping cannot plan the {v.get('sampler')} sampler; it plans {plannable}")
            keep = max(2, min(n - 1, round(v["keep_fraction"] * n)))
            return cls(nonuniform(n, keep, power=v["power"]))

        return Space(cls.technique, {"keep_fraction": FloatRange(0.3, 0.85), "power": FloatRange(0.6, 2.0)}, build)

    def keep(self, num_steps: int) -> list[int]:
        """The grid steps the sampler visits (of ``num_steps``)."""
        runs = check_step_schedule(self.schedule, num_steps, "StepSkipConfig")
        return sorted({i for i, r in enumerate(runs) if r} | {0})

    def plan(self, scheduler: Any, plan: SamplerPlan) -> SamplerPlan:
        runs = check_step_schedule(self.schedule, plan.num_steps, "StepSkipConfig")
        first = plan.keep[0]
        keep = tuple(k for k in plan.keep if k == first or runs[k])
        return SamplerPlan(plan.num_steps, keep, plan.first_step)
