"""How each zoo folder is loaded (used by :func:`mmskip.zoo.load`).

:data:`LOADERS` holds the loaders of the models made of transformers / diffusers / open_clip classes
and the zoo's own; a wing adds the loaders of models made of its classes with
:func:`mmskip.zoo.register_loader` when it is imported (the zoo never imports a wing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["LOADERS", "pop_dtype"]


def pop_dtype(kwargs: dict[str, Any]) -> torch.dtype:
    """The ``dtype`` (or ``torch_dtype``) a loader was given, removed from ``kwargs``; float32 by default."""
    return kwargs.pop("dtype", kwargs.pop("torch_dtype", torch.float32))


def load_classifier(folder: Path, **kwargs: Any) -> Any:
    from .classifier import DigitsClassifier

    return DigitsClassifier.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()


def load_vae(folder: Path, **kwargs: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()


def load_dit(folder: Path, **kwargs: Any) -> Any:
    from diffusers import DiTPipeline

    id2label = {int(k): v for k, v in json.loads((folder / "id2label.json").read_text()).items()}
    return DiTPipeline.from_pretrained(folder, id2label=id2label, dtype=pop_dtype(kwargs), **kwargs)


def load_sd(folder: Path, **kwargs: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    return StableDiffusionPipeline.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs)


def load_clip(folder: Path, **kwargs: Any) -> Any:
    from .clip_model import create

    return create(folder, **kwargs)


def load_lm(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_llava(folder: Path, **kwargs: Any) -> Any:
    """``(LlavaForConditionalGeneration, tokenizer)``; see :mod:`mmskip.zoo.llava_data` for prompts."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_video(folder: Path, **kwargs: Any) -> Any:
    """``(LlavaOnevisionForConditionalGeneration, tokenizer)``; see :mod:`mmskip.zoo.video_data` for prompts."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_florence(folder: Path, **kwargs: Any) -> Any:
    """``(Florence2ForConditionalGeneration, tokenizer)``; see :mod:`mmskip.zoo.florence_data` for prompts."""
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_scenes_classifier(folder: Path, **kwargs: Any) -> Any:
    from .scenes_classifier import ScenesClassifier

    return ScenesClassifier.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs).eval()


def load_scenes_flux(folder: Path, **kwargs: Any) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder, dtype=pop_dtype(kwargs), **kwargs)


LOADERS: dict[str, Callable[..., Any]] = {
    "digits-classifier": load_classifier,
    "digits-vae": load_vae,
    "digits-dit": load_dit,
    "digits-sd": load_sd,
    "digits-sd-assembled": load_sd,
    "digits-clip": load_clip,
    "stdlib-lm": load_lm,
    "stdlib-lm-skip": load_lm,
    "digits-llava": load_llava,
    "digits-video": load_video,
    "digits-florence": load_florence,
    "scenes-vae": load_vae,
    "scenes-classifier": load_scenes_classifier,
    "scenes-flux": load_scenes_flux,
    # "scenes-flux-controlnet", "scenes-flux-relactrl": registered by mmskip.diffusion (mmskip.zoo.WINGS)
}
