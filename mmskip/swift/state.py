"""What an applied :class:`~mmskip.swift.SelfSpeculativeConfig` remembers: the draft, the layer set
found, and the counters behind ``handle.stats()``."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..inject import CallGuard, SkipHandle, TechniqueState

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from ..registry import DecoderAdapter
    from .config import SelfSpeculativeConfig
    from .draft import Draft
    from .fallback import Fallback

__all__ = ["SwiftState"]


@dataclass
class _Counters:
    calls: int = 0
    generated: int = 0
    rounds: int = 0  # verification forwards
    drafted: int = 0
    accepted: int = 0
    search_evals: int = 0
    search_seconds: float = 0.0
    draft_forwards: int = 0
    lookup_rounds: int = 0  # verifications of a prompt-lookup draft
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> calls served by transformers' generate


class SwiftState(TechniqueState):
    """State of one applied SelfSpeculativeConfig: the draft, the layer set found, counters."""

    def __init__(self, config: SelfSpeculativeConfig, adapter: DecoderAdapter, handle: SkipHandle,
                 units: list[tuple[str, int]], draft: Draft) -> None:
        self.config = config
        self.adapter = adapter
        self.handle = handle
        self.units = units  # the candidate sublayers the search chooses among (none for a fixed set)
        self.draft = draft
        L = adapter.num_layers
        self.n_skip = min(len(self.units), max(1, round(config.skip_ratio * 2 * L)))
        self.layer_set: tuple[frozenset[int], frozenset[int]] | None = None
        self.score: float | None = None
        if config.fixed:
            self.layer_set = (frozenset(config.attn_skip or ()), frozenset(config.mlp_skip or ()))
            self.draft.set(*self.layer_set)
        self.counters = _Counters()
        self.guard = CallGuard(config.technique)
        self.warned: set[str] = set()  # fallback reasons already warned about (once per handle)

    # -- TechniqueState ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the found layer set (a fixed one stays); the next ``generate`` searches again."""
        self.reset_layer_set()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        attn, mlp = self.layer_set or (frozenset(), frozenset())
        return {
            "layer_set": {"attn_skip": sorted(attn), "mlp_skip": sorted(mlp)},
            "matchness": self.score,
            "calls": c.calls,
            "generated_tokens": c.generated,
            "verify_forwards": c.rounds,
            "drafted_tokens": c.drafted,
            "accepted_tokens": c.accepted,
            "acceptance_rate": c.accepted / c.drafted if c.drafted else 0.0,
            "mean_accepted_length": c.accepted / c.rounds if c.rounds else 0.0,
            # tokens per verification forward (accepted drafts + 1); the prefill's token is not counted
            "tokens_per_verify": (c.generated - c.calls) / c.rounds if c.rounds else 0.0,
            "search_evals": c.search_evals,
            "search_seconds": c.search_seconds,
            "draft_forwards": c.draft_forwards,
            # of the drafted / accepted tokens, those proposed by prompt lookup (no draft forward)
            "lookup_rounds": c.lookup_rounds,
            "lookup_drafted_tokens": c.lookup_drafted,
            "lookup_accepted_tokens": c.lookup_accepted,
            "draft_seconds": c.draft_seconds,  # wall time in draft forwards
            "verify_seconds": c.verify_seconds,  # wall time in verification forwards
            "fallback_calls": sum(c.fallbacks.values()),  # calls served by transformers' own generate
            "fallbacks": dict(c.fallbacks),
        }

    def forward_cost(self) -> float | None:
        """Sequential forwards per decoded token, relative to plain greedy decoding's one each: every
        verification counts as one full forward and every draft forward as the share of the model's
        FLOPs the draft runs (the layer-set search is left out: it runs once per model). Speculation
        saves forwards, not FLOPs, so this, not the FLOPs count, is what ``mmskip.tune`` ranks SWIFT by;
        it models a forward's time as independent of its token count (batch-1 decoding, bound by
        weight traffic or per-call overhead). None before a decoded token or when every call fell back."""
        c = self.counters
        tokens = c.generated - c.calls  # the prefill's token costs plain decoding a forward too
        if c.rounds == 0 or tokens <= 0:
            return None
        return (c.rounds + c.draft_forwards * self._draft_share()) / tokens

    def _draft_share(self) -> float:
        """The draft's FLOPs per token as a share of the full model's (layers and the head)."""
        cost, fixed = self.handle.counts.cost, self.handle.counts.fixed_cost
        attn, mlp = self.layer_set or (frozenset(), frozenset())
        full = sum(cost.values()) + fixed
        skipped = sum(cost.get(f"attn.{i}", 0.0) for i in attn) + sum(cost.get(f"mlp.{i}", 0.0) for i in mlp)
        return (full - skipped) / full if full else 1.0

    def fell_back(self, fallback: Fallback) -> None:
        """Count a call served by transformers' ``generate``; warn once per reason per handle."""
        self.counters.fallbacks[fallback.key] = self.counters.fallbacks.get(fallback.key, 0) + 1
        if fallback.key not in self.warned:
            self.warned.add(fallback.key)
            warnings.warn(f"{fallback.why}; falling back to transformers' generate (mmskip warns once per reason)",
                          UserWarning, stacklevel=3)

    def found_config(self) -> SelfSpeculativeConfig | None:
        """The applied config with the layer set found so far fixed (``attn_skip`` / ``mlp_skip``),
        or None before the first search: save it (``save_pretrained``) to search once per model and
        draft with that set in later processes, without searching again."""
        if self.layer_set is None:
            return None
        attn, mlp = self.layer_set
        return dataclasses.replace(self.config, attn_skip=tuple(sorted(attn)), mlp_skip=tuple(sorted(mlp)))

    def reset_layer_set(self) -> None:
        """Forget the found layer set; the next ``generate`` searches again."""
        if not self.config.fixed:
            self.layer_set, self.score = None, None

    # -- the custom_generate callable ---------------------------------------------------------------
    def decode(self, model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: Any = None,
               stopping_criteria: Any = None, generation_config: GenerationConfig | None = None,
               streamer: Any = None, **model_kwargs: Any) -> Any:
        """Self-speculative decoding of one sequence (:func:`mmskip.swift.generate.decode`)."""
        from .generate import decode

        return decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                      **model_kwargs)
