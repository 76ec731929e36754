"""MuE: multiple early exits in an encoder-decoder vision-language model (Florence-2, T5Gemma 2).

Tang et al., "You Need Multiple Exiting: Dynamic Early Exiting for Accelerating Unified Vision
Language Model" (CVPR 2023, https://arxiv.org/abs/2211.11152) exit twice per input, both times
on the cosine similarity of a layer's input and output (the "saturation" signal, no classifier):

- **Encoder, by modality.** In the unified encoder over image + text tokens, a token stops after
  the first layer whose output is similar enough to its input (``image_threshold`` for image
  tokens, ``text_threshold`` for text tokens). Here per token (a token-level exit mask carried
  through the layers; ``encoder_granularity="modality"`` gives the authors' per-sequence,
  per-modality decision). Exited tokens keep their state through the remaining layers and still
  serve as keys/values: each later layer runs only the tokens still going as *packed queries*
  (the attention reads keys/values from every token), so their Q/output projections and FFN are
  not computed.
- **Decoder, per generated token.** A token stops after the first layer (at least ``min_layers``
  run) whose output is similar enough to its input; the threshold decays over the generated
  length. **KV rule (state copying, as CALM):** the exited hidden state is passed on unchanged,
  and every deeper layer computes its self-attention keys/values for that token from it, so later
  tokens see a full-length cache; a cached generation equals a no-cache recompute under the same
  exit decisions (``MuEState.pin_exits``).
  ``generate(use_cache=False)`` recomputes every position at each step: the earlier positions
  replay the exits that generation already decided (:mod:`mmskip.vision.generation_replay`), only the
  new one is measured, so its tokens are the cached run's.

See ``vision/mue/README.md``. Files: ``config.py`` (:class:`MuEConfig`), ``state.py``
(:class:`MuEState`, :class:`EncoderRecord` and the per-call passes), ``encoder.py`` and
``decoder.py`` (the hooks), ``hooks.py`` (:func:`attach_mue`), ``train.py`` (layer-wise training,
``python -m mmskip.vision.mue.train``); the model facts are in
:mod:`mmskip.vision.adapters.encdec_vlm` and :mod:`mmskip.vision.adapters.t5gemma2`.
"""

from __future__ import annotations

from .config import GRANULARITIES, MuEConfig
from .hooks import attach_mue
from .state import DecoderPass, EncoderPass, EncoderRecord, MuEState

__all__ = ["MuEConfig", "MuEState", "EncoderRecord", "EncoderPass", "DecoderPass", "GRANULARITIES", "attach_mue"]

