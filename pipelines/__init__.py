"""mmskip.pipelines: drop-in diffusers pipelines with feature inheritance, step skipping and analytic early steps."""

from .mixin import SkipPipelineMixin
from .pipelines import (
    SkipDiTPipeline,
    SkipPixArtAlphaPipeline,
    SkipStableDiffusion3Pipeline,
    SkipStableDiffusionPipeline,
    SkipStableDiffusionXLPipeline,
)

__all__ = [
    "SkipPipelineMixin",
    "SkipStableDiffusionPipeline",
    "SkipStableDiffusionXLPipeline",
    "SkipDiTPipeline",
    "SkipPixArtAlphaPipeline",
    "SkipStableDiffusion3Pipeline",
]
