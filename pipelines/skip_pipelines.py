"""The drop-in pipelines: each is its diffusers parent plus :class:`SkipPipelineMixin`.

``save_pretrained`` writes the parent's class name, so plain diffusers loads the folder.
"""

from __future__ import annotations

import logging

from diffusers import (
    DiTPipeline,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .mixin import SkipPipelineMixin

logger = logging.getLogger(__name__)

__all__ = [
    "SkipStableDiffusionPipeline",
    "SkipStableDiffusionXLPipeline",
    "SkipDiTPipeline",
    "SkipPixArtAlphaPipeline",
    "SkipStableDiffusion3Pipeline",
]


class SkipStableDiffusionPipeline(SkipPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x) with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "unet"


class SkipStableDiffusionXLPipeline(SkipPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "unet"


class SkipDiTPipeline(SkipPipelineMixin, DiTPipeline):
    """``DiTPipeline`` (class-conditional DiT) with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"


class SkipPixArtAlphaPipeline(SkipPipelineMixin, PixArtAlphaPipeline):
    """``PixArtAlphaPipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"


class SkipStableDiffusion3Pipeline(SkipPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"
