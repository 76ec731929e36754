"""Model facts for the vision wing: where a vision-language model keeps what its techniques need.

Importing this package registers the registry kinds the vision techniques look up:

- ``"vlm"`` (:mod:`.vlm`): decoder-only VLMs (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL):
  the module that receives ``input_ids``, the language model's decoder, the LM head, the vision
  and video token ids and the video frame layout (p-MoD, VideoLLM-MoD).
- ``"encdec-vlm"`` (:mod:`.encdec_vlm`): encoder-decoder VLMs (Florence-2): the placeholder-mask
  module, the unified encoder's and the decoder's layers, their K/V projections, FLOPs per
  token (MuE).

Adding a family is one registered adapter function in the matching module.
"""

from __future__ import annotations

from .encdec_vlm import EncDecVLMAdapter, UnsupportedLanguageModelError
from .vlm import UnsupportedTextModelError, VLMAdapter

__all__ = ["VLMAdapter", "UnsupportedTextModelError", "EncDecVLMAdapter", "UnsupportedLanguageModelError"]
