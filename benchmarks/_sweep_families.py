"""The two model families ``vision_tokens_sweep.py`` sweeps: what differs between p-MoD on the image VLM
``digits-llava`` and VideoLLM-MoD on the video VLM ``digits-video``.

A :class:`Family` names its models, question types and vision-token unit (an image's 8x8 grid, a frame's
4x4 grid), and gives the sweep its model, held-out questions, prompts, accuracy, probe batch, MoD config
and pooling peer. The image family reuses ``vision_tokens.py``'s functions, the video family
``video_tokens.py``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import video_tokens as vid
import vision_tokens as img
from mmskip.vision import MoDConfig, VideoMoDConfig

from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.zoo import llava_data as ImageData
from mmskip.zoo import video_data as VideoData

Remove = Callable[[], None]


def pool_grid(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(batch, s*s, d) tokens of square grids -> (batch, s*s / (kh*kw), d), averaged over ``window``."""
    B, n, d = x.shape
    s = math.isqrt(n)
    return F.avg_pool2d(x.transpose(1, 2).reshape(B, d, s, s), window).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class Family:
    """One model family of the sweep (see the module docstring)."""

    name: str  # "image" | "video": the --family value
    method: str  # label of its MoD rows ("p-MoD", "VideoLLM-MoD")
    default_model: str  # zoo name swept by default
    smoke_model: str  # tiny random model of --smoke
    results: str  # stem of the default output in benchmarks/results
    qtypes: tuple[str, ...]
    n_tokens: int  # vision tokens of one image / one frame, before pooling
    unit: str  # "image" | "frame": what n_tokens counts
    build_model: Callable[[str], tuple[Any, Any]]  # name -> (model, tokenizer)
    questions: Callable[[Any, int], Any]  # (tokenizer, per type) -> the held-out batch
    inputs: Callable[[Any, Any, list[int], int], dict[str, torch.Tensor]]  # (tok, batch, rows, tokens a unit)
    accuracy: Callable[[Any, Any, Any, int, int], tuple[dict[str, float], list[int]]]  # per type, preds in order
    probe: Callable[[Any, int], list[int]]  # (batch, size) -> rows the FLOPs are counted on
    config: Callable[[list[float], str, str | None], MoDConfig]  # (per-layer ratios, signal, routers)
    pool: Callable[[Any, tuple[int, int]], Remove]  # (model, window) -> undo: pool every unit's grid


def _image_probe(data: Any, size: int) -> list[int]:
    n = len(data.questions)
    return list(range(0, n, max(1, n // size)))[:size]


def _image_config(ratios: list[float], signal: str, routers: str | None) -> MoDConfig:
    return MoDConfig(schedule=schedules.explicit(ratios=ratios), signal=signal, routers=routers)


def _image_pool(model: Any, window: tuple[int, int]) -> Remove:
    """A forward hook on the projector pooling its grid of image features."""
    projector = get_adapter(model, "vlm").mm_model.multi_modal_projector
    return projector.register_forward_hook(lambda module, args, out: pool_grid(out, window)).remove


def _video_config(ratios: list[float], signal: str, routers: str | None) -> MoDConfig:
    return VideoMoDConfig(schedule=schedules.explicit(ratios=ratios), signal=signal, routers=routers)


def _video_pool(model: Any, window: tuple[int, int]) -> Remove:
    """Each frame's pooled grid (LLaVA-OneVision's ``apply_pooling``) pooled once more over ``window``."""
    inner = model.model
    original = inner.apply_pooling
    inner.apply_pooling = lambda x: pool_grid(original(x), window)

    def remove() -> None:
        del inner.apply_pooling  # back to the class's method

    return remove


IMAGE = Family("image", "p-MoD", "digits-llava", img.SMOKE_MODEL, "vision_tokens_sweep", ImageData.QTYPES,
               ImageData.N_IMAGE_TOKENS, "image", img.build_model, img.questions, img.inputs, img.accuracy,
               _image_probe, _image_config, _image_pool)
VIDEO = Family("video", "VideoLLM-MoD", "digits-video", vid.SMOKE_MODEL, "video_tokens_sweep", VideoData.QTYPES,
               VideoData.TOKENS_PER_FRAME, "frame", vid.build_model, vid.questions, vid.prompts, vid.accuracy,
               vid.probe_rows, _video_config, _video_pool)
FAMILIES = {f.name: f for f in (IMAGE, VIDEO)}


def family_for(name: str | None, model: str | None) -> Family:
    """``--family`` if given, else the family whose default or smoke model ``model`` names, else image."""
    if name is not None:
        return FAMILIES[name]
    return next((f for f in FAMILIES.values() if model in (f.default_model, f.smoke_model)), IMAGE)
