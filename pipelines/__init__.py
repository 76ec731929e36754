"""mmskip.pipelines: drop-in diffusers pipelines with feature inheritance, step skipping and analytic early steps."""

from .mixin import SKIP_CONFIG_NAME, SkipPipelineMixin, load_skip_configs
from .skip_pipelines import (
    SkipDiTPipeline,
    SkipFluxControlNetPipeline,
    SkipFluxImg2ImgPipeline,
    SkipFluxPipeline,
    SkipPixArtAlphaPipeline,
    SkipQwenImagePipeline,
    SkipStableDiffusion3Pipeline,
    SkipStableDiffusionControlNetPipeline,
    SkipStableDiffusionImg2ImgPipeline,
    SkipStableDiffusionInpaintPipeline,
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
    "SkipStableDiffusionImg2ImgPipeline",
    "SkipStableDiffusionInpaintPipeline",
    "SkipStableDiffusionControlNetPipeline",
    "SkipFluxImg2ImgPipeline",
    "SkipFluxControlNetPipeline",
]
