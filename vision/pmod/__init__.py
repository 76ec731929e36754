"""p-MoD and VideoLLM-MoD: Mixture-of-Depths over vision tokens in a vision-language model's decoder layers.

In each MoD layer ``l`` (keep ratio ``R_l < 1`` from the schedule, by default p-MoD's
progressive ratio decay) every row ranks its vision tokens by a signal and only the top
``k = trunc(n_vision * R_l)`` of them run the layer, together with every text token, as one
*packed* sequence: hidden states, rotary ``cos``/``sin``, ``position_ids`` and the attention
mask's rows and columns are gathered at the kept positions, so each token keeps its original
position. The other vision tokens pass the layer unchanged (``w * h`` with routers). The
layer's KV cache therefore holds only the tokens it ran (p-MoD's KV saving); decode tokens
(text) run the plain layer against that cache, with the attention mask sliced to the layer's
kept columns when there is one (left padding).

Vision-token positions are read from ``input_ids`` (or the placeholder embeddings) by a hook
on the module that receives them, at prefill: decoder layers never see ids.

``generate(use_cache=False)`` runs the whole sequence again at every step; those recomputes
replay the routing of the generation's first forward (:mod:`mmskip.vision.generation_replay`), so they
give the cached run's tokens (the attention signal would otherwise rank from another last token).

VideoLLM-MoD (:class:`VideoMoDConfig`) is the same mechanism routed frame by frame;
:class:`VideoStream` feeds a video clip by clip into one cache.

Files: ``config.py`` (:class:`MoDConfig`, :class:`VideoMoDConfig`, :func:`mod_layers`),
``state.py`` (:class:`MoDState`, :class:`LayerRecord`), ``hooks.py`` (the hooks and
:func:`attach_mod`), ``packing.py`` (kept-token selection and gathering), ``routers.py``
(:class:`MoDRouters`), ``stream.py`` (:class:`VideoStream`); router training:
``train.py`` (``python -m mmskip.vision.pmod.train``), ``eval.py`` (its held-out evaluation),
``lora.py`` (its LoRA adapters).
"""

from __future__ import annotations

from .config import SIGNALS, MoDConfig, VideoMoDConfig, mod_layers
from .hooks import attach_mod
from .routers import MoDRouters
from .state import LayerRecord, MoDState
from .stream import VideoStream

__all__ = [
    "MoDConfig",
    "VideoMoDConfig",
    "MoDState",
    "LayerRecord",
    "mod_layers",
    "SIGNALS",
    "MoDRouters",
    "VideoStream",
    "attach_mod",
]
