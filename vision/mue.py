"""MuE: multiple early exits in an encoder-decoder vision-language model (Florence-2).

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
  replay the exits that generation already decided (:mod:`mmskip.vision.generation`), only the
  new one is measured, so its tokens are the cached run's.

See ``vision/MUE.md``. The hooks are in :mod:`mmskip.vision.mue_hooks`, the model facts in
:mod:`mmskip.vision.mue_adapters`.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from mmskip._phase import HeadCounter
from mmskip.inject import CallGuard, SkipConfig, SkipHandle, TechniqueState
from mmskip.registry import get_adapter
from mmskip.schedules import AdaptiveSchedule, DecayingThreshold

from .generation import Generations, bind_generations
from .mue_adapters import EncDecVLMAdapter
from .mue_hooks import (
    DecoderHook,
    DecoderLayerHook,
    DecoderPass,
    EncoderHook,
    EncoderKVHook,
    EncoderLayerHook,
    EncoderPass,
    EncoderRecord,
    PlaceholderHook,
)

__all__ = ["MuEConfig", "MuEState", "EncoderRecord"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("token", "modality")
_ENCODER_FIELDS = {"image_schedule": ("image_threshold",), "text_schedule": ("text_threshold",)}
_DECODER_FIELDS = ("decoder_threshold", "decay", "floor", "min_layers")


def _check_unit(name: str, value: float | None) -> None:
    if value is None:
        return
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"MuEConfig.{name} is a cosine-similarity threshold and must lie in [0, 1] (1.0 = never exit) or be "
            f"None (no exits there), got {value!r}"
        )


@dataclass(frozen=True)
class MuEConfig(SkipConfig):
    """MuE early exits in the encoder (per modality) and the decoder (per generated token).

    Paper: Tang et al., 2023, "You Need Multiple Exiting: Dynamic Early Exiting for Accelerating
    Unified Vision Language Model", https://arxiv.org/abs/2211.11152 (authors' code: the ``MuE``
    classes of github.com/Tangshengku/OFA). Every exit compares a layer's input and output by
    cosine similarity and exits when it *exceeds* the threshold (``cos > threshold``, cosine
    clamped to 1, so 1.0 never exits). Supported: ``Florence2ForConditionalGeneration`` and
    ``Florence2Model`` (registry kind ``"encdec-vlm"``). See ``vision/MUE.md``.

    Args:
        image_threshold: encoder exit threshold for image tokens, default 0.99; in [0, 1] or None
            (image tokens run every layer).
        text_threshold: encoder exit threshold for text tokens, default 0.99; in [0, 1] or None.
            Padding never counts; a prompt without image tokens is all text (a warning says so once).
        encoder_granularity: ``"token"`` (default): each token exits on its own cosine.
            ``"modality"``: the authors' code, per row and modality: the cosine of the modality's
            whole (flattened) block of still-running tokens, and the block exits at once.
        decoder_threshold: decoder exit threshold at the first decoder position, default 0.95; in
            [0, 1] or None (the decoder runs every layer).
        decay: per-position decay of the decoder threshold, default 0.99, in (0, 1]: at decoder
            position ``t`` (0 = the start token) a token exits when ``cos > max(floor,
            decoder_threshold * decay**t)``. The paper lets the threshold decay with the generated
            length (later tokens exit more easily); its code uses 1.0 for the first third of
            ``max_len`` steps, then ``0.9*tau + 0.1*exp(-(t+1)/(max_len+1))``. This geometric rule
            needs no ``max_len`` and is a deliberate departure (``decay=1`` keeps it constant).
        floor: lowest decoder threshold the decay reaches, default 0.9; in [0, 1] and at most
            ``decoder_threshold``.
        min_layers: decoder layers every token runs before it may exit (the first exit is after
            layer ``min_layers``, 1-based); default None = a third of the decoder, rounded up.
            Must be below the decoder depth (the last layer has nothing to skip).
        image_schedule: the image tokens' encoder threshold from the shared scheduler instead of
            ``image_threshold``: ``schedules.adaptive(threshold, signal="cosine")`` with the threshold
            in [0, 1], ``warmup=0``, ``max_skip=1`` and ``num`` None or the encoder depth (MuE's
            encoder has no warm-up or skip cap). Default None = use ``image_threshold``.
        text_schedule: the same for text tokens instead of ``text_threshold``.
        decoder_schedule: the decoder threshold from the shared scheduler instead of
            ``decoder_threshold``, ``decay``, ``floor`` and ``min_layers``:
            ``schedules.decaying(threshold, decay, floor, warmup)``, whose ``threshold_at(t)`` is the
            threshold at decoder position ``t`` and whose ``warmup`` is ``min_layers`` (``warmup=0``
            means the same as 1: a token can exit after the first layer at the earliest; it is not
            the "a third of the decoder" default). Default None = use the float fields.

    A schedule and the float fields it replaces are exclusive: with a schedule, those fields must
    stay at their defaults (a field set to another value raises ``ValueError``; one set explicitly
    to its default cannot be told apart and is ignored). Comparison: MuE exits when ``cos >
    threshold`` (strict, the authors' code) for every threshold, scheduled or not; the shared
    ``AdaptiveSchedule.compute`` skips on ``cos >= threshold`` but MuE reads only its ``threshold``,
    so a scheduled config behaves exactly like the float config with the same numbers
    (``DecayingThreshold.compute`` uses the same strict rule).
    """

    technique: ClassVar[str] = "mue"
    image_threshold: float | None = 0.99
    text_threshold: float | None = 0.99
    encoder_granularity: str = "token"
    decoder_threshold: float | None = 0.95
    decay: float = 0.99
    floor: float = 0.9
    min_layers: int | None = None
    image_schedule: AdaptiveSchedule | None = None
    text_schedule: AdaptiveSchedule | None = None
    decoder_schedule: DecayingThreshold | None = None

    def __post_init__(self) -> None:
        for name in ("image_threshold", "text_threshold", "decoder_threshold", "floor"):
            _check_unit(name, getattr(self, name))
        defaults = {f.name: f.default for f in fields(self)}
        given = dict(_ENCODER_FIELDS, decoder_schedule=_DECODER_FIELDS)
        for sched_name, replaced in given.items():
            if getattr(self, sched_name) is None:
                continue
            clash = [f"{n}={getattr(self, n)!r}" for n in replaced if getattr(self, n) != defaults[n]]
            if clash:
                raise ValueError(
                    f"MuEConfig: {sched_name} supplies {', '.join(replaced)}; give either the schedule or those "
                    f"fields, not both (got {sched_name} and {', '.join(clash)})"
                )
        for name in ("image_schedule", "text_schedule"):
            sched = getattr(self, name)
            if sched is None:
                continue
            if sched.signal != "cosine":
                raise ValueError(f"MuEConfig.{name}: MuE exits on the cosine of a layer's input and output; use "
                                 f"schedules.adaptive(threshold, signal='cosine'), got signal={sched.signal!r}")
            _check_unit(f"{name}.threshold", sched.threshold)
            if sched.warmup != 0 or sched.max_skip != 1.0:
                raise ValueError(
                    f"MuEConfig.{name}: MuE's encoder exits have no warm-up or skip cap (a token may exit after any "
                    f"layer but the last); use warmup=0 and max_skip=1.0, got warmup={sched.warmup}, "
                    f"max_skip={sched.max_skip}"
                )
        if self.encoder_granularity not in GRANULARITIES:
            raise ValueError(
                f"MuEConfig.encoder_granularity must be one of {GRANULARITIES}, got {self.encoder_granularity!r}"
            )
        if math.isnan(self.decay) or not 0.0 < self.decay <= 1.0:
            raise ValueError(f"MuEConfig.decay must lie in (0, 1] (1 = a constant threshold), got {self.decay!r}")
        if self.decoder_threshold is not None and self.floor > self.decoder_threshold:
            raise ValueError(
                f"MuEConfig.floor ({self.floor}) must not exceed decoder_threshold ({self.decoder_threshold}); the "
                "threshold decays from decoder_threshold down to floor"
            )
        if self.min_layers is not None and self.min_layers < 1:
            raise ValueError(f"MuEConfig.min_layers must be >= 1 (every token runs a layer), got {self.min_layers}")

    # -- thresholds ---------------------------------------------------------------------------
    def decoder_threshold_at(self, position: int) -> float | None:
        """The decoder exit threshold at decoder position ``position`` (None: no exits)."""
        if self.decoder_schedule is not None:
            return self.decoder_schedule.threshold_at(position)
        if self.decoder_threshold is None:
            return None
        return max(self.floor, self.decoder_threshold * self.decay**position)

    def decoder_params(self) -> dict[str, Any]:
        """The decoder's ``threshold``, ``decay``, ``floor`` in force (from the schedule or the fields)."""
        s = self.decoder_schedule
        if s is not None:
            return {"threshold": s.threshold, "decay": s.decay, "floor": s.floor}
        return {"threshold": self.decoder_threshold, "decay": self.decay, "floor": self.floor}

    def encoder_threshold(self, modality: str) -> float | None:
        """The encoder exit threshold of ``"image"`` or ``"text"`` tokens (the schedule's, else the field)."""
        if modality not in ("image", "text"):
            raise ValueError(f"MuEConfig.encoder_threshold(): modality must be 'image' or 'text', got {modality!r}")
        sched = getattr(self, f"{modality}_schedule")
        return float(sched.threshold) if sched is not None else getattr(self, f"{modality}_threshold")

    def encoder_active(self) -> bool:
        """True when some encoder threshold can trigger (not None, below 1)."""
        return any(t is not None and t < 1.0 for t in map(self.encoder_threshold, ("image", "text")))

    # -- attach -----------------------------------------------------------------------------
    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        adapter: EncDecVLMAdapter = get_adapter(model, "encdec-vlm")
        L = adapter.num_decoder_layers
        if self.decoder_schedule is not None:
            asked, name = max(1, self.decoder_schedule.warmup), "decoder_schedule.warmup"
        else:
            asked, name = self.min_layers, "min_layers"
        if asked is not None and asked >= L:
            raise ValueError(
                f"MuEConfig.{name}={asked} leaves no decoder layer to exit after: "
                f"{type(model).__name__}'s decoder has {L} layers and a token can exit after layers 1..{L - 1}"
            )
        for sched_name in ("image_schedule", "text_schedule"):
            sched = getattr(self, sched_name)
            if sched is not None and sched.num is not None and sched.num != adapter.num_encoder_layers:
                raise ValueError(
                    f"MuEConfig.{sched_name} was built for num={sched.num} layers but {type(model).__name__}'s encoder "
                    f"has {adapter.num_encoder_layers}; leave num=None"
                )
        min_layers = asked if asked is not None else max(1, math.ceil(L / 3))
        state = MuEState(config=self, adapter=adapter, min_layers=min_layers)
        guard = CallGuard(self.technique)
        counts = handle.counts
        for i in range(adapter.num_encoder_layers):
            kv, rest = adapter.encoder_costs(i)
            counts.cost[f"encoder.{i}"], counts.cost[f"encoder.{i}.kv"] = rest, kv
        for i in range(L):
            kv, rest = adapter.decoder_costs(i)
            counts.cost[f"decoder.{i}"], counts.cost[f"decoder.{i}.kv"] = rest, kv
        handle.add_hook(adapter.mm_model, PlaceholderHook(state), ".placeholder")
        handle.add_hook(adapter.encoder, EncoderHook(state, handle, guard), ".encoder")
        for i, layer in enumerate(adapter.encoder_layers):
            kv_hook = EncoderKVHook()
            handle.add_hook(layer.self_attn, kv_hook, ".kv")
            handle.add_hook(layer, EncoderLayerHook(i, state, handle, kv_hook), ".layer")
        handle.add_hook(adapter.decoder, DecoderHook(state, handle, guard), ".decoder")
        bind_generations(handle, model, state.generations)  # generate(use_cache=False) replays its exits
        for i, layer in enumerate(adapter.decoder_layers):
            handle.add_hook(layer, DecoderLayerHook(i, state, handle), ".layer")
        if adapter.head is not None:
            counts.fixed_cost = adapter.head_flops()
            handle.add_hook(adapter.head, HeadCounter(handle), ".head")
        handle.state = state
        logger.debug("mue: %d encoder / %d decoder layers, decoder min_layers %d", adapter.num_encoder_layers, L,
                     min_layers)


@dataclass
class MuEState(TechniqueState):
    """What an applied :class:`MuEConfig` remembers: the last encoder pass's exits per token, the
    current decoder generation's exit layer per (row, position), the pins that replay them, and
    the per-call passes the hooks share. ``stats()`` describes the last encoder pass and the last
    decoder generation (since its cache was empty); ``handle.stats()['items']`` and
    ``flops_fraction`` accumulate over every call until ``handle.reset_stats()``."""

    config: MuEConfig
    adapter: EncDecVLMAdapter
    min_layers: int
    encoder_record: EncoderRecord | None = None
    decoder_exits: torch.Tensor | None = None  # (batch, positions) long: layers each decoder token ran
    decoder_dense: int = 0  # exited (layer, token) pairs a mixed batch still computed, this generation
    decoder_complete: bool = True  # False: a forward continued a cache whose history was not recorded
    pinned_encoder: torch.Tensor | None = None
    pinned_decoder: torch.Tensor | None = None
    enc: EncoderPass | None = None  # the encoder pass in flight
    dec: DecoderPass | None = None  # the decoder forward in flight
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # thread -> image mask awaiting its encoder
    generations: Generations = field(default_factory=Generations)  # generate calls in flight, per thread
    warned_no_image: bool = False

    def reset(self) -> None:
        """Forget the last encoder pass and decoder generation, and any pins; counts stay."""
        self.encoder_record = self.decoder_exits = None
        self.decoder_dense, self.decoder_complete = 0, True
        self.pinned_encoder = self.pinned_decoder = None
        self.enc = self.dec = None
        self.pending.clear()

    # -- capture from the hooks -----------------------------------------------------------
    def capture_image_mask(self, mask: torch.Tensor) -> None:
        """Called by the wrapped ``get_placeholder_mask``: the next encoder call on this thread
        gets this (batch, seq) image-token mask."""
        self.pending[threading.get_ident()] = (mask[..., 0] if mask.dim() == 3 else mask).bool()

    def take_image_mask(self) -> torch.Tensor | None:
        return self.pending.pop(threading.get_ident(), None)

    # -- exit replay -------------------------------------------------------------------------
    def pin_exits(self) -> None:
        """Make later calls reuse the recorded exits instead of measuring: the encoder replays the
        last encoder pass's exit layer per token, the decoder the last generation's exit layer per
        (row, position) (e.g. to recompute a generation without a cache under the same decisions).
        ``unpin_exits()`` undoes it."""
        if self.encoder_record is None and self.decoder_exits is None:
            raise RuntimeError("MuEState.pin_exits(): nothing recorded yet; run the model first")
        if not self.decoder_complete:
            raise RuntimeError(
                "MuEState.pin_exits(): the last decoder generation continued a cache this application did not see "
                "from its start, so its exits are not all recorded"
            )
        self.pinned_encoder = None if self.encoder_record is None else self.encoder_record.exit_layer.clone()
        self.pinned_decoder = None if self.decoder_exits is None else self.decoder_exits.clone()

    def unpin_exits(self) -> None:
        self.pinned_encoder = self.pinned_decoder = None

    # -- statistics -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.config
        Le, Ld = self.adapter.num_encoder_layers, self.adapter.num_decoder_layers
        encoder: dict[str, Any] = {"layers": Le, "granularity": c.encoder_granularity,
                                   "thresholds": {m: c.encoder_threshold(m) for m in ("image", "text")}}
        rec = self.encoder_record
        for name in ("image", "text"):
            if rec is None:
                tokens, run = 0, 0
            else:
                sel = rec.valid & (rec.image if name == "image" else ~rec.image)
                tokens, run = int(sel.sum()), int(rec.exit_layer[sel].sum())
            encoder[name] = _tally(tokens, run, Le)
        ex = self.decoder_exits
        tokens, run = (0, 0) if ex is None else (ex.numel(), int(ex.sum()))
        decoder = {"layers": Ld, "min_layers": self.min_layers, **_tally(tokens, run, Ld),
                   "computed_anyway": self.decoder_dense, "complete": self.decoder_complete,
                   **c.decoder_params()}
        return {"encoder": encoder, "decoder": decoder,
                "pinned": self.pinned_encoder is not None or self.pinned_decoder is not None}


def _tally(tokens: int, run: int, layers: int) -> dict[str, Any]:
    """Layer-token computations as the paper counts them: every exited token skips the rest."""
    return {"tokens": tokens, "layer_tokens": tokens * layers, "run": run, "skipped": tokens * layers - run,
            "mean_exit_layer": run / tokens if tokens else None}
