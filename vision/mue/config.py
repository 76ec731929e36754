"""MuE's config: encoder exit thresholds per modality, the decoder's decaying exit threshold.

Applying a :class:`MuEConfig` attaches the hooks of :mod:`mmskip.vision.mue.hooks`; what it
remembers is a :class:`~mmskip.vision.mue.state.MuEState`. See ``vision/mue/README.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from mmskip.inject import SkipConfig, SkipHandle
from mmskip.schedules import AdaptiveSchedule, DecayingThreshold

from .hooks import attach_mue

__all__ = ["MuEConfig", "GRANULARITIES"]

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
    clamped to 1, so 1.0 never exits). Supported: ``Florence2ForConditionalGeneration``,
    ``Florence2Model``, ``T5Gemma2ForConditionalGeneration`` and ``T5Gemma2Model`` (registry kind
    ``"encdec-vlm"``). See ``vision/mue/README.md``.

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

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on Florence-2 (``context.kind == "encoder_decoder"``): one encoder threshold for image and
        text tokens (``>= 0.999``: no encoder exits) and its granularity, the decoder threshold (its floor
        0.05 below it) with its decay, and ``min_layers`` (from ``facts["decoder_layers"]``)."""
        if context.kind != "encoder_decoder":
            return None
        from mmskip.tuning.space import Choice, FloatRange, IntRange, Space

        depth = int(context.facts.get("decoder_layers") or context.num_layers or 0)
        if depth < 2:
            return None
        params = {"encoder": FloatRange(0.8, 1.0), "granularity": Choice(GRANULARITIES),
                  "decoder": FloatRange(0.7, 1.0), "decay": FloatRange(0.95, 1.0), "min_layers": IntRange(1, depth - 1)}

        def build(v: dict[str, Any]) -> MuEConfig:
            enc = None if v["encoder"] >= 0.999 else float(v["encoder"])
            dec = float(v["decoder"])
            if not 1 <= int(v["min_layers"]) < depth:
                raise ValueError(f"MuEConfig: min_layers {v['min_layers']} does not fit a {depth}-layer decoder")
            return cls(image_threshold=enc, text_threshold=enc, encoder_granularity=v["granularity"],
                       decoder_threshold=dec, decay=float(v["decay"]), floor=max(0.0, dec - 0.05),
                       min_layers=int(v["min_layers"]))

        default = {"encoder": 0.99, "granularity": "token", "decoder": 0.95, "decay": 0.99,
                   "min_layers": min(depth - 1, -(-depth // 3))}  # the config's defaults (the paper-like point)
        return Space(cls.technique, params, build, seeds=(default,))

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

    def decoder_active(self) -> bool:
        """True when the decoder threshold falls below 1 at some position (it never rises: decay <= 1)."""
        p = self.decoder_params()
        if p["threshold"] is None:
            return False
        return max(p["floor"], p["threshold"] if p["decay"] == 1.0 else 0.0) < 1.0

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        attach_mue(self, model, handle)
