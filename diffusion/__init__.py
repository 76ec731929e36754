"""mmskip.diffusion: feature inheritance, step skipping and analytic early steps for diffusion models.

One folder per technique, named by its id: ``inheritance/``, ``relactrl/``, ``assembly/``, and the
sampler-level ``step_skip/``, ``gaussian_teleport/``, ``unet_switch/``; model facts in
``adapters/``; the sampler-level core at this level: ``plan.py`` (the protocols a drop-in
pipeline calls), ``sampler.py`` (a scheduler on a subset of its grid), ``step_schedules.py``,
``tracker.py`` (grid steps and thread binding, shared by the techniques and the pipelines).
"""

from . import adapters as adapters  # registers the diffusion adapters
from . import zoo_loaders as zoo_loaders  # registers the zoo loaders of scenes-flux's control branches
from .gaussian_teleport import GaussianStats, GaussianTeleportConfig, teleport
from .inheritance import FeatureInheritanceConfig, InheritanceState, step_computes
from .plan import DenoiserConfig, SamplerConfig, SamplerPlan, SamplerRoute, check_step_schedule
from .sampler import SUPPORTED_SAMPLERS, plan_sampler
from .step_schedules import from_changes, nonuniform
from .step_skip import StepSkipConfig
from .unet_switch import UNetSwitchConfig


def _is_pipeline(obj: object) -> bool:
    from .tune_target import is_pipeline

    return is_pipeline(obj)


def _pipeline_target(obj: object, **options: object) -> object:
    from .tune_target import PipelineTarget

    return PipelineTarget(obj, **options)


def _register_tune_target() -> None:
    """``mmskip.tune`` handles diffusers pipelines with :class:`~mmskip.diffusion.tune_target.PipelineTarget`."""
    from mmskip.tuning.target import register_target

    register_target(_is_pipeline, _pipeline_target)


_register_tune_target()

__all__ = [
    "FeatureInheritanceConfig",
    "InheritanceState",
    "DenoiserConfig",
    "SamplerConfig",
    "SamplerPlan",
    "SamplerRoute",
    "check_step_schedule",
    "StepSkipConfig",
    "UNetSwitchConfig",
    "GaussianTeleportConfig",
    "GaussianStats",
    "teleport",
    "plan_sampler",
    "SUPPORTED_SAMPLERS",
    "nonuniform",
    "from_changes",
    "step_computes",
]
