"""p-MoD's and VideoLLM-MoD's configs: which decoder layers route vision tokens, by which signal.

:func:`mod_layers` turns a config's schedule into ``{layer: keep ratio}`` for a model's depth (and
says what to change when it does not fit). Applying a config attaches the hooks of
:mod:`mmskip.vision.pmod.hooks`; what it remembers is a :class:`~mmskip.vision.pmod.state.MoDState`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mmskip.inject import SkipConfig, SkipHandle
from mmskip.schedules import (
    AdaptiveSchedule,
    ConstantSchedule,
    ExplicitSchedule,
    ProgressiveSchedule,
    Schedule,
)

__all__ = ["MoDConfig", "VideoMoDConfig", "mod_layers", "SIGNALS"]

logger = logging.getLogger(__name__)

SIGNALS = ("router", "attention", "norm")


def mod_layers(config: MoDConfig, num_layers: int | None, what: str = "the model") -> dict[int, float]:
    """``{layer: keep ratio}`` of the MoD layers (ratio < 1) of ``config`` on a ``num_layers``-deep
    decoder; ``ValueError`` when the schedule does not fit or a ratio is outside (0, 1]."""
    name = type(config).__name__
    try:
        ratios = config.schedule.ratios(num_layers)
    except ValueError as err:
        depth = f"{num_layers}-layer " if num_layers else ""
        raise ValueError(f"{name}.schedule does not fit {what}'s {depth}language model: {err}") from None
    bad = [(i, r) for i, r in enumerate(ratios) if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(
            f"{name}: keep ratios must lie in (0, 1] (1 = every vision token runs the layer); got {bad} as "
            "(layer, ratio). A layer cannot skip all vision tokens: use a ratio (or progressive floor) > 0"
        )
    if ratios[0] < 1.0:
        raise ValueError(
            f"{name}: layer 0 must keep every token (its schedule ratio is {ratios[0]}); MoD starts at layer 1"
        )
    return {i: float(r) for i, r in enumerate(ratios) if r < 1.0}


@dataclass(frozen=True)
class MoDConfig(SkipConfig):
    """p-MoD vision-token skipping (Mixture-of-Depths with progressive ratio decay) for LLaVA models.

    Paper: Zhang et al., 2024, "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio
    Decay", https://arxiv.org/abs/2412.04449. Text tokens always run; in each MoD layer only
    the top ``trunc(n_vision * R_l)`` vision tokens of a row run, the rest pass through, and the
    layer's KV cache keeps only the tokens that ran. See ``vision/README.md``.

    Args:
        schedule: per-layer vision-token keep ratios; default ``schedules.progressive()`` (PRD:
            ``R_l = cos(pi*l/(L-1))/2 + 0.5``, MoD only where ``R_l <= 0.85``, floored at 0.15).
            Every ratio must lie in (0, 1] and layer 0 must keep 1.0; ratio 1.0 = plain layer.
        signal: how vision tokens are ranked, default ``"attention"``. ``"router"``: p-MoD's
            learned router per MoD layer (needs ``routers``), with TanhNorm weights and STRing;
            ``"attention"``: training-free, FastV's signal: the attention the last prompt
            token pays each vision token, from the layer's own q/k projections; ``"norm"``:
            training-free, the token's relative change over the previous layer
            ``|h_l - h_{l-1}| / |h_{l-1}|``.
        routers: folder written by ``MoDRouters.save`` (``signal="router"`` only); default None.
        tanh_scale: TanhNorm's ``alpha`` in ``w = alpha * tanh(score) + 1``, default 0.2 (p-MoD's
            value); in [0, 1). Only used with ``signal="router"``.
    """

    technique: ClassVar[str] = "pmod"
    routing: ClassVar[str] = "all"  # one routing group per row: all of its vision tokens
    schedule: Schedule = ProgressiveSchedule()
    signal: str = "attention"
    routers: str | None = None
    tanh_scale: float = 0.2

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError(
                f"{name} takes a static schedule of keep ratios (progressive, constant, explicit(ratios=...)), "
                "not adaptive"
            )
        if self.signal not in SIGNALS:
            raise ValueError(f"{name}.signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.signal == "router" and self.routers is None:
            raise ValueError(
                f"{name}(signal='router') needs trained routers: pass routers=<folder written by "
                "MoDRouters.save>, or use a training-free signal ('attention' or 'norm')"
            )
        if self.signal != "router" and self.routers is not None:
            raise ValueError(f"{name}.routers is only used with signal='router' (signal is {self.signal!r})")
        if not 0.0 <= self.tanh_scale < 1.0:
            raise ValueError(f"{name}.tanh_scale must lie in [0, 1) so weights stay positive, got {self.tanh_scale}")
        if getattr(self.schedule, "num", None) is not None or getattr(self.schedule, "ratio_list", None) is not None:
            mod_layers(self, None)  # the ratios are known now: validate them early

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on VLMs (``context.kind == "vlm"``): the schedule family (``progressive``: PRD floored at
        ``keep``; ``constant``: ``keep``; ``steep``: ``keep``, then x0.75 per layer, floored at 0.1), each
        with no MoD before layer ``first``, and the signal: the training-free ones, plus ``"router"`` when
        ``context.facts["routers"]`` names trained routers. VideoMoD only where the inputs carry video
        (``facts["video"]``)."""
        facts = context.facts
        if context.kind != "vlm" or not context.num_layers or context.num_layers < 2:
            return None
        if cls.routing == "frames" and not facts.get("video"):
            return None
        from mmskip.tuning.space import Choice, FloatRange, IntRange, Space

        L = context.num_layers
        routers = facts.get("routers")
        signals = ("attention", "norm") + (("router",) if routers else ())
        params = {"schedule": Choice(("progressive", "constant", "steep")), "keep": FloatRange(0.1, 0.9),
                  "first": IntRange(1, L - 1), "signal": Choice(signals)}

        def build(v: dict[str, Any]) -> MoDConfig:
            keep, first = float(v["keep"]), int(v["first"])
            if not 0.0 < keep <= 1.0 or not 1 <= first < L:
                raise ValueError(f"{cls.__name__}: keep {keep} / first {first} do not fit a {L}-layer model")
            if v["schedule"] == "progressive":
                schedule: Schedule = ProgressiveSchedule(floor=min(keep, 0.85))
                ratios = schedule.ratios(L)
                if any(r < 1.0 for r in ratios[:first]):  # no MoD before layer `first`
                    schedule = ExplicitSchedule(ratio_list=tuple(1.0 if i < first else round(r, 4)
                                                                 for i, r in enumerate(ratios)))
            elif v["schedule"] == "constant":
                schedule = ConstantSchedule(ratio=keep, first=first)
            elif v["schedule"] == "steep":
                schedule = ExplicitSchedule(ratio_list=tuple(
                    1.0 if i < first else round(max(0.1, keep * 0.75 ** (i - first)), 4) for i in range(L)))
            else:
                raise ValueError(f"{cls.__name__}: unknown schedule family {v['schedule']!r}")
            sig = v["signal"]
            return cls(schedule=schedule, signal=sig, routers=routers if sig == "router" else None)

        # p-MoD's PRD with its training-free signal, and a mild constant schedule (VideoLLM-MoD keeps 0.2)
        seeds = ({"schedule": "progressive", "keep": 0.15, "first": 1, "signal": "attention"},
                 {"schedule": "constant", "keep": 0.2 if cls.routing == "frames" else 0.9, "first": 1,
                  "signal": "attention"})
        return Space(cls.technique, params, build, seeds=seeds)

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_mod  # imported here: the hooks import mod_layers from this module

        attach_mod(self, model, handle)


