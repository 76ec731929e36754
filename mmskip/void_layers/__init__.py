"""Void layers: skip the layers LAC finds unactivated on the prompt (https://arxiv.org/abs/2505.14467).

``config`` (:class:`VoidLayerConfig`), ``state`` (:class:`VoidLayerState`, the typed
:class:`VoidRecord` of each traced forward), ``lac`` (LAC's void rule and the skip set a prompt
allows: :func:`lac_voids`, :func:`void_skip_set`), ``hooks`` (norm tracing and the attach;
imported when a config is applied).
"""

from __future__ import annotations

from .config import VoidLayerConfig
from .lac import lac_voids, void_skip_set
from .state import VoidLayerState, VoidRecord

__all__ = ["VoidLayerConfig", "VoidLayerState", "VoidRecord", "lac_voids", "void_skip_set"]
