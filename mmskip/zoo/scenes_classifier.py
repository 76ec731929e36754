"""The zoo's scene classifier: reads a scene's groups back (colour, shape, count, relation).

``forward`` returns one logit tensor per attribute (:data:`HEADS`); ``features`` the 128-d
penultimate activations, the FID features for scene images. :func:`scene_targets` turns
:class:`~mmskip.zoo.scenes_data.Scene`\\ s into class indices (``-100`` where a scene has no second
group), :func:`prompt_accuracy` scores images against the scenes they were prompted with.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .classifier import conv_body
from .scenes_data import COLORS, COUNTS, RELATIONS, SHAPES, Scene

__all__ = ["ScenesClassifier", "HEADS", "scene_targets", "prompt_accuracy"]

# attribute -> number of classes; relation class 0 = a single group
HEADS = {"color1": len(COLORS), "shape1": len(SHAPES), "count1": len(COUNTS), "relation": 1 + len(RELATIONS),
         "color2": len(COLORS), "shape2": len(SHAPES), "count2": len(COUNTS)}
_COLORS, _IGNORE = list(COLORS), -100


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class index per attribute and scene (``-100``: the scene has no second group)."""
    out: dict[str, list[int]] = {k: [] for k in HEADS}
    for s in scenes:
        out["color1"].append(_COLORS.index(s.first.color))
        out["shape1"].append(SHAPES.index(s.first.shape))
        out["count1"].append(COUNTS.index(s.first.count))
        out["relation"].append(0 if s.second is None else 1 + RELATIONS.index(s.relation))
        for k, v in (("color2", lambda g: _COLORS.index(g.color)), ("shape2", lambda g: SHAPES.index(g.shape)),
                     ("count2", lambda g: COUNTS.index(g.count))):
            out[k].append(_IGNORE if s.second is None else v(s.second))
    return {k: torch.tensor(v) for k, v in out.items()}


class ScenesClassifier(ModelMixin, ConfigMixin):
    """CNN for 3×32×32 scenes in [-1, 1] with one linear head per attribute."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (24, 48, 64), feature_dim: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = conv_body(3, channels)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 16, feature_dim), nn.GELU())
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.proj(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


@torch.no_grad()
def prompt_accuracy(classifier: ScenesClassifier, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy and ``exact`` (every attribute right) of ``images`` in [-1, 1] vs ``scenes``."""
    classifier.eval()
    targets = scene_targets(scenes)
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
    for i in range(0, len(images), 256):
        for k, v in classifier(images[i:i + 256].float()).items():
            logits[k].append(v)
    right = []
    out: dict[str, float] = {}
    for k in HEADS:
        pred, t = torch.cat(logits[k]).argmax(-1), targets[k]
        ok = (pred == t) | (t == _IGNORE)
        out[k] = float(ok[t != _IGNORE].float().mean()) if (t != _IGNORE).any() else float("nan")
        right.append(ok)
    out["exact"] = float(torch.stack(right).all(0).float().mean())
    return out
