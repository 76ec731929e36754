"""``digits-clip``: a tiny open_clip model whose architecture is registered with open_clip.

``register()`` adds the ``digits-clip`` model config (``models/digits-clip/digits-clip.json``) to
open_clip, so ``open_clip.create_model("digits-clip", pretrained=<folder>/open_clip_model.safetensors)``
works for an ordinary open_clip checkpoint. The shipped folder (``open_clip_config.json`` + weights)
stores only the token-embedding rows training used (see :func:`_load_rows`); :func:`create` loads both.
"""

from __future__ import annotations

import json
import logging
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
    ckpt = Path(folder) / "open_clip_model.safetensors" if folder is not None else None
    state = _load_rows(ckpt) if ckpt is not None else None
    if state is not None:
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; the weights follow
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            "digits-clip", pretrained=str(ckpt) if ckpt is not None and state is None else None,
            image_mean=tuple(PREPROCESS["mean"]), image_std=tuple(PREPROCESS["std"]), **kwargs)
    finally:
        logging.disable(logging.NOTSET)
    if state is not None:
        dtype = next(model.parameters()).dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.eval(), preprocess, open_clip.get_tokenizer("digits-clip")


ROWS_KEY = "token_embedding.rows"


def _load_rows(path: Path) -> dict[str, Any] | None:
    """The state dict of a checkpoint that stores only the token-embedding rows training used.

    ``digits-clip`` was trained on a few dozen caption tokens of open_clip's 49,408; the other
    rows never received a gradient. The shipped file keeps the trained rows (``token_embedding.rows``
    = their token ids, ``token_embedding.weight`` = those rows) and the rest are zeros here, so
    every caption the zoo uses encodes exactly as before, in 1 % of the size. ``None`` for an
    ordinary open_clip checkpoint (loaded by open_clip itself).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        if ROWS_KEY not in f.keys():
            return None
    state = load_file(str(path))
    rows, values = state.pop(ROWS_KEY), state["token_embedding.weight"]
    vocab = model_config()["text_cfg"]["vocab_size"]
    full = torch.zeros(vocab, values.shape[1], dtype=values.dtype)
    full[rows] = values
    state["token_embedding.weight"] = full
    return state
