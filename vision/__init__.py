"""mmskip.vision: multimodal adapters and vision-token skipping.

Importing it registers the ``"vlm"`` adapters (transformers' LLaVA, LLaVA-OneVision, Qwen2-VL
and Qwen2.5-VL) and the techniques p-MoD (images) and VideoLLM-MoD (video, frame by frame)::

    from mmskip.vision import MoDConfig, VideoMoDConfig, VideoStream
    handle = mmskip.apply(llava, MoDConfig())            # PRD schedule, FastV-style attention signal
    handle = mmskip.apply(llava, MoDConfig(signal="router", routers="my_routers/"))
    handle = mmskip.apply(onevision, VideoMoDConfig())   # 20 % of each frame's tokens per layer
    stream = VideoStream(onevision, prefix=ids)          # clips into one cache, questions any time

Routers are trained by ``python -m mmskip.vision.pmod.train`` (``mmskip.vision.pmod.train.train_mod_routers``).

``mmskip.tune(model, questions, tokenizer=tok)`` tunes these on a VLM or Florence-2 (``tune_target.py``).

MuE early exits for Florence-2: ``MuEConfig`` (see ``vision/mue/README.md``). See ``vision/README.md``.

Layout: one folder per technique (``pmod/``: p-MoD, VideoLLM-MoD and streaming; ``mue/``: MuE),
each with ``config.py``, ``state.py`` and ``hooks.py`` (the hooks and the attach function); model
facts in ``adapters/``; ``generation_replay.py`` is the per-``generate`` record both techniques use
to replay their decisions under ``generate(use_cache=False)``.
"""

from __future__ import annotations

from .adapters import EncDecVLMAdapter, UnsupportedLanguageModelError, UnsupportedTextModelError, VLMAdapter
from .mue import EncoderRecord, MuEConfig, MuEState
from .pmod import LayerRecord, MoDConfig, MoDRouters, MoDState, VideoMoDConfig, VideoStream, mod_layers
from .tune_target import Florence2Target, VLMTarget
from .tune_target import register as _register_tune_targets

_register_tune_targets()  # mmskip.tune takes VLMs and Florence-2 once the wing is imported

__all__ = [
    "VLMAdapter",
    "UnsupportedTextModelError",
    "MoDConfig",
    "VideoMoDConfig",
    "VideoStream",
    "MoDState",
    "LayerRecord",
    "MoDRouters",
    "mod_layers",
    "MuEConfig",
    "MuEState",
    "EncoderRecord",
    "EncDecVLMAdapter",
    "UnsupportedLanguageModelError",
    "VLMTarget",
    "Florence2Target",
]
