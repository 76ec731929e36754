"""The drop-in pipelines: each is its diffusers parent plus :class:`SkipPipelineMixin`.

``save_pretrained`` writes the parent's class name, so plain diffusers loads the folder.
"""

from __future__ import annotations

import logging
from typing import Any

from diffusers import (
    DiTPipeline,
    FluxControlNetPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
)

from .mixin import SkipPipelineMixin

logger = logging.getLogger(__name__)

__all__ = [
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


class SkipStableDiffusionPipeline(SkipPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x) with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "unet"


class SkipStableDiffusionXLPipeline(SkipPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "unet"


class SkipDiTPipeline(SkipPipelineMixin, DiTPipeline):
    """``DiTPipeline`` (class-conditional DiT) with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"
    _mmskip_prepares_latents = False  # draws its latents inline: the planned sampler maps them at its first step


class SkipPixArtAlphaPipeline(SkipPipelineMixin, PixArtAlphaPipeline):
    """``PixArtAlphaPipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"


class SkipStableDiffusion3Pipeline(SkipPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"


class SkipFluxPipeline(SkipPipelineMixin, FluxPipeline):
    """``FluxPipeline`` (FLUX.1) with mmskip's feature inheritance and step skipping.

    Inheritance ranges may cover both block lists (``transformer_blocks.a:b``,
    ``single_transformer_blocks.a:b``); step skipping runs the flow-matching Euler sampler on a
    subset of the dynamically shifted grid. The analytic early-step jump is refused (Flux's
    latents are packed and its grid depends on the image size).
    """

    _mmskip_denoiser = "transformer"


class SkipQwenImagePipeline(SkipPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` with mmskip's feature inheritance and step skipping."""

    _mmskip_denoiser = "transformer"


class SkipWanPipeline(SkipPipelineMixin, WanPipeline):
    """``WanPipeline`` (text-to-video) with mmskip's feature inheritance and step skipping.

    Every frame's tokens go through the same blocks, so inheriting a block range saves its
    compute for the whole clip. With Wan 2.2's second expert (``transformer_2``), inheritance is
    would need one trajectory across two denoisers: model-level techniques are refused while
    ``transformer_2`` is set (step skipping still works).
    """

    _mmskip_denoiser = "transformer"

    def _denoiser(self) -> Any:
        if getattr(self, "transformer_2", None) is not None:
            raise ValueError(
                "SkipWanPipeline: feature inheritance on a two-expert Wan 2.2 pipeline (transformer_2 set) is not "
                "supported; the steps are split between two denoisers. Use StepSkipConfig, or a single-expert model"
            )
        return super()._denoiser()


# -- image-conditioned variants ------------------------------------------------------------------
# strength < 1 runs only the last grid steps; every schedule keeps indexing the full
# num_inference_steps grid (see SkipPipelineMixin.get_timesteps). A ControlNet runs on every
# step: its residuals are added fresh to the inherited features (they depend on the timestep).


class SkipStableDiffusionImg2ImgPipeline(SkipPipelineMixin, StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` with mmskip's techniques; ``strength`` maps onto grid steps."""

    _mmskip_denoiser = "unet"


class SkipStableDiffusionInpaintPipeline(SkipPipelineMixin, StableDiffusionInpaintPipeline):
    """``StableDiffusionInpaintPipeline`` with mmskip's techniques; ``strength`` maps onto grid steps."""

    _mmskip_denoiser = "unet"


class SkipStableDiffusionControlNetPipeline(SkipPipelineMixin, StableDiffusionControlNetPipeline):
    """``StableDiffusionControlNetPipeline``: the UNet inherits features, the ControlNet runs every step."""

    _mmskip_denoiser = "unet"

    def _check_components(self) -> None:
        unet = self.unet
        want = 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)
        nets = getattr(self.controlnet, "nets", [self.controlnet])
        for i, net in enumerate(nets):
            got = len(net.controlnet_down_blocks)
            if got != want:
                raise ValueError(
                    f"controlnet{'' if len(nets) == 1 else f' {i}'} gives {got} down-block residuals but the UNet has "
                    f"{want} skip connections; it was built for another UNet (ControlNetModel.from_unet(pipe.unet))"
                )


class SkipFluxImg2ImgPipeline(SkipPipelineMixin, FluxImg2ImgPipeline):
    """``FluxImg2ImgPipeline`` with mmskip's techniques; ``strength`` maps onto grid steps."""

    _mmskip_denoiser = "transformer"


class SkipFluxControlNetPipeline(SkipPipelineMixin, FluxControlNetPipeline):
    """``FluxControlNetPipeline``: the transformer inherits block residuals; the ControlNet runs every
    step and its block samples are added fresh between the blocks."""

    _mmskip_denoiser = "transformer"
