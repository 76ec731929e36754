"""mmskip.diffusion: feature inheritance, step skipping and analytic early steps for diffusion models."""

from . import adapters as adapters  # registers the diffusion adapters
from .inheritance import FeatureInheritanceConfig, step_computes

__all__ = ["FeatureInheritanceConfig", "step_computes"]
