"""mmskip.diffusion: feature inheritance, step skipping and analytic early steps for diffusion models."""

from . import adapters as adapters  # registers the diffusion adapters
from . import zoo_loaders as zoo_loaders  # registers the zoo loaders of scenes-flux's control branches
from .gaussian import GaussianStats, GaussianTeleportConfig, teleport
from .inheritance import FeatureInheritanceConfig, InheritanceState, step_computes
from .plan import SamplerConfig, SamplerPlan, check_step_schedule
from .sampler import SUPPORTED_SAMPLERS, plan_sampler
from .step_schedules import from_changes, nonuniform
from .step_skip import StepSkipConfig
from .unet_switch import UNetSwitchConfig

__all__ = [
    "FeatureInheritanceConfig",
    "InheritanceState",
    "SamplerConfig",
    "SamplerPlan",
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
