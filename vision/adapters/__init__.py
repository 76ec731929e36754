"""Model facts for the vision wing: where a vision-language model keeps what its techniques need.

Importing this package registers the registry kinds the vision techniques look up:

- ``"vlm"`` (:mod:`.vlm`): decoder-only VLMs (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL):
  the module that receives ``input_ids``, the language model's decoder, the LM head, the vision
  and video token ids and the video frame layout (p-MoD, VideoLLM-MoD).
- ``"encdec-vlm"`` (:mod:`.encdec_vlm`, :mod:`.t5gemma2`): encoder-decoder VLMs (Florence-2,
  T5Gemma 2): the placeholder-mask module, the unified encoder's and the decoder's layers, how a
  packed encoder layer is called, the decoder layers' K/V of a hidden state, FLOPs per token (MuE).

Adding a family is one registered adapter function in the matching module.
"""

from __future__ import annotations

from .encdec_vlm import BartEncDecAdapter, EncDecVLMAdapter, UnsupportedLanguageModelError
from .t5gemma2 import T5Gemma2Adapter
from .vlm import UnsupportedTextModelError, VLMAdapter

__all__ = ["VLMAdapter", "UnsupportedTextModelError", "EncDecVLMAdapter", "BartEncDecAdapter", "T5Gemma2Adapter",
           "UnsupportedLanguageModelError"]
