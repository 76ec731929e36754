"""What a drop-in pipeline (``mmskip.pipelines``) calls on a diffusion technique: the declared protocols.

Two kinds of configs, each with its declared methods (a pipeline calls nothing else):

* :class:`DenoiserConfig` (model-level, e.g. ``FeatureInheritanceConfig``): ``validate(num_steps)``
  at the start of each call, then applied to the denoiser with ``mmskip.apply`` for that call; the
  per-call methods of its state are :class:`mmskip.inject.TechniqueState`'s (``adopt_costs``,
  ``begin_call``, ``end_call``, ``measured_costs``).
* :class:`SamplerConfig` (which steps run, which network runs them). ``mmskip.apply`` refuses
  it. At the start of every call the pipeline runs ``validate(num_steps)`` on each (before
  anything changes), then ``plan(scheduler, plan)`` on each in turn, starting from
  :meth:`SamplerPlan.full`, then ``route(plan)`` on each. The resulting :class:`SamplerPlan`
  says which grid steps the sampler visits and, optionally, how the state is mapped to the
  first visited step (the Gaussian teleport); a :class:`SamplerRoute` sends some of the
  denoiser's calls elsewhere (multi-UNet switching). A new sampler technique is one
  ``SamplerConfig`` subclass; no pipeline code changes.

Step numbers are always indices of the pipeline's ``num_inference_steps`` grid (the user's
step numbers, 0 = the noisiest step), for sampler-level and model-level configs alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmskip.inject import SkipConfig, SkipHandle
from mmskip.schedules import AdaptiveSchedule, Schedule

__all__ = ["DenoiserConfig", "SamplerConfig", "SamplerPlan", "SamplerRoute", "check_step_schedule"]

logger = logging.getLogger(__name__)

FirstStep = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class SamplerPlan:
    """What a pipeline call runs: ``keep`` (sorted grid steps of a ``num_steps`` grid) and
    ``first_step(sample, scheduler)``, which maps the sample before ``keep[0]`` to the state the
    sampler should hold there (``None``: the sample is used as it is)."""

    num_steps: int
    keep: tuple[int, ...]
    first_step: FirstStep | None = None

    def __post_init__(self) -> None:
        keep = tuple(int(k) for k in self.keep)
        if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= self.num_steps:
            raise ValueError(f"a plan's kept steps must be sorted, distinct indices in 0..{self.num_steps - 1}, got {keep}")
        object.__setattr__(self, "keep", keep)

    @classmethod
    def full(cls, num_steps: int) -> SamplerPlan:
        """Every step of the grid, from the pipeline's own initial noise."""
        return cls(num_steps, tuple(range(num_steps)))

    @property
    def is_full(self) -> bool:
        return self.first_step is None and self.keep == tuple(range(self.num_steps))


@dataclass(frozen=True)
class DenoiserConfig(SkipConfig):
    """Base class of model-level diffusion configs: hooks on the denoiser (``mmskip.apply``).

    A drop-in pipeline applies one for each call, after :meth:`validate`; its state's per-call
    methods are declared by :class:`mmskip.inject.TechniqueState`.
    """

    def validate(self, num_steps: int | None = None) -> None:
        """Raise ``ValueError`` if the config cannot run; ``num_steps=None``: the checks that do
        not need the step count (``enable_skip`` time), else the checks for that grid (call start).
        Default: nothing to check."""


class SamplerRoute:
    """What :meth:`SamplerConfig.route` returns: a change of which network runs some of one call's
    denoiser calls (multi-UNet switching).

    The pipeline calls :meth:`attach` once the denoiser is held for the call (inside the call's
    thread binding, :func:`mmskip.diffusion.tracker.serving_this_thread`, and inside the
    model-level technique's hooks, which still see every step), :meth:`remove` when the call ends
    (also after an error), and :meth:`stats` (still readable after :meth:`remove`) for
    ``skip_stats()``.
    """

    def attach(self, denoiser: nn.Module) -> None:
        """Hook ``denoiser`` for this call."""
        raise NotImplementedError(f"{type(self).__name__} must implement attach()")

    def remove(self) -> None:
        """Remove what :meth:`attach` added; the denoiser is left exactly as it was."""
        raise NotImplementedError(f"{type(self).__name__} must implement remove()")

    def begin_call(self, num_steps: int, visited: tuple[int, ...]) -> None:
        """The call visits only grid steps ``visited`` of ``num_steps`` (img2img / inpainting
        ``strength`` narrows the plan after :meth:`attach`). Default: nothing to do."""

    def stats(self) -> dict[str, Any]:
        """This route's entries in the pipeline's ``skip_stats()``. Default: none."""
        return {}


@dataclass(frozen=True)
class SamplerConfig(SkipConfig):
    """Base class of sampler-level configs (which steps run, which network runs them); see the
    module docstring.

    Subclasses override :meth:`plan` (which steps the sampler visits), :meth:`route` (which
    network runs the visited steps), or both; where a config can be wrong for some step counts
    or needs a resource (a statistics file), also :meth:`validate`.
    """

    def validate(self, num_steps: int | None = None) -> None:
        """Raise ``ValueError`` if the config cannot run; ``num_steps=None``: the checks that do
        not need the step count (``enable_skip`` time), else the checks for that grid (call start).
        Default: nothing to check."""

    def plan(self, scheduler: Any, plan: SamplerPlan) -> SamplerPlan:
        """``plan`` refined by this technique (the pipeline's ``scheduler`` is read, never modified).
        Default: ``plan`` unchanged (a technique that only routes)."""
        return plan

    def route(self, plan: SamplerPlan) -> SamplerRoute | None:
        """How this technique routes the denoiser's calls in a call that runs ``plan`` (not yet
        attached: the pipeline attaches it, see :class:`SamplerRoute`). Default: ``None``, no
        routing (the pipeline's own denoiser runs every visited step)."""
        return None

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        raise TypeError(
            f"{type(self).__name__} changes the sampler, not the model: use pipe.enable_skip(config) on an "
            "mmskip.pipelines pipeline"
        )


def check_step_schedule(schedule: Schedule, num_steps: int, what: str) -> tuple[bool, ...]:
    """Which of ``num_steps`` grid steps a static step ``schedule`` runs (True) or not (False).

    Raises ``ValueError`` naming ``what`` if the schedule was built for another step count,
    names steps outside the grid, or gives fractional ratios.
    """
    if isinstance(schedule, AdaptiveSchedule):
        return (True,) * num_steps
    try:
        ratios = schedule.ratios(num_steps)
    except ValueError as err:
        raise ValueError(
            f"{what}: its schedule does not fit num_inference_steps={num_steps} ({err}) Schedules over steps "
            "index the pipeline's num_inference_steps grid; build it for that many steps."
        ) from None
    bad = sorted({r for r in ratios if 0.0 < r < 1.0})
    if bad:
        raise ValueError(f"{what}: a step schedule must give 0 (skip) or 1 (run) per step, got {bad}")
    return tuple(r > 0 for r in ratios)
