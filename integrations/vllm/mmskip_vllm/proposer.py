"""``SelfSpeculativeProposer``: vLLM's ``custom_class`` drafter built on the served model's own layers.

Use::

    LLM(model=..., hf_overrides={"mmskip_draft": {"exit_layer": 8}},
        speculative_config={"method": "custom_class",
                            "model": "mmskip_vllm.SelfSpeculativeProposer",
                            "num_speculative_tokens": 4})

vLLM verifies the drafts with its rejection sampler, so greedy output equals plain vLLM's token
for token, and sampled output follows the model's distribution. Drafts are greedy. With
``"prompt_lookup": true`` in ``mmskip_draft``, a row whose last tokens occurred earlier in its
context drafts what followed them (no forward pass); only the other rows run the kept layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmskip.swift.lookup import lookup_draft

from .cpu_expand_fix import repair_expand_kernel
from .draft_spec import DRAFT_KEY, DraftSpec
from .drafter import LayerDrafter, RowCache

__all__ = ["SelfSpeculativeProposer"]


@dataclass
class _Track:
    """One request's draft state: its draft KV cache, adapted draft length per draft source
    (absent: the configured one), context length at the last call, and the tokens drafted then
    and by which source (``"lookup"`` or ``"layers"``)."""

    cache: RowCache = field(default_factory=RowCache)
    k: dict[str, int] = field(default_factory=dict)
    seen: int = -1
    drafted: int = 0
    source: str = "layers"

    def continued_by(self, context: np.ndarray, kept: int) -> bool:
        """Whether ``context`` is this request's context grown by the ``kept`` tokens vLLM kept."""
        if len(context) != self.seen + kept:
            return False
        return self.cache.common_prefix(context) >= min(self.cache.length, self.seen)


class SelfSpeculativeProposer:
    """Drafts with the served model's kept sublayers (``DraftSpec``), sharing its weights."""

    def __init__(self, vllm_config: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        text = hf_config.get_text_config()
        self.spec = DraftSpec.from_settings(getattr(hf_config, DRAFT_KEY, None), int(text.num_hidden_layers))
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.drafter: LayerDrafter | None = None
        self.tracks: dict[int, _Track] = {}  # batch row -> the state of the request it holds
        self.by_source = {"lookup": [0, 0], "layers": [0, 0]}  # drafted, accepted tokens
        self.paused_steps = 0
        self.seconds = 0.0
        repair_expand_kernel()  # sampled requests are verified at their own temperature (vLLM issue #55005)

    def load_model(self, target_model: torch.nn.Module) -> None:
        """vLLM hands over the served model after loading it: the draft runs its modules."""
        self.drafter = LayerDrafter(target_model, self.spec)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """Draft tokens per batch row (``[]`` for rows still in prefill, at the length limit, or
        while drafting is paused under load)."""
        if self.drafter is None:
            raise RuntimeError("SelfSpeculativeProposer.propose called before load_model")
        t0 = time.perf_counter()
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        finally:
            self.seconds += time.perf_counter() - t0

    def _propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                 token_ids_cpu: np.ndarray) -> list[list[int]]:
        active = [i for i, s in enumerate(sampled_token_ids) if s and num_tokens_no_spec[i] < self.max_model_len]
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if len(active) > self.spec.max_drafting_requests:
            # paused: count the last drafts' acceptance once, then follow nobody (matching every row
            # to its request each step is work for nothing while no row drafts); a request whose
            # drafting resumes starts afresh
            if self.tracks:
                self._follow(active, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
                self.tracks = {}
            self.paused_steps += 1
            return drafts
        self._follow(active, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        with torch.inference_mode():
            for i in active:
                n = int(num_tokens_no_spec[i])
                track = self.tracks[i]
                drafts[i], track.source = self._draft(track, token_ids_cpu[i, :n], self.max_model_len - n)
                track.drafted = len(drafts[i])
        return drafts

    def _draft(self, track: _Track, context: np.ndarray, room: int) -> tuple[list[int], str]:
        """A row's draft and its source: prompt lookup when configured and it finds a match, else
        the kept layers; at most the source's adapted length and ``room`` tokens."""
        if self.spec.prompt_lookup is not None:
            k = min(track.k.get("lookup", self.k), room)
            found = lookup_draft(context, *self.spec.prompt_lookup, k) if k > 0 else []
            if found:
                return found, "lookup"
        k = min(track.k.get("layers", self.k), room)
        return (self._draft_row(track.cache, context, k) if k > 0 else []), "layers"

    def _follow(self, active: list[int], sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray) -> None:
        """Match each active row to the request state it continues, count accepted drafts from how
        many tokens vLLM kept, and adapt the draft length.

        vLLM moves requests between batch rows (it fills the holes finished requests leave), and
        when depends on the timing of arrivals. A request is therefore followed by its tokens, not
        its row: its state continues the one whose context its own extends by the tokens vLLM kept.
        A request no state continues is new and starts afresh. A request's drafts thus depend only
        on its own tokens and acceptances, so a seeded sampled request repeats exactly when it is
        sent again (as long as drafting is not paused under load).
        """
        old, self.tracks = self.tracks, {}
        for i in active:
            n, kept = int(num_tokens_no_spec[i]), len(sampled_token_ids[i])
            context = token_ids_cpu[i, :n]
            src = i if i in old and old[i].continued_by(context, kept) else next(
                (j for j, t in old.items() if t.continued_by(context, kept)), None)
            track = old.pop(src) if src is not None else _Track()
            if track.drafted:
                accepted = kept - 1
                counts = self.by_source[track.source]
                counts[0] += track.drafted
                counts[1] += accepted
                if self.spec.adaptive:
                    k = track.k.get(track.source, self.k)
                    track.k[track.source] = min(self.k, k + 1) if accepted >= track.drafted else max(1, accepted + 1)
            track.seen, track.drafted = n, 0
            self.tracks[i] = track

    def _draft_row(self, row: RowCache, context: np.ndarray, k: int) -> list[int]:
        assert self.drafter is not None
        start = min(row.common_prefix(context), len(context) - 1)
        logits = self.drafter.run(row, context[start:], start)
        out: list[int] = []
        for j in range(k):
            token = int(torch.argmax(logits))
            out.append(token)
            if j + 1 < k:
                logits = self.drafter.run(row, np.array([token], dtype=np.int64), len(context) + j)
        return out

    def stats(self) -> dict[str, Any]:
        """Drafted and accepted tokens (in all, and per source), acceptance rate, paused steps,
        requests followed now, draft KV bytes."""
        drafted = sum(d for d, _ in self.by_source.values())
        accepted = sum(a for _, a in self.by_source.values())
        return {
            "draft": self.spec.describe(),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None,
            "by_source": {s: {"drafted": d, "accepted": a} for s, (d, a) in self.by_source.items()},
            "paused_steps": self.paused_steps,
            "followed_requests": len(self.tracks),
            "propose_seconds": self.seconds,
            "draft_kv_bytes": sum(t.cache.nbytes() for t in self.tracks.values()),
        }
