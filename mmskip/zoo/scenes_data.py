"""Procedural compositional scenes: coloured shapes with captions, rebuilt from a seed (not shipped).

A scene is one or two groups of identical shapes ("two red circles", "a blue square"); with two
groups the first sits left of / above the second, and the caption says so ("two red circles
left of a blue square"). Images are ``size`` x ``size`` RGB, drawn at 4x and averaged down
(anti-aliased). Every scene's structured :class:`Scene` is kept beside its caption, so a
classifier can score prompt following (colour, shape, count, relation).

    images, captions, scenes = make_split("train", 20000)   # uint8 (N, 32, 32, 3), list[str], list[Scene]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SHAPES", "COLORS", "COUNTS", "RELATIONS", "Group", "Scene", "sample_scene", "render", "caption", "make_split",
           "scenes_tensor", "MAX_LENGTH", "SAMPLING"]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 50, 47),
    "green": (70, 170, 60),
    "blue": (50, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 70, 190),
}
COUNTS = (1, 2, 3)
RELATIONS = ("left of", "above")
_NUMBER = {1: "a", 2: "two", 3: "three"}
_SEEDS = {"train": 0, "val": 1, "test": 2}
_BACKGROUND = (24, 24, 28)
MAX_LENGTH = 16  # scenes-flux's prompt length in tokens (its CLIP tokenizer and text encoders)
# scenes-flux's call settings as trained and benchmarked (with negative_prompt="" for the true CFG)
SAMPLING = {"height": 32, "width": 32, "max_sequence_length": MAX_LENGTH, "true_cfg_scale": 4.0}


@dataclass(frozen=True)
class Group:
    count: int
    color: str
    shape: str

    def words(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{_NUMBER[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    first: Group
    second: Group | None = None
    relation: str | None = None  # how ``first`` sits relative to ``second``


def caption(scene: Scene) -> str:
    if scene.second is None:
        return scene.first.words()
    return f"{scene.first.words()} {scene.relation} {scene.second.words()}"


def sample_scene(rng: np.random.Generator) -> Scene:
    """One scene: 40 % a single group, 60 % two groups of different colour or shape."""

    def group() -> Group:
        return Group(int(rng.choice(COUNTS)), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))

    first = group()
    if rng.random() < 0.4:
        return Scene(first)
    second = group()
    while (second.color, second.shape) == (first.color, first.shape):
        second = group()
    return Scene(first, second, str(rng.choice(RELATIONS)))


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    n = canvas.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        s = r * 0.85
        mask = (np.abs(xx - cx) <= s) & (np.abs(yy - cy) <= s)
    else:  # upward triangle inside the circle of radius r
        top, base = cy - r, cy + r * 0.7
        half = (yy - top) / (base - top) * r * 0.95
        mask = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)
    canvas[mask] = color


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """The scene as a ``(size, size, 3)`` uint8 image; positions, sizes and a little jitter are random."""
    k = 4
    n = size * k
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = _BACKGROUND
    groups = [scene.first] if scene.second is None else [scene.first, scene.second]
    for gi, grp in enumerate(groups):
        # the region a group lives in: the whole canvas, or one half (first = left / top half)
        if len(groups) == 1:
            x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
        elif scene.relation == "left of":
            x0, x1, y0, y1 = (0.0, 0.5, 0.0, 1.0) if gi == 0 else (0.5, 1.0, 0.0, 1.0)
        else:
            x0, x1, y0, y1 = (0.0, 1.0, 0.0, 0.5) if gi == 0 else (0.0, 1.0, 0.5, 1.0)
        w, h = (x1 - x0) * n, (y1 - y0) * n
        r = float(rng.uniform(0.09, 0.13)) * n * (1.0 if grp.count == 1 else 0.8)
        color = np.array(COLORS[grp.color], dtype=np.float32) * float(rng.uniform(0.85, 1.05))
        centres: list[tuple[float, float]] = []
        for _ in range(grp.count):
            for _try in range(50):  # rejection-sample non-overlapping centres
                cx = x0 * n + float(rng.uniform(r * 1.1, w - r * 1.1))
                cy = y0 * n + float(rng.uniform(r * 1.1, h - r * 1.1))
                if all((cx - a) ** 2 + (cy - b) ** 2 > (2.1 * r) ** 2 for a, b in centres):
                    break
            centres.append((cx, cy))
            _draw(canvas, grp.shape, cx, cy, r, tuple(np.clip(color, 0, 255)))
    img = canvas.reshape(size, k, size, k, 3).mean(axis=(1, 3))
    return np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)


def make_split(split: str, n: int, size: int = 32) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` scenes of ``split`` ("train", "val", "test": disjoint seeds), rebuilt identically every time."""
    if split not in _SEEDS:
        raise ValueError(f"split must be one of {sorted(_SEEDS)}, got {split!r}")
    rng = np.random.default_rng(1000 + _SEEDS[split])
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s) for s in scenes], scenes


def scenes_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) scenes -> float (N, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
