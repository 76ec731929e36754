"""Reference models trained by mmskip's own recipes (see each folder's README.md model card).

``path(name)`` returns a model's ``from_pretrained`` folder; ``load(name)`` returns the ready
model or pipeline. Missing models are reproduced from a clone of the repository with
``mmskip zoo NAME --overwrite-shipped`` (the recipes live in its ``recipes/``, not in the installed
package; without the flag a recipe writes to ``runs/zoo/NAME``).

The zoo names no wing: a model whose classes live in a wing (the ControlNet / RelaCtrl branches of
``scenes-flux``, in ``mmskip.diffusion``) is loaded by the loader that wing registers with
:func:`register_loader` when it is imported. :func:`load` imports the wings declared in the package's
metadata (:func:`mmskip.wings.load_wings`) when a name has no loader yet; :data:`WINGS` names the
wing for the error message when that wing is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MODELS_DIR", "NAMES", "WINGS", "UnknownModelError", "LoaderNotRegisteredError", "path", "load", "available",
           "register_loader"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
NAMES = ("digits-classifier", "digits-vae", "digits-dit", "digits-sd", "digits-clip", "stdlib-lm", "stdlib-lm-skip",
         "digits-llava", "digits-video", "digits-florence", "scenes-vae", "scenes-classifier", "scenes-flux",
         "digits-sd-assembled", "scenes-flux-controlnet", "scenes-flux-relactrl")
# models whose loader a wing registers on import (a name for the message, never imported from here)
WINGS = {"scenes-flux-controlnet": "mmskip.diffusion", "scenes-flux-relactrl": "mmskip.diffusion"}


class UnknownModelError(ValueError):
    """A name that is not one of the zoo's :data:`NAMES`."""

    def __init__(self, name: object) -> None:
        self.name = name
        super().__init__(f"unknown zoo model {name!r}; the zoo has: {', '.join(NAMES)}")


class LoaderNotRegisteredError(LookupError):
    """A zoo model whose loader lives in a wing (:data:`WINGS`) that has not been imported."""

    def __init__(self, name: str) -> None:
        self.name = name
        wing = WINGS.get(name, "the package that defines its classes")
        super().__init__(f"zoo model {name!r} is loaded by {wing}, which registers its loader when it is "
                         f"imported: `import {wing}` first")


def register_loader(name: str, loader: Callable[..., Any]) -> None:
    """Let :func:`load` load zoo model ``name`` with ``loader(folder, **kwargs)`` (a wing calls this
    when it is imported, for the models whose classes it defines)."""
    if name not in NAMES:
        raise UnknownModelError(name)
    from .loaders import LOADERS

    LOADERS[name] = loader


def path(name: str) -> Path:
    """The folder of zoo model ``name``; raises :class:`UnknownModelError` (a ``ValueError``) for a
    name not in :data:`NAMES` and ``FileNotFoundError`` saying how to train a missing one."""
    if name not in NAMES:
        raise UnknownModelError(name)
    folder = MODELS_DIR / name
    if not (folder / "README.md").exists():
        raise FileNotFoundError(
            f"zoo model {name!r} is not in {folder}. Train it there with "
            f"`mmskip zoo {name} --overwrite-shipped` from a clone of the mmskip repository (CPU, minutes; "
            "see recipes/zoo.py).")
    return folder


def available() -> list[str]:
    """Names of the zoo models present in this installation."""
    return [n for n in NAMES if (MODELS_DIR / n / "README.md").exists()]


def load(name: str, **kwargs: Any) -> Any:
    """Load zoo model ``name`` ready for inference (eval mode, float32 unless ``dtype`` given).

    Returns: ``digits-classifier`` -> :class:`~mmskip.zoo.classifier.DigitsClassifier`;
    ``digits-vae`` -> ``AutoencoderKL``; ``digits-dit`` -> ``DiTPipeline``; ``digits-sd`` ->
    ``StableDiffusionPipeline``; ``digits-sd-assembled`` -> ``StableDiffusionPipeline`` with the
    assembled UNet (its ME-CondConv variant, when present: ``mmskip.diffusion.assembly.load_assembled(path /
    "unet_condconv")``); ``scenes-flux-controlnet`` / ``scenes-flux-relactrl`` -> ``FluxControlNetPipeline`` (``scenes-flux`` with the
    full ControlNet / the RelaCtrl branch; control images: :func:`mmskip.zoo.scenes_control.control_images`;
    their loader is registered by the diffusion wing, imported here when needed, else
    :class:`LoaderNotRegisteredError`);
    ``digits-clip`` -> ``(model, preprocess, tokenizer)`` from
    open_clip; ``stdlib-lm`` and ``stdlib-lm-skip`` -> ``(LlamaForCausalLM, tokenizer)``; ``digits-llava`` ->
    ``(LlavaForConditionalGeneration, tokenizer)`` (inputs: :func:`mmskip.zoo.llava_data.encode`, answers:
    :func:`mmskip.zoo.llava_data.answer`); ``digits-video`` -> ``(LlavaOnevisionForConditionalGeneration,
    tokenizer)`` (inputs: :func:`mmskip.zoo.video_data.encode`, answers: :func:`mmskip.zoo.video_data.answer`;
    the prompt layout for streaming: :func:`~mmskip.zoo.video_data.prefix_ids`,
    :func:`~mmskip.zoo.video_data.clip_ids`, :func:`~mmskip.zoo.video_data.question_ids`);
    ``digits-florence`` -> ``(Florence2ForConditionalGeneration, tokenizer)`` (inputs:
    :func:`mmskip.zoo.florence_data.encode`, answers: :func:`mmskip.zoo.florence_data.generate`);
    ``scenes-vae`` -> ``AutoencoderKL`` (RGB scenes, Flux-style shift and scale); ``scenes-classifier`` ->
    :class:`~mmskip.zoo.scenes_classifier.ScenesClassifier`; ``scenes-flux`` -> ``FluxPipeline``
    (prompts: :func:`mmskip.zoo.scenes_data.caption`; ``recipes/scenes_flux.py``'s ``generate_scenes``
    shows the sampling call its card measures).
    """
    folder = path(name)  # UnknownModelError / FileNotFoundError with what to do
    from .loaders import LOADERS

    if name not in LOADERS:
        from mmskip.wings import load_wings

        load_wings()  # the wing that defines its classes registers its loader on import
    if name not in LOADERS:
        raise LoaderNotRegisteredError(name)
    try:
        return LOADERS[name](folder, **kwargs)
    except ModuleNotFoundError as e:  # e.g. digits-clip without open_clip: name the extra to install
        from mmskip.optional_deps import missing_extra

        err = missing_extra(e, f"zoo model {name!r}")
        if err is None:
            raise
        raise err from e
