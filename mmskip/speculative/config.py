"""``SelfSpeculativeConfig``: what SWIFT drafts with and how it searches, and its attach."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..inject import SkipConfig, SkipHandle
from ..registry import get_adapter

__all__ = ["SelfSpeculativeConfig"]


@dataclass(frozen=True)
class SelfSpeculativeConfig(SkipConfig):
    """SWIFT self-speculative decoding: the model drafts with sublayers skipped, then verifies.

    SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration (Xia et al., 2024),
    https://arxiv.org/abs/2410.06916. Greedy output equals the model's own greedy ``generate``
    token for token; sampled tokens follow its distribution (speculative-sampling acceptance).

    Args:
        skip_ratio: fraction of the model's 2L attention + MLP sublayers the draft skips (SWIFT's
            r), chosen among layers 1..L-2 (the first and last layer always run); default 0.45.
        attn_skip: a fixed set of layers whose attention the draft skips (e.g.
            ``handle.stats()["layer_set"]["attn_skip"]`` of an earlier run); default None. When it
            or ``mlp_skip`` is given, no search runs.
        mlp_skip: a fixed set of layers whose MLP the draft skips; default None.
        max_draft: most tokens drafted per verification forward; default 10.
        confidence: drafting stops once the draft's top-1 probability falls below this (SWIFT's
            confidence-aware drafting; the unconfident token is still proposed); 0 disables it;
            default 0.6.
        search_trials: layer sets evaluated in all per search; default 24.
        random_trials: how many of those are drawn at random (scored on the prompt before
            decoding starts); the rest come from Bayesian optimisation; default 8.
        trials_per_round: layer sets evaluated after each verification while the search runs
            (on the context generated so far); default 2.
        target_score: the search stops once a layer set reaches this matchness (fraction of
            context positions where the draft's top-1 token is the full model's); default 0.95.
        search_window: context tokens (the most recent) scored per trial; default 64.
        reuse: keep the best layer set for later ``generate`` calls; default True.
        reoptimize_below: forget the layer set after a call whose acceptance rate is below this,
            so the next call searches again (0: never); default 0.0.
        seed: seed of the search's random proposals; default 0.
    """

    technique: ClassVar[str] = "self_speculative"
    skip_ratio: float = 0.45
    attn_skip: tuple[int, ...] | None = None
    mlp_skip: tuple[int, ...] | None = None
    max_draft: int = 10
    confidence: float = 0.6
    search_trials: int = 24
    random_trials: int = 8
    trials_per_round: int = 2
    target_score: float = 0.95
    search_window: int = 64
    reuse: bool = True
    reoptimize_below: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.skip_ratio < 1.0:
            raise ValueError(f"SelfSpeculativeConfig.skip_ratio must lie in (0, 1), got {self.skip_ratio}")
        if self.max_draft < 1:
            raise ValueError(f"SelfSpeculativeConfig.max_draft must be >= 1, got {self.max_draft}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"SelfSpeculativeConfig.confidence must lie in [0, 1], got {self.confidence}")
        if self.search_trials < 1 or self.random_trials < 1 or self.trials_per_round < 1:
            raise ValueError("search_trials, random_trials and trials_per_round must be >= 1")
        if not 0.0 <= self.target_score <= 1.0:  # also refuses NaN
            raise ValueError(
                f"SelfSpeculativeConfig.target_score is a matchness (the fraction of positions where the draft agrees) "
                f"and must lie in [0, 1], got {self.target_score}"
            )
        if not 0.0 <= self.reoptimize_below <= 1.0:
            raise ValueError(f"SelfSpeculativeConfig.reoptimize_below must lie in [0, 1], got {self.reoptimize_below}")
        if self.search_window < 2:
            raise ValueError(f"SelfSpeculativeConfig.search_window must be >= 2, got {self.search_window}")

    @property
    def fixed(self) -> bool:
        return self.attn_skip is not None or self.mlp_skip is not None

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .generate import SwiftState
        from .route import route_generate

        adapter = get_adapter(model, "decoder")
        if not callable(getattr(model, "generate", None)) or adapter.head is None:
            raise TypeError(
                f"SelfSpeculativeConfig decodes through model.generate; {type(model).__name__} has no LM head or "
                "generate. Apply it to the causal-LM class (e.g. LlamaForCausalLM, not LlamaModel)."
            )
        L = adapter.num_layers
        anchors = _anchor_layers(model, L)
        if self.fixed:
            attn, mlp = set(self.attn_skip or ()), set(self.mlp_skip or ())
            bad = sorted(i for i in attn | mlp if not 0 <= i < L)
            if bad:
                raise ValueError(f"SelfSpeculativeConfig skips layers {bad}, but the model has {L} layers (0..{L - 1})")
            if attn & anchors:
                what = "layer 0's attention" if anchors == {0} else f"the attention of layers {sorted(anchors)}"
                raise ValueError(f"the draft must run {what}: the attention mask is sized from its KV length")
        elif L < 3:
            raise ValueError(f"SWIFT searches layers 1..L-2; a {L}-layer model has none to skip")
        handle.counts.cost.update({f"attn.{i}": adapter.attn_flops(i) for i in range(L)})
        handle.counts.cost.update({f"mlp.{i}": adapter.mlp_flops(i) for i in range(L)})
        handle.counts.fixed_cost = adapter.head_flops()
        state = SwiftState(self, adapter, handle, anchors)
        handle.state = state
        route_generate(model, handle)


def _anchor_layers(model: torch.nn.Module, num_layers: int) -> set[int]:
    """Layers whose attention the draft always runs: the first layer of each attention type
    (transformers sizes each type's attention mask from that layer's cache)."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if not types or len(types) != num_layers:
        return {0}
    return {list(types).index(t) for t in set(types)}
