"""Conditional accuracy: does the zoo classifier see the digit that was requested?"""

from __future__ import annotations

import torch

__all__ = ["conditional_accuracy", "classify"]


@torch.no_grad()
def classify(images: torch.Tensor, classifier: torch.nn.Module | None = None) -> torch.Tensor:
    """Predicted digit of each image (N, C, H, W) in [0, 1]."""
    if classifier is None:
        from mmskip.zoo import load

        classifier = load("digits-classifier")
    classifier = classifier.eval().float()
    return torch.cat([classifier(images[i:i + 512].float() * 2 - 1).argmax(-1) for i in range(0, len(images), 512)])


def conditional_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int],
                         classifier: torch.nn.Module | None = None) -> float:
    """Fraction of images (in [0, 1]) classified as their requested label."""
    labels = torch.as_tensor(labels)
    return float((classify(images, classifier) == labels).float().mean())
