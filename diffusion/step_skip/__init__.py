"""Step skipping: the sampler visits only the grid steps a static schedule keeps.

A sampler-level technique (:class:`mmskip.diffusion.plan.SamplerConfig`): it has no hooks and
no state; its work is :meth:`StepSkipConfig.plan`, which a drop-in pipeline runs at the start
of each call (the planned sampler is :func:`mmskip.diffusion.sampler.plan_sampler`'s).

* :mod:`.config`: :class:`StepSkipConfig`.
"""

from .config import StepSkipConfig

__all__ = ["StepSkipConfig"]
