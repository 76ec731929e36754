"""Self-speculative decoding in vLLM (``custom_class`` proposer): greedy tokens equal plain vLLM's,
token for token on 50 held-out prompts, and the drafts are really used (vLLM counts them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmskip.swift import SelfSpeculativeConfig
from tests_vllm.support import ENGINE, SKIP_LM, close, spec_counts, tokens_of

PROPOSER = {"method": "custom_class", "model": "mmskip_vllm.SelfSpeculativeProposer", "num_speculative_tokens": 4}


def _spec_llm(draft: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(model=SKIP_LM, hf_overrides={"mmskip_draft": draft}, speculative_config=PROPOSER, **ENGINE)


def test_early_exit_draft_is_lossless(prompts: list[str], plain_tokens: list[list[int]]) -> None:
    # drafting on for up to 64 concurrent requests, so all 50 prompts draft in one batch
    llm = _spec_llm({"exit_layer": 8, "max_drafting_requests": 64})
    try:
        got = tokens_of(llm, prompts)
        counts = spec_counts(llm)
        # the default policy pauses drafting under load (50 > 4 requests) and is lossless too;
        # a few requests at a time draft again
        paused = tokens_of(llm, prompts[:6])
        few = [t for i in range(0, 6, 3) for t in tokens_of(llm, prompts[i:i + 3])]
    finally:
        close(llm)
    assert got == plain_tokens
    assert paused == few == plain_tokens[:6]
    assert counts["draft_tokens"] > 0 and 0 < counts["accepted"] <= counts["draft_tokens"]


def test_swift_set_draft_is_lossless(tmp_path: Path, prompts: list[str], plain_tokens: list[list[int]]) -> None:
    SelfSpeculativeConfig(attn_skip=(2, 5, 9, 13, 17, 20), mlp_skip=(3, 7, 11, 15, 19, 21)).save_pretrained(tmp_path)
    llm = _spec_llm({"swift_config": str(tmp_path), "max_drafting_requests": 64})
    try:
        got = tokens_of(llm, prompts[:20])
        counts = spec_counts(llm)
    finally:
        close(llm)
    assert got == plain_tokens[:20]
    assert counts["accepted"] > 0
