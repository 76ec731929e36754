"""Samplers by name, for tuning and for users: ``"dpm++2m"``, ``"ddim"``, ``"euler"``, ``"unipc"``,
``"flow-euler"``; swapping one in keeps the pipeline's trained noise schedule (its scheduler config).
Flow-matching models keep their own sampler."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["ALTERNATIVE_SAMPLERS", "sampler_name", "make_scheduler", "plannable", "is_flow"]

logger = logging.getLogger(__name__)

ALTERNATIVE_SAMPLERS = ("dpm++2m", "euler", "unipc")
_NAMES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "UniPCMultistepScheduler": "unipc",
          "FlowMatchEulerDiscreteScheduler": "flow-euler"}


def sampler_name(scheduler: Any) -> str:
    """``"dpm++2m"``, ``"ddim"``, ``"euler"``, ``"unipc"``, ``"flow-euler"``, else the class name."""
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler":
        cfg = scheduler.config
        return "dpm++2m" if cfg.algorithm_type == "dpmsolver++" and cfg.solver_order == 2 else name
    return _NAMES.get(name, name)


def is_flow(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching sampler (its model predicts a velocity, not noise)."""
    return any(c.__name__.startswith("FlowMatch") for c in type(scheduler).__mro__)


def make_scheduler(scheduler: Any, name: str) -> Any:
    """The sampler ``name`` on ``scheduler``'s trained noise schedule (its config); ``scheduler``
    itself when it already is that sampler. Flow-matching models keep their own sampler."""
    if name == sampler_name(scheduler):
        return scheduler
    if is_flow(scheduler):
        raise ValueError(f"sampler {name!r} needs a diffusion (epsilon / v) model; {type(scheduler).__name__} is "
                         f"flow matching: use its own {sampler_name(scheduler)!r}")
    import diffusers

    cfg = scheduler.config
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    classes = {v: k for k, v in _NAMES.items() if v != "flow-euler"}
    cls = getattr(diffusers, classes.get(name, name), None)
    if cls is None or not hasattr(cls, "from_config") or not name[:1].isalpha():
        raise ValueError(f"unknown sampler {name!r}; choose the pipeline's own, or one of "
                         f"{('ddim',) + ALTERNATIVE_SAMPLERS}")
    return cls.from_config(cfg)


def plannable(scheduler: Any, name: str) -> bool:
    """Whether sampler-level techniques (step skipping, the teleport) can plan sampler ``name``."""
    from .sampler import sampler_kind

    try:
        sampler_kind(make_scheduler(scheduler, name))
    except ValueError:
        return False
    return True
