"""The digits data set shared by every image model of the zoo.

scikit-learn's ``load_digits`` (1,797 8×8 grey images, values 0–16) upscaled to 32×32 and scaled
to [-1, 1]. One fixed-seed split (``SPLIT_SEED``) is shared by all models: 1,497 train, 300
held-out test images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGIT_NAMES", "SIZE", "TEMPLATES", "augment", "caption", "encode_augmented", "load_split", "to_unit"]

SIZE = 32
SPLIT_SEED = 0
N_TEST = 300
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# caption templates of the text-conditioned models (digits-clip, digits-sd): the digit's name or numeral
TEMPLATES = ["a handwritten digit {name}", "the digit {name}", "a picture of the number {d}", "{d}",
             "a handwritten {name}", "number {name}"]


def caption(label: int) -> str:
    """The caption a text-conditioned model is trained on for ``label``."""
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def load_split(split: str = "train", size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images ``(N, 1, size, size)`` float32 in [-1, 1], labels int64.

    ``split`` is ``"train"``, ``"test"`` (held out from every zoo model) or ``"all"``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    idx = {"test": perm[:N_TEST], "train": perm[N_TEST:], "all": np.arange(len(y))}[split]
    idx = torch.as_tensor(np.sort(idx))
    return x[idx].contiguous(), y[idx].contiguous()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Light augmentation for images in [-1, 1]: small random rotation, scale and shift."""
    n = x.shape[0]
    g = generator
    ang = (torch.rand(n, generator=g) * 2 - 1) * 0.17 * strength  # ~±10°
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.08 * strength
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.08 * strength
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return out.clamp(-1, 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_augmented(vae: torch.nn.Module, x: torch.Tensor, copies: int, g: torch.Generator) -> torch.Tensor:
    """Scaled latents of ``copies`` augmented versions of ``x`` (the first copy un-augmented)."""
    out = []
    for c in range(copies):
        xa = x if c == 0 else augment(x, g)
        for i in range(0, len(xa), 256):
            out.append(vae.encode(xa[i:i + 256]).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)
