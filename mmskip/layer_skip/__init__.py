"""Whole-layer skipping in decoder LMs: Unified Layer Skipping (https://arxiv.org/abs/2404.06954).

``config`` (:class:`LayerSkipConfig`), ``state`` (:class:`LayerSkipState` and the shared
:class:`SkipPlan`), ``hooks`` (the layer hook, the KV-cache fill rule and the attach; imported
when a config is applied, so reading a config costs no ``diffusers``).
"""

from __future__ import annotations

from .config import LayerSkipConfig
from .state import LayerSkipState, SkipPlan

__all__ = ["LayerSkipConfig", "LayerSkipState", "SkipPlan"]
