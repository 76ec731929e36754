"""Layout control for the procedural scenes: silhouette masks, and how well an image follows one.

The control image of a scene is its foreground silhouette (shapes white, background black),
found the same way in rendered and in generated images: a pixel is foreground when it is far
from the scenes' dark background colour. Control fidelity is the IoU of the generated image's
foreground with the control's, per image, averaged.

    images, captions, scenes = make_control_split("train", 12000, workers=8)
    controls = control_images(images)               # float (N, 3, 32, 32) in [0, 1]
    mask_iou(generated, controls)                   # generated: float (N, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from .scenes_data import _BACKGROUND, Scene, caption, render, sample_scene

__all__ = ["foreground", "control_images", "mask_iou", "make_control_split"]

_THRESHOLD = 60.0  # max channel distance (0..255) from the background colour that counts as foreground
_SEEDS = {"train": 5000, "val": 6000, "test": 7000}
_SHARD = 500


def foreground(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Boolean (N, H, W) foreground of uint8 (N, H, W, 3) images or float (N, 3, H, W) ones in [0, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
    else:
        x = images.detach().float().cpu() * 255.0
    bg = torch.tensor(_BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - bg).abs().amax(dim=1) > _THRESHOLD


def control_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The control image of each scene: its silhouette, (N, 3, H, W) float in {0, 1}."""
    return foreground(images).float()[:, None].expand(-1, 3, -1, -1).contiguous()


def mask_iou(generated: torch.Tensor, controls: torch.Tensor) -> float:
    """Mean IoU between the foreground of ``generated`` and the silhouettes in ``controls``."""
    a, b = foreground(generated), controls[:, 0].cpu() > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp(min=1)
    return float((inter / union).mean())


def _shard(args: tuple[int, int, int]) -> tuple[np.ndarray, list[Scene]]:
    seed, n, size = args
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return np.stack([render(s, rng, size) for s in scenes]), scenes


def make_control_split(split: str, n: int, size: int = 32, workers: int = 1) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` scenes for control training/evaluation, rebuilt identically for any ``workers``.

    Drawn in shards of 500 with their own seeds (so processes can render them in parallel),
    disjoint from :func:`~mmskip.zoo.scenes_data.make_split`'s seeds.
    """
    if split not in _SEEDS:
        raise ValueError(f"split must be one of {sorted(_SEEDS)}, got {split!r}")
    jobs = [(_SEEDS[split] + i, min(_SHARD, n - start), size) for i, start in enumerate(range(0, n, _SHARD))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_shard, jobs))
    else:
        parts = [_shard(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size, 3), np.uint8)
    scenes = [s for p in parts for s in p[1]]
    return images, [caption(s) for s in scenes], scenes
