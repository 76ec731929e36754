"""The zoo's digit classifier: a small CNN whose penultimate features serve as FID features."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["DigitsClassifier", "conv_body"]


def conv_body(in_channels: int, channels: tuple[int, ...]) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + GELU per stage, then 2x2 max-pooling (the zoo classifiers' trunk)."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(),
                   nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers)


class DigitsClassifier(ModelMixin, ConfigMixin):
    """CNN for 1×32×32 digits in [-1, 1] (3-channel input is averaged to grey).

    ``features(x)`` returns the ``feature_dim``-d penultimate activations; ``forward`` the logits.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, num_classes: int = 10,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.body = conv_body(1, channels)
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels[-1] * 4, feature_dim),
                                  nn.GELU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def _prep(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images ``x`` (N, 1|3, H, W) in [-1, 1]."""
        return self.proj(self.body(self._prep(x.to(self.dtype))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels of images ``x`` in [-1, 1]."""
        return self(x).argmax(-1)
