"""The exponential moving average of weights the diffusion recipes keep (and save) beside the trained ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ema_update"]


@torch.no_grad()
def ema_update(emas: Sequence[nn.Module], models: Sequence[nn.Module], step: int, ema: float) -> None:
    """Move each EMA copy towards its model; the decay warms up as ``min(ema, (1 + step) / (10 + step))``."""
    decay = min(ema, (1 + step) / (10 + step))
    for e, m in zip(emas, models, strict=True):
        for pe, pm in zip(e.parameters(), m.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)
