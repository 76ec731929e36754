"""Schedule-aware fine-tuning: train with a layer-skip schedule active (Unified Layer Skipping)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from mmskip.inject import SkipHandle, apply
from mmskip.layer_skip import LayerSkipConfig

from .base import Objective

__all__ = ["ScheduleAware"]

logger = logging.getLogger(__name__)


class ScheduleAware(Objective):
    """Fine-tune with a :class:`mmskip.LayerSkipConfig` applied, so the weights adapt to the
    layers that inference will skip (Liu et al., 2024, "Accelerating Inference in Large Language
    Models with a Unified Layer Skipping Strategy", https://arxiv.org/abs/2404.06954, which
    fine-tunes with its skip pattern in place). Adds no loss of its own: pair it with
    :class:`LanguageModeling` and/or :class:`Distillation`.

    Training windows are prompts, so the config is applied with ``phase="all"`` (a
    ``phase="decode"`` config would skip nothing in a training forward).

    Args:
        config: the layer-skip config inference will use.
    """

    name = "schedule-aware"

    def __init__(self, config: LayerSkipConfig) -> None:
        if not isinstance(config, LayerSkipConfig):
            raise TypeError(f"ScheduleAware takes a mmskip.LayerSkipConfig, got {type(config).__name__}")
        if config.phase != "all":
            logger.info("ScheduleAware: applying %s with phase='all' for training", config.phase)
        self.config = dataclasses.replace(config, phase="all")
        self._model: nn.Module | None = None
        self._handle: SkipHandle | None = None

    def check(self, model: nn.Module) -> None:
        # attaching validates the schedule against the model (depth, static, not everything skipped)
        apply(model, self.config).remove()

    def attach(self, model: nn.Module) -> None:
        self._model, self._handle = model, apply(model, self.config)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self._handle is None:
            yield
            return
        self._handle.remove()
        try:
            yield
        finally:
            self._handle = apply(self._model, self.config)

    def __repr__(self) -> str:
        return f"ScheduleAware({self.config.schedule!r})"
