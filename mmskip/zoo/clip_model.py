"""``digits-clip``: a tiny open_clip model whose architecture is registered with open_clip.

``register()`` adds the ``digits-clip`` model config (``models/digits-clip/digits-clip.json``) to
open_clip, so ``open_clip.create_model("digits-clip", pretrained=<folder>/open_clip_model.safetensors)``
works; the folder itself is a standard open_clip local-dir (``open_clip_config.json`` + weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_FILE", "register", "model_config", "create"]

CONFIG_FILE = Path(__file__).resolve().parent / "models" / "digits-clip" / "digits-clip.json"
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}


def model_config() -> dict[str, Any]:
    return json.loads(CONFIG_FILE.read_text())


def register() -> None:
    """Register the ``digits-clip`` architecture with open_clip (idempotent)."""
    import open_clip

    if "digits-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_FILE)


def create(folder: Path | None = None, **kwargs: Any) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)``; random weights when ``folder`` is ``None``."""
    import open_clip

    register()
    ckpt = str(Path(folder) / "open_clip_model.safetensors") if folder is not None else None
    model, _, preprocess = open_clip.create_model_and_transforms(
        "digits-clip", pretrained=ckpt, image_mean=tuple(PREPROCESS["mean"]), image_std=tuple(PREPROCESS["std"]),
        **kwargs)
    return model.eval(), preprocess, open_clip.get_tokenizer("digits-clip")
