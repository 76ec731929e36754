"""mmskip.vision: multimodal adapters and vision-token skipping.

Importing it registers the ``"vlm"`` adapters (transformers' LLaVA, LLaVA-OneVision, Qwen2-VL
and Qwen2.5-VL) and the techniques p-MoD (images) and VideoLLM-MoD (video, frame by frame)::

    from mmskip.vision import MoDConfig, VideoMoDConfig, VideoStream
    handle = mmskip.apply(llava, MoDConfig())            # PRD schedule, FastV-style attention signal
    handle = mmskip.apply(llava, MoDConfig(signal="router", routers="my_routers/"))
    handle = mmskip.apply(onevision, VideoMoDConfig())   # 20 % of each frame's tokens per layer
    stream = VideoStream(onevision, prefix=ids)          # clips into one cache, questions any time

Routers are trained by ``python -m mmskip.vision.train_routers`` (``mmskip.vision.train_routers.train_mod_routers``).

MuE early exits for Florence-2: ``MuEConfig`` (see ``vision/MUE.md``). See ``vision/README.md``.
"""

from __future__ import annotations

from .adapters import UnsupportedTextModelError, VLMAdapter
from .mod_routers import MoDRouters
from .mue import EncoderRecord, MuEConfig, MuEState
from .mue_adapters import EncDecVLMAdapter, UnsupportedLanguageModelError
from .pmod import LayerRecord, MoDConfig, MoDState, VideoMoDConfig, mod_layers
from .stream import VideoStream

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
]
