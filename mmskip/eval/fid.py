"""FID with torchmetrics, on a zoo classifier's penultimate features (or Inception when available)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassifierFeatures", "make_fid", "fid", "scenes_fid"]


class ClassifierFeatures(nn.Module):
    """FID feature extractor: a zoo classifier's 128-d penultimate features (``digits-classifier``
    unless another, e.g. ``scenes-classifier``, is given).

    Accepts what torchmetrics feeds a feature module: uint8 images in [0, 255] or floats in
    [0, 1], 1 or 3 channels, any size (resized to 32×32).
    """

    def __init__(self, classifier: nn.Module | None = None) -> None:
        super().__init__()
        if classifier is None:
            from mmskip.zoo import load

            classifier = load("digits-classifier")
        self.classifier = classifier.eval().float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.classifier.features(x * 2 - 1).double()


def make_fid(feature: nn.Module | str = "digits-classifier"):
    """A ``FrechetInceptionDistance`` metric taking float images in [0, 1].

    ``feature`` is ``"digits-classifier"`` (default), an ``nn.Module`` mapping images to features,
    or an Inception feature size (``"2048"``) when torchmetrics' Inception weights are available
    locally.
    """
    from mmskip.optional_deps import require

    FrechetInceptionDistance = require("torchmetrics.image.fid", "FID").FrechetInceptionDistance
    if isinstance(feature, str) and feature.isdigit():
        return FrechetInceptionDistance(feature=int(feature), normalize=True)
    module = ClassifierFeatures() if feature == "digits-classifier" else feature
    return FrechetInceptionDistance(feature=module, normalize=True)


def fid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module | str = "digits-classifier",
        batch_size: int = 256) -> float:
    """FID between two image sets (N, C, H, W) with values in [0, 1]."""
    metric = make_fid(feature)
    for i in range(0, len(real), batch_size):
        metric.update(real[i:i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        metric.update(fake[i:i + batch_size], real=False)
    return float(metric.compute())


def scenes_fid(real: torch.Tensor, fake: torch.Tensor, classifier: nn.Module) -> float:
    """FID of scenes (images in [0, 1]) on ``scenes-classifier``'s features."""
    return fid(real, fake, feature=ClassifierFeatures(classifier))
