"""``SelfSpeculativeConfig``: what SWIFT drafts with and how it searches, and its attach."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..inject import SkipConfig, SkipHandle

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
        prompt_lookup: ``(min_n, max_n)``: before each draft, look the context's last n tokens
            (longest n first) up in the context itself and propose what followed their latest
            earlier occurrence (prompt-lookup decoding, https://github.com/apoorvumang/prompt-lookup-decoding);
            a match costs no draft forward, and the layer-skipping draft runs only when none is
            found. Still lossless: the full model verifies either draft. ``None`` (default): off.
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
    prompt_lookup: tuple[int, int] | None = None

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
        if self.prompt_lookup is not None and not 1 <= self.prompt_lookup[0] <= self.prompt_lookup[1]:
            raise ValueError(
                "SelfSpeculativeConfig.prompt_lookup is (min_n, max_n), the n-gram lengths looked up, with "
                f"1 <= min_n <= max_n, e.g. (2, 4); got {self.prompt_lookup}"
            )

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on causal LMs: the draft's skip ratio, draft length, confidence cut-off and
        prompt lookup (``lookup_max_n``: 0 off, else ``prompt_lookup=(2, lookup_max_n)``); lossless
        for greedy decoding: only speed changes."""
        if context.kind != "lm" or not context.num_layers or context.num_layers < 4:
            return None
        from ..tuning.space import Choice, FloatRange, IntRange, Space

        def build(v: dict[str, Any]) -> SelfSpeculativeConfig:
            lookup = (2, v["lookup_max_n"]) if v["lookup_max_n"] else None
            return cls(skip_ratio=v["skip_ratio"], max_draft=v["max_draft"], confidence=v["confidence"],
                       prompt_lookup=lookup)

        return Space(cls.technique, {"skip_ratio": FloatRange(0.2, 0.6), "max_draft": IntRange(2, 10),
                                     "confidence": FloatRange(0.3, 0.9), "lookup_max_n": Choice((0, 3, 4))},
                     build, seeds=({"skip_ratio": 0.45, "max_draft": 10, "confidence": 0.6, "lookup_max_n": 0},  # the defaults
                                   # and the docs' recommendation for text that repeats itself (code)
                                   {"skip_ratio": 0.2, "max_draft": 10, "confidence": 0.6, "lookup_max_n": 4}))

    @property
    def fixed(self) -> bool:
        return self.attn_skip is not None or self.mlp_skip is not None

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        from .hooks import attach_swift

        attach_swift(self, model, handle)
