"""What an applied p-MoD / VideoLLM-MoD config remembers: the prefill's routed tokens, each MoD
layer's kept positions (every later decode step needs them), the routing it replays, its statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmskip.inject import TechniqueState

from ..adapters import VLMAdapter
from ..generation_replay import Generations
from .routers import MoDRouters

if TYPE_CHECKING:
    from .config import MoDConfig

__all__ = ["MoDState", "LayerRecord"]


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
