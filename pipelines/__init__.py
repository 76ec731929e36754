"""mmskip.pipelines: drop-in diffusers pipelines with feature inheritance, step skipping and analytic early steps."""

from .mixin import SKIP_CONFIG_NAME, SkipPipelineMixin, load_skip_configs
from .skip_pipelines import (
    SkipDiTPipeline,
    SkipFluxPipeline,
    SkipPixArtAlphaPipeline,
    SkipQwenImagePipeline,
    SkipStableDiffusion3Pipeline,
    SkipStableDiffusionPipeline,
    SkipStableDiffusionXLPipeline,
    SkipWanPipeline,
)

__all__ = [
    "SkipPipelineMixin",
    "SKIP_CONFIG_NAME",
    "load_skip_configs",
    "SkipStableDiffusionPipeline",
    "SkipStableDiffusionXLPipeline",
    "SkipDiTPipeline",
    "SkipPixArtAlphaPipeline",
    "SkipStableDiffusion3Pipeline",
    "SkipFluxPipeline",
    "SkipQwenImagePipeline",
    "SkipWanPipeline",
]
