"""What the MuE tests share: exit configs and forward helpers (each test module makes its own tiny Florence-2)."""

from __future__ import annotations

import torch
from mmskip.vision.mue import MuEConfig

STEPS = 5
NEVER = [
    MuEConfig(image_threshold=1.0, text_threshold=1.0, decoder_threshold=1.0, decay=1.0, floor=0.5),
    MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=None),
    MuEConfig(image_threshold=1.0, text_threshold=1.0, encoder_granularity="modality", decoder_threshold=None),
]
# thresholds inside the tiny model's cosine range (~0.85-0.97): some tokens exit, some do not
EXITS = MuEConfig(image_threshold=0.965, text_threshold=0.95, decoder_threshold=0.94, decay=0.99, floor=0.85)


def _logits(model, batch, dec=None, **kw):
    dec = torch.full((batch["attention_mask"].shape[0], 3), 2) if dec is None else dec
    with torch.no_grad():
        return model(**batch, decoder_input_ids=dec, **kw).logits


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


def _hooked(model) -> bool:
    return any("_diffusers_hook" in m.__dict__ for m in model.modules())


def _rows_run(model, part: str) -> dict[int, int]:
    """Forward hooks counting the rows each encoder / decoder layer's fc1 sees (what really runs)."""
    stack = getattr(model.model.language_model, part)
    seen: dict[int, int] = {}
    hooks = [layer.fc1.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, seen.get(i, 0) + a[0].shape[:-1].numel()))
        for i, layer in enumerate(stack.layers)]
    return seen, hooks
