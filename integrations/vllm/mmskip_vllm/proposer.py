"""``SelfSpeculativeProposer``: vLLM's ``custom_class`` drafter built on the served model's own layers.

Use::

    LLM(model=..., hf_overrides={"mmskip_draft": {"exit_layer": 8}},
        speculative_config={"method": "custom_class",
                            "model": "mmskip_vllm.SelfSpeculativeProposer",
                            "num_speculative_tokens": 4})

vLLM verifies the drafts with its rejection sampler, so greedy output equals plain vLLM's token
for token (sampled output follows the same distribution). Drafts are greedy.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .draft_spec import DRAFT_KEY, DraftSpec
from .drafter import LayerDrafter, RowCache

__all__ = ["SelfSpeculativeProposer"]


class SelfSpeculativeProposer:
    """Drafts with the served model's kept sublayers (``DraftSpec``), sharing its weights."""

    def __init__(self, vllm_config: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        text = hf_config.get_text_config()
        self.spec = DraftSpec.from_settings(getattr(hf_config, DRAFT_KEY, None), int(text.num_hidden_layers))
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.drafter: LayerDrafter | None = None
        self.rows: dict[int, RowCache] = {}
        self.row_k: dict[int, int] = {}
        self.last_draft: dict[int, tuple[int, int]] = {}  # row -> (context length, drafted)
        self.drafted = 0
        self.accepted = 0
        self.paused_steps = 0
        self.seconds = 0.0

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
        for i in active:
            self._observe(i, len(sampled_token_ids[i]), int(num_tokens_no_spec[i]))
        if len(active) > self.spec.max_drafting_requests:
            self.paused_steps += 1
            self.last_draft.clear()
            return drafts
        with torch.inference_mode():
            for i in active:
                n = int(num_tokens_no_spec[i])
                k = min(self.row_k.get(i, self.k), self.max_model_len - n)
                if k > 0:
                    drafts[i] = self._draft_row(i, token_ids_cpu[i, :n], k)
                    self.last_draft[i] = (n, len(drafts[i]))
        for i in list(self.rows):
            if i >= len(sampled_token_ids):
                del self.rows[i]
        return drafts

    def _observe(self, i: int, num_sampled: int, n: int) -> None:
        """Count the row's accepted drafts from how many tokens vLLM kept, and adapt its length."""
        prev = self.last_draft.pop(i, None)
        if prev is None or n != prev[0] + num_sampled:
            return  # a new request in this row, or drafting was paused
        drafted, accepted = prev[1], num_sampled - 1
        self.drafted += drafted
        self.accepted += accepted
        if self.spec.adaptive:
            k = self.row_k.get(i, self.k)
            self.row_k[i] = min(self.k, k + 1) if accepted >= drafted else max(1, accepted + 1)

    def _draft_row(self, i: int, context: np.ndarray, k: int) -> list[int]:
        assert self.drafter is not None
        row = self.rows.setdefault(i, RowCache())
        start = min(row.common_prefix(context), len(context) - 1)
        if start == 0:
            self.row_k.pop(i, None)
        logits = self.drafter.run(row, context[start:], start)
        out: list[int] = []
        for j in range(k):
            token = int(torch.argmax(logits))
            out.append(token)
            if j + 1 < k:
                logits = self.drafter.run(row, np.array([token], dtype=np.int64), len(context) + j)
        return out

    def stats(self) -> dict[str, Any]:
        """Drafted and accepted tokens, acceptance rate, paused steps, draft KV bytes."""
        return {
            "draft": self.spec.describe(),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "paused_steps": self.paused_steps,
            "propose_seconds": self.seconds,
            "draft_kv_bytes": sum(r.nbytes() for r in self.rows.values()),
        }
