"""mmskip.vision: multimodal adapters and vision-token skipping.

Importing it registers the ``"vlm"`` adapters (transformers' ``LlavaForConditionalGeneration``
and ``LlavaOnevisionForConditionalGeneration``) and the p-MoD technique::

    from mmskip.vision import MoDConfig
    handle = mmskip.apply(llava, MoDConfig())            # PRD schedule, FastV-style attention signal
    handle = mmskip.apply(llava, MoDConfig(signal="router", routers="my_routers/"))

See ``vision/README.md``. VideoLLM-MoD and MuE early exits are not built yet.
"""

from __future__ import annotations

from .adapters import UnsupportedTextModelError, VLMAdapter
from .mod_routers import MoDRouters
from .pmod import LayerRecord, MoDConfig, MoDState, mod_layers

__all__ = [
    "VLMAdapter",
    "UnsupportedTextModelError",
    "MoDConfig",
    "MoDState",
    "LayerRecord",
    "MoDRouters",
    "mod_layers",
]
