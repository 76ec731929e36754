"""``RouterConfig``: where FiRST's trained routers are, and the inference-time keep threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..inject import SkipConfig, SkipHandle
from .routers import Routers

__all__ = ["RouterConfig"]


@dataclass(frozen=True)
class RouterConfig(SkipConfig):
    """FiRST layer routing with trained routers.

    Paper: Jain et al., 2024, "FiRST: Finetuning Router-Selective Transformers for
    Input-Adaptive Latency Reduction", https://arxiv.org/abs/2410.12513.

    Args:
        path: a folder written by :meth:`Routers.save` (e.g. by ``python -m mmskip.train.first
            --out FOLDER``); required.
        threshold: a layer is skipped when its router's mean keep probability over the prompt
            is below it (higher: more skipping; the inference-time sparsity/quality knob);
            default 0.5.
        max_skip: cap on the fraction of layers skipped (the lowest layers that ask to skip get
            the budget); default 1.0.
    """

    technique: ClassVar[str] = "first_routers"
    path: str = ""
    threshold: float = 0.5
    max_skip: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RouterConfig.threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 <= self.max_skip <= 1.0:
            raise ValueError(f"RouterConfig.max_skip must lie in [0, 1], got {self.max_skip}")

    def load_routers(self) -> Routers:
        if not self.path:
            raise ValueError("RouterConfig needs path= to routers saved by Routers.save / mmskip.train.first")
        return Routers.load(self.path)

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_first_routers

        attach_first_routers(self, model, handle)
