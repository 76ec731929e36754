"""Batches that a caller hands over as an iterable, served to :class:`~mmskip.train.TrainTask.batch` by step.

The p-MoD router and MuE layer-wise trainers take their data as any iterable of dicts of model
keyword arguments; :func:`mmskip.train.fit` asks for the batch of each step (consecutive steps from
the one it resumed at). :class:`StepBatches` bridges the two so a resumed run sees the batches an
uninterrupted one would, and :func:`loss_curve_windows` / :func:`loss_curve_trailing` are the two
loss-curve summaries those trainers save.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .data import skip_batches

__all__ = ["StepBatches", "to_device", "loss_curve_windows", "loss_curve_trailing"]

logger = logging.getLogger(__name__)


class StepBatches:
    """``batches`` served by step: with ``cycle`` a :class:`~collections.abc.Sequence` is indexed
    ``step % len``; anything else is read once, the items before the first step asked for skipped,
    and steps must then come consecutively (as :func:`mmskip.train.fit` asks for them)."""

    def __init__(self, batches: Iterable[Mapping[str, Any]], steps: int, cycle: bool = False) -> None:
        if isinstance(batches, Mapping):
            raise TypeError("batches must yield dicts of model kwargs; for one batch pass [batch]")
        if cycle and isinstance(batches, Sequence) and not batches:
            raise ValueError("batches is empty")
        self.batches, self.steps, self.cycle = batches, steps, cycle
        self._it: Iterator[Mapping[str, Any]] | None = None
        self._next = 0

    def at(self, step: int) -> Mapping[str, Any]:
        """The batch of ``step``; ``ValueError`` when the batches run out before ``steps``."""
        if self.cycle and isinstance(self.batches, Sequence):
            return self.batches[step % len(self.batches)]
        if self._it is None:
            self._it, self._next = skip_batches(self.batches, step), step
        if step != self._next:
            raise RuntimeError(f"batches are read once, in order: asked for step {step}, next is {self._next}")
        batch = next(self._it, None)
        if batch is None:
            raise ValueError(f"batches ran out after {step} steps; give at least steps={self.steps} batches")
        self._next += 1
        return batch


def to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``batch``'s tensors on ``device``; floating-point ones also cast to ``dtype`` when given."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def loss_curve_windows(losses: list[float], points: int = 20) -> list[list[float]]:
    """``[[last step of the window, mean loss over the window], ...]``: about ``points`` consecutive
    windows from step 1 on (the p-MoD router trainer's curve)."""
    if not losses:
        return []
    size = max(1, math.ceil(len(losses) / points))
    return [[min(s + size, len(losses)), round(sum(losses[s:s + size]) / len(losses[s:s + size]), 4)]
            for s in range(0, len(losses), size)]


def loss_curve_trailing(losses: list[float], points: int = 20) -> list[list[float]]:
    """``[[step, mean loss over the steps since the previous point], ...]`` every ``len // points``
    steps (the MuE layer-wise trainer's curve; a tail shorter than one window is left out)."""
    if not losses:
        return []
    every = max(1, len(losses) // points)
    return [[i + 1, round(sum(losses[max(0, i - every + 1): i + 1]) / len(losses[max(0, i - every + 1): i + 1]), 4)]
            for i in range(every - 1, len(losses), every)]
