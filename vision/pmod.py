"""p-MoD: Mixture-of-Depths over vision tokens in a vision-language model's decoder layers.

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
replay the routing of the generation's first forward (:mod:`mmskip.vision.generation`), so they
give the cached run's tokens (the attention signal would otherwise rank from another last token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmskip._phase import HeadCounter
from mmskip.inject import SkipConfig, SkipHandle, TechniqueState
from mmskip.registry import get_adapter
from mmskip.schedules import AdaptiveSchedule, ConstantSchedule, ProgressiveSchedule, Schedule

from .adapters import VLMAdapter
from .generation import Generations, bind_generations
from .mod_routers import MoDRouters
from .pmod_hooks import CaptureHook, InputHook, MlpScaleHook, MoDLayerHook

__all__ = ["MoDConfig", "VideoMoDConfig", "MoDState", "LayerRecord", "mod_layers"]

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

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        adapter: VLMAdapter = get_adapter(model, "vlm")
        if self.routing == "frames" and not adapter.takes_video:
            raise ValueError(
                f"{type(self).__name__} routes video frames, and {type(model).__name__} takes images only; use "
                "mmskip.vision.MoDConfig (p-MoD) for images, or a video model (LlavaOnevision, Qwen2-VL, Qwen2.5-VL)"
            )
        ratios = mod_layers(self, adapter.num_layers, type(model).__name__)
        routers = None
        if self.signal == "router":
            routers = MoDRouters.load(self.routers)
            routers.check(model, sorted(ratios))
            ref = next(model.parameters())
            routers.to(device=ref.device, dtype=ref.dtype)
        state = MoDState(config=self, adapter=adapter, ratios=ratios, routers=routers)
        text = adapter.text
        state.costs = [text.layer_flops(i) for i in range(text.num_layers)]
        handle.counts.cost.update({f"layer.{i}": c for i, c in enumerate(state.costs)})
        if adapter.head is not None:
            handle.counts.fixed_cost = text._linear_flops(adapter.head)
            handle.add_hook(adapter.head, HeadCounter(handle), ".head")
        handle.add_hook(adapter.mm_model, InputHook(state, handle), ".input")
        bind_generations(handle, model, state.generations)  # generate(use_cache=False) replays its routing
        for i, ratio in sorted(ratios.items()):
            layer = text.layers[i]
            scale = None
            if self.signal == "router":
                scale = MlpScaleHook()
                handle.add_hook(text.mlp(i), scale, ".mlp_scale")
            state.records[i] = LayerRecord(ratio=ratio)
            handle.add_hook(layer, MoDLayerHook(i, state, handle, scale), ".layer")
        if self.signal == "norm":
            for i in sorted({i - 1 for i in ratios}):
                handle.add_hook(text.layers[i], CaptureHook(i, state), ".capture")
        handle.state = state
        logger.debug("%s: MoD layers %s, signal %s", self.technique, ratios, self.signal)


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


@dataclass
class LayerRecord:
    """One MoD layer's routing since the last prefill started (summed over the batch and over
    the prefill chunks of a stream), and which positions its KV cache holds."""

    ratio: float
    n_vision: int = 0
    kept_vision: int = 0
    tokens: int = 0  # positions that reached the layer (batch x prompt length)
    run: int = 0  # positions that ran it
    kv_bytes_per_token: int = 0
    kept_idx: torch.Tensor | None = None  # (batch, P) positions of the last chunk that ran; None: all
    cols: torch.Tensor | None = None  # (batch, C) cache positions the layer's KV holds below tail_from
    tail_from: int = 0  # ... and every position from here on (None cols: every position)

    def forget(self) -> None:
        self.n_vision = self.kept_vision = self.tokens = self.run = self.tail_from = 0
        self.kept_idx = self.cols = None


@dataclass
class MoDState(TechniqueState):
    """What an applied :class:`MoDConfig` remembers: the prefill's vision mask and each MoD layer's
    kept positions (needed by every later decode step), plus its statistics."""

    config: MoDConfig
    adapter: VLMAdapter
    ratios: dict[int, float]
    routers: MoDRouters | None = None
    costs: list[float] = field(default_factory=list)
    records: dict[int, LayerRecord] = field(default_factory=dict)
    mode: str = "none"  # since the last prefill: "mod" (tokens routed), "plain" (none to route), "none"
    phase: str = "idle"  # "prefill" | "decode" while a forward runs
    batch: int = 0
    tokens: int = 0  # prefill positions since the last prefill started (batch x length, over chunks)
    past: int = 0  # cache length when the current forward started
    q: int = 0  # the current forward's length
    vision: torch.Tensor | None = None  # (batch, chunk) bool: the routed tokens of the last prefill chunk
    groups: torch.Tensor | None = None  # (batch, chunk) long: their routing group, -1 = always runs
    group_sizes: list[list[int]] = field(default_factory=list)  # per row (read once per chunk: no per-layer syncs)
    last: torch.Tensor | None = None  # (batch,) index of each row's last token in the chunk
    pad: torch.Tensor | None = None  # (batch, chunk) 2-D padding mask, if one was given
    prev_input: dict[int, torch.Tensor] = field(default_factory=dict)  # "norm": layer inputs, prefill only
    signal_flops: float = 0.0  # the last prefill's cost of computing the signals
    pinned: dict[int, torch.Tensor] | None = None  # pin_routing(): every later prefill replays it
    replay: dict[int, torch.Tensor] | None = None  # the routing the forward in flight replays, if any
    generations: Generations = field(default_factory=Generations)  # generate calls in flight, per thread
    warned_plain: bool = False  # told the user once that a prompt had nothing to route

    def reset(self) -> None:
        """Forget the last prefill (a later decode step must start with a new prefill); counts stay."""
        for rec in self.records.values():
            rec.forget()
        self.mode, self.phase, self.batch, self.tokens, self.past, self.q = "none", "idle", 0, 0, 0, 0
        self.vision = self.groups = self.last = self.pad = None
        self.group_sizes = []
        self.prev_input.clear()
        self.signal_flops = 0.0

    # -- routing replay -------------------------------------------------------------------
    def pin_routing(self) -> None:
        """Make later prefills reuse the last prefill's choice of vision tokens per layer (e.g. to
        recompute a generation without a cache under the same routing); ``unpin_routing()`` undoes."""
        if self.mode != "mod":
            raise RuntimeError("pin_routing(): no prefill with vision tokens has run since apply/reset")
        self.pinned = {i: self.kept_vision_mask(i) for i in self.records}

    def kept_vision_mask(self, layer: int) -> torch.Tensor:
        """(batch, prompt) bool: the vision tokens MoD layer ``layer`` ran in the last prefill."""
        if self.vision is None:
            raise RuntimeError("no prefill with vision tokens has run since apply/reset")
        idx = self.records[layer].kept_idx
        if idx is None:
            return self.vision.clone()
        vis = self.vision.to(idx.device)
        return torch.zeros_like(vis).scatter_(1, idx, True) & vis

    def unpin_routing(self) -> None:
        self.pinned = None

    # -- statistics -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        L = self.adapter.num_layers
        tokens = self.tokens
        full = sum(self.costs) * tokens
        saved = sum(self.costs[i] * (r.tokens - r.run) for i, r in self.records.items())
        kv_per_token = [self._kv_per_token(i) for i in range(L)]
        kv_full = sum(kv_per_token) * tokens
        kv_saved = sum(kv_per_token[i] * (r.tokens - r.run) for i, r in self.records.items())
        return {
            "signal": self.config.signal,
            "mode": self.mode,
            "mod_layers": dict(self.ratios),
            "layers": {
                i: {"ratio": r.ratio, "n_vision": r.n_vision, "kept_vision": r.kept_vision, "tokens": r.tokens,
                    "run": r.run}
                for i, r in sorted(self.records.items())
            },
            "prefill_flops_fraction": (full - saved + self.signal_flops) / full if full else 1.0,
            "prefill_signal_flops": self.signal_flops,
            "kv_bytes_full": kv_full,
            "kv_bytes_saved": kv_saved,
            "kv_fraction": (kv_full - kv_saved) / kv_full if kv_full else 1.0,
        }

    def _kv_per_token(self, i: int) -> int:
        attn = self.adapter.text.attention(i)
        w = attn.k_proj.weight
        return 2 * attn.k_proj.out_features * w.element_size()
