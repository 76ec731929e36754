"""Feature inheritance (A-SDM, Zhu et al., 2024): reuse features computed at an earlier denoising step.

On a *recompute* step every target runs and its features are cached; on an *inherit* step a
target does not run and its cached features stand in. Granularities (A-SDM's block / layer /
unit, see :mod:`mmskip.diffusion.adapters`):

* ``block``: UNet ``down_blocks.i`` / ``mid_block`` / ``up_blocks.i`` return their cached
  outputs (with the default targets this is DeepCache's shallow/deep split); for diffusion
  transformers (DiT, PixArt, SD3, Flux, Qwen-Image, Wan, ...) a range ``<stack>.a:b`` of one
  block list (``transformer_blocks.1:18``, ``single_transformer_blocks.0:37``) adds its cached
  residual ``out - in`` on each stream to the fresh input, and the blocks inside it do not run.
* ``layer``: attention and feed-forward modules inside blocks return their cached outputs,
  which their block adds to its fresh residual stream.
* ``unit``: residual units (UNet ResNet / Transformer2D layers, single transformer blocks) add
  their cached residual contribution to their fresh input.

Steps are indices of the pipeline's ``num_inference_steps`` grid (see :mod:`mmskip.diffusion.tracker`). The
shared scheduler picks the recompute steps: ``interval(k)`` (uniform), ``explicit(keep=...)``
or :func:`mmskip.diffusion.step_schedules.nonuniform` (denser where the trajectory moves fast),
or ``adaptive(threshold, signal="relative_change")``: a cheap probe (the first block, always
computed) is compared with its value at the last recompute step and the step recomputes when
its relative change exceeds the threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from mmskip.inject import SkipHandle
from mmskip.schedules import AdaptiveSchedule, ExplicitSchedule, IntervalSchedule, Schedule, interval

from ..adapters import GRANULARITIES
from ..plan import DenoiserConfig, check_step_schedule

__all__ = ["FeatureInheritanceConfig", "step_computes", "never_inherits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureInheritanceConfig(DenoiserConfig):
    """Inherit features of ``targets`` at ``granularity`` on the steps ``schedule`` does not compute.

    Feature inheritance from A-SDM (Zhu et al., 2024, "A-SDM: Accelerating Stable Diffusion
    through Model Assembly and Feature Inheritance Strategies"), https://arxiv.org/abs/2406.00210.
    A model-level technique: ``mmskip.apply(denoiser, config)``, or ``pipe.enable_skip(config)``
    on an ``mmskip.pipelines`` pipeline.

    Args:
        schedule: which denoising steps recompute (default ``interval(3)``: every third step).
            Static schedules index the pipeline's ``num_inference_steps`` grid (the user's step
            numbers, also when step skipping or the teleport visit only some of them); one built
            with ``num=`` must match ``num_inference_steps``. ``adaptive(threshold,
            "relative_change" | "cosine")`` recomputes when the probe moved more than
            ``threshold`` since the last recompute.
        granularity: ``"block"`` (default), ``"layer"`` or ``"unit"``: what a target is (UNet
            blocks / transformer block ranges; attention and feed-forward modules; residual units).
        targets: module names (or transformer ranges ``"transformer_blocks.a:b"``, any of the
            model's block lists: ``"single_transformer_blocks.0:37"``, Wan's ``"blocks.1:39"``) whose features
            are inherited; default ``None``: the adapter's deep region (all blocks but the first
            and the last).
        probe: adaptive schedules only: the module whose output is the cheap probe; default
            ``None``: the first block.
        measure_flops: count FLOPs once on the first call so that
            ``handle.stats()["flops_fraction"]`` is the fraction actually spent (default True).
    """

    technique: ClassVar[str] = "feature_inheritance"
    schedule: Schedule = field(default_factory=lambda: interval(3))
    granularity: str = "block"
    targets: tuple[str, ...] | None = None
    probe: str | None = None
    measure_flops: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be an mmskip.schedules schedule, got {type(self.schedule).__name__}")
        if isinstance(self.schedule, AdaptiveSchedule) and self.schedule.signal not in ("relative_change", "cosine"):
            raise ValueError(
                f"feature inheritance measures the probe's 'relative_change' or 'cosine' similarity between "
                f"steps; adaptive signal {self.schedule.signal!r} is not supported"
            )
        if isinstance(self.targets, str):
            raise TypeError("targets must be a tuple of module names, not a single string")
        if self.targets is not None and len(self.targets) == 0:
            raise ValueError("targets=() inherits nothing; pass None for the default targets")
        if self.probe is not None and not isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError("probe= is only used by adaptive schedules")

    def validate(self, num_steps: int | None = None) -> None:
        """Raise ``ValueError`` if a static schedule does not fit a ``num_steps`` grid (pipelines
        call this at the start of each call, before anything changes)."""
        if num_steps is not None:
            check_step_schedule(self.schedule, num_steps, "FeatureInheritanceConfig")

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on a pipeline's denoiser: the schedule (``interval:k``, recompute every k-th step;
        ``nonuniform:f``, recompute a fraction f of the steps, denser early; ``adaptive:t``, recompute
        when the probe moved more than t), the named target set (``context.facts["target_sets"]``:
        ``default`` and the target's others, e.g. ``deep`` / ``all``) and the granularity. One
        categorical per field keeps the space small enough for a budget of tens of trials.
        Non-block granularities use their default region (target sets are block ranges)."""
        if context.kind != "denoiser" or not context.num_steps or context.num_steps < 3:
            return None
        from mmskip.schedules import adaptive
        from mmskip.tuning.space import Choice, Space

        from ..step_schedules import nonuniform

        sets: dict[str, Any] = dict(context.facts.get("target_sets") or {"default": None})

        def build(v: dict[str, Any]) -> FeatureInheritanceConfig:
            n = int(v.get("num_inference_steps") or context.num_steps)
            kind, _, arg = v["schedule"].partition(":")
            if kind == "interval":
                if int(arg) >= n:
                    raise ValueError(f"interval({arg}) recomputes only step 0 of {n} steps")
                sched: Schedule = interval(int(arg))
            elif kind == "nonuniform":
                sched = nonuniform(n, max(2, min(n - 1, round(float(arg) * n))), power=1.5)
            else:
                sched = adaptive(float(arg), "relative_change", warmup=2)
            targets = sets[v["targets"]] if v["granularity"] == "block" else None  # sets are block ranges
            return cls(sched, granularity=v["granularity"], targets=targets, measure_flops=False)

        schedules = ("interval:2", "interval:3", "interval:4", "nonuniform:0.35", "nonuniform:0.5", "nonuniform:0.65",
                     "adaptive:0.05", "adaptive:0.1", "adaptive:0.2")
        # seeds: DeepCache-style inheritance of the deep blocks every 2nd step at about half the steps
        half = {"num_inference_steps": max(3, round(context.num_steps / 2)), "sampler": context.facts.get("sampler")}
        seeds = tuple({"schedule": "interval:2", "targets": t, "granularity": "block", **half}
                      for t in ("all", "deep", "deepcache") if t in sets)[:2]
        return Space(cls.technique, {"schedule": Choice(schedules), "targets": Choice(tuple(sets)),
                                     "granularity": Choice(GRANULARITIES)}, build, seeds=seeds)

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach

        attach(self, model, handle)


