"""FFN-SkipLLM: input-adaptive FFN skipping while decoding (https://arxiv.org/abs/2404.03865).

``config`` (:class:`FFNSkipConfig`), ``state`` (:class:`FFNSkipState` and its per-row
counters), ``hooks`` (the residual capture, the FFN skip hook and the attach; imported when a
config is applied).
"""

from __future__ import annotations

from .config import FFNSkipConfig
from .state import FFNSkipState

__all__ = ["FFNSkipConfig", "FFNSkipState"]
