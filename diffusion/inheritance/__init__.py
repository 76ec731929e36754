"""Feature inheritance (A-SDM, Zhu et al., 2024, https://arxiv.org/abs/2406.00210): reuse features
computed at an earlier denoising step.

* :mod:`.config`: :class:`FeatureInheritanceConfig` (what is inherited, on which steps) and
  :func:`step_computes`;
* :mod:`.state`: :class:`InheritanceState`, what one application remembers (``handle.state``);
* :mod:`.hooks`: the hooks on the denoiser, its targets and the adaptive probe, and ``attach``.

``mmskip.apply(denoiser, FeatureInheritanceConfig(...))``, or ``pipe.enable_skip(config)`` on an
``mmskip.pipelines`` pipeline.
"""

from .config import FeatureInheritanceConfig, step_computes
from .state import InheritanceState

__all__ = ["FeatureInheritanceConfig", "InheritanceState", "step_computes"]