def step_computes(schedule: Schedule, step: int, num_steps: int | None) -> bool:
    """Whether a static ``schedule`` recomputes denoising ``step`` (of ``num_steps`` if known)."""
    n = num_steps if num_steps is not None else getattr(schedule, "num", None)
    if n is None:
        n = step + 1
        if isinstance(schedule, ExplicitSchedule) and schedule.ratio_list is None:
            idx = schedule.keep_idx if schedule.keep_idx is not None else schedule.skip_idx
            n = max(n, max(idx, default=0) + 1)
        elif isinstance(schedule, ExplicitSchedule):
            n = len(schedule.ratio_list)
    if step >= n:
        return True
    r = schedule.ratios(n)[step]
    if 0.0 < r < 1.0:
        raise ValueError(f"a step schedule must give 0 (inherit) or 1 (recompute) per step, got {r}")
    return r > 0


def never_inherits(schedule: Schedule) -> bool:
    """Whether a static ``schedule`` recomputes every step of any trajectory (``interval(1)``,
    ``explicit(skip=())``, ``explicit(ratios=[1.0, ...])``): then no feature is ever cached."""
    if isinstance(schedule, IntervalSchedule):
        return schedule.every == 1
    if isinstance(schedule, ExplicitSchedule):
        return schedule.skip_idx == () or (schedule.ratio_list is not None and all(r == 1.0 for r in schedule.ratio_list))
    return False
