"""Analytic early steps (Wang & Vastola, 2023, https://arxiv.org/abs/2303.02490): the first steps
replaced by the closed-form probability-flow ODE solution for Gaussian data.

A sampler-level technique (:class:`mmskip.diffusion.plan.SamplerConfig`): its work is
:meth:`GaussianTeleportConfig.plan`, which a drop-in pipeline runs at the start of each call.

* :mod:`.config`: :class:`GaussianTeleportConfig` (where the stats are, how many steps to skip);
* :mod:`.state`: :class:`GaussianStats`, the data statistics the jump uses;
* :mod:`.hooks`: :func:`teleport` and :func:`teleport_step`, the first-step map the planned
  sampler applies.
"""

from .config import SAVED_STATS, GaussianTeleportConfig
from .hooks import teleport, teleport_step
from .state import GaussianStats

__all__ = ["GaussianStats", "GaussianTeleportConfig", "teleport", "teleport_step", "SAVED_STATS"]