@dataclass(frozen=True)
class VideoMoDConfig(MoDConfig):
    """VideoLLM-MoD: Mixture-of-Depths over video tokens, decided frame by frame.

    Paper: Wu et al., 2024, "VideoLLM-MoD: Efficient Video-Language Streaming with
    Mixture-of-Depths Vision Computation", https://arxiv.org/abs/2408.16730. In each MoD layer
    every video *frame* keeps its top ``trunc(n_frame * R_l)`` tokens (the paper's per-frame
    LayerExpert, ~20 % kept); the rest skip the layer; text, image tokens and a video's trailing
    separator always run. Works in one pass and in a stream (``mmskip.vision.VideoStream``:
    clips appended to the cache, each routed as it arrives). Same mechanics as :class:`MoDConfig`
    (packed kept tokens, per-layer KV cache). See ``vision/README.md``.

    Args:
        schedule: per-layer keep ratios; default ``schedules.constant(0.2)`` (every layer after
            the first keeps 20 % of each frame's tokens). Ratios in (0, 1]; layer 0 keeps 1.0.
        signal: ``"attention"`` (default, training-free: attention from the chunk's last token),
            ``"norm"`` (training-free: relative change over the previous layer) or ``"router"``
            (learned per-layer scorer with TanhNorm weights, needs ``routers``).
        routers: folder written by ``MoDRouters.save`` (``signal="router"`` only); default None.
        tanh_scale: TanhNorm's ``alpha`` for router weights, default 0.2; in [0, 1).
    """

    technique: ClassVar[str] = "videomod"
    routing: ClassVar[str] = "frames"  # one routing group per video frame
    schedule: Schedule = ConstantSchedule(ratio=0.2)

