"""Reference models trained by mmskip's own recipes (see each folder's README.md model card).

``path(name)`` returns a model's ``from_pretrained`` folder; ``load(name)`` returns the ready
model or pipeline. Missing models are reproduced with ``python -m mmskip.zoo.train NAME``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MODELS_DIR", "NAMES", "path", "load", "available"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
NAMES = ("digits-classifier", "digits-vae", "digits-dit", "digits-sd", "digits-clip", "stdlib-lm")


def path(name: str) -> Path:
    """The folder of zoo model ``name``; raises ``FileNotFoundError`` saying how to train it."""
    if name not in NAMES:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has {list(NAMES)}")
    folder = MODELS_DIR / name
    if not (folder / "README.md").exists():
        raise FileNotFoundError(
            f"zoo model {name!r} is not in {folder}. Train it with `python -m mmskip.zoo.train {name}` "
            f"(CPU, minutes; see mmskip/zoo/train.py).")
    return folder


def available() -> list[str]:
    """Names of the zoo models present in this installation."""
    return [n for n in NAMES if (MODELS_DIR / n / "README.md").exists()]


def load(name: str, **kwargs: Any) -> Any:
    """Load zoo model ``name`` ready for inference (eval mode, float32 unless ``dtype`` given).

    Returns: ``digits-classifier`` -> :class:`~mmskip.zoo.classifier.DigitsClassifier`;
    ``digits-vae`` -> ``AutoencoderKL``; ``digits-dit`` -> ``DiTPipeline``; ``digits-sd`` ->
    ``StableDiffusionPipeline``; ``digits-clip`` -> ``(model, preprocess, tokenizer)`` from
    open_clip; ``stdlib-lm`` -> ``(LlamaForCausalLM, tokenizer)``.
    """
    from . import loaders

    return loaders.LOADERS[name](path(name), **kwargs)
