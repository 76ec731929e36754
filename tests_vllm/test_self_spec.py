"""Self-speculative decoding in vLLM (``custom_class`` proposer): greedy tokens equal plain vLLM's,
token for token on 50 held-out prompts, and the drafts are really used (vLLM counts them); seeded
sampled requests repeat exactly and follow plain vLLM's distribution."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmskip.swift import SelfSpeculativeConfig
from tests_vllm.support import (
    ENGINE,
    SAMPLE_PROMPTS,
    SKIP_LM,
    close,
    homogeneity_p,
    seeded_samples,
    spec_counts,
    tokens_of,
    welch_p,
)

PROPOSER = {"method": "custom_class", "model": "mmskip_vllm.SelfSpeculativeProposer", "num_speculative_tokens": 4}
SPEC_SEED = 1000  # plain vLLM's samples use seeds 0.. (conftest): the two samples are independent
ALPHA = 1e-3


def _spec_llm(draft: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(model=SKIP_LM, hf_overrides={"mmskip_draft": draft}, speculative_config=PROPOSER, **ENGINE)


@pytest.fixture(scope="module")
def early_exit() -> Iterator[Any]:
    # drafting on for up to 64 concurrent requests, so that 50 prompts (or 64 samples) draft in one batch
    llm = _spec_llm({"exit_layer": 8, "max_drafting_requests": 64})
    try:
        yield llm
    finally:
        close(llm)


def test_early_exit_draft_is_lossless(early_exit: Any, prompts: list[str], plain_tokens: list[list[int]]) -> None:
    before = spec_counts(early_exit)
    got = tokens_of(early_exit, prompts)
    counts = {k: v - before[k] for k, v in spec_counts(early_exit).items()}
    # the default policy pauses drafting under load (more than 4 requests) and is lossless too;
    # a few requests at a time draft again
    paused = tokens_of(early_exit, prompts[:6])
    assert got == plain_tokens
    assert counts["draft_tokens"] > 0 and 0 < counts["accepted"] <= counts["draft_tokens"]
    few = [t for i in range(0, 6, 3) for t in tokens_of(early_exit, prompts[i:i + 3])]
    assert paused == few == plain_tokens[:6]


def test_seeded_sampling_repeats_and_follows_plain_vllm(early_exit: Any, prompts: list[str],
                                                        plain_runs: dict[str, Any]) -> None:
    """Temperature 1, 8 prompts x 40 seeds, 4 tokens. The first token comes from the prompt's
    forward (no draft); tokens 2-4 go through vLLM's rejection sampler, so they are compared."""
    sample_prompts = prompts[:SAMPLE_PROMPTS]
    before = spec_counts(early_exit)
    spec = seeded_samples(early_exit, sample_prompts, SPEC_SEED)
    counts = {k: v - before[k] for k, v in spec_counts(early_exit).items()}
    # (a) the same seeded requests again give the same tokens
    again = seeded_samples(early_exit, sample_prompts[:1], SPEC_SEED)
    assert [t for t, _ in again] == [t for t, _ in spec[::SAMPLE_PROMPTS]]
    # drafts were verified, and both accepted and rejected (recovered tokens sampled)
    assert 0 < counts["accepted"] < counts["draft_tokens"]
    # (b) the same distribution as plain vLLM: the mean logprob of tokens 2-4 (sensitive to the
    # temperature the drafts are verified at) and each position's token frequencies per prompt
    plain, cooler = plain_runs["sampled"], plain_runs["cooler"]

    def surprise(samples: list[tuple[list[int], list[float]]]) -> list[float]:
        return [sum(lp[1:]) / (len(lp) - 1) for _, lp in samples]

    def position(samples: list[tuple[list[int], list[float]]], pos: int) -> list[list[int]]:
        return [[t[pos] for t, _ in samples[p::SAMPLE_PROMPTS]] for p in range(SAMPLE_PROMPTS)]

    assert welch_p(surprise(plain), surprise(spec)) > ALPHA
    for pos in (1, 2, 3):
        assert homogeneity_p(position(plain, pos), position(spec, pos)) > ALPHA
    # the test has the power to see a change: plain vLLM at temperature 0.8 is told apart
    assert welch_p(surprise(plain), surprise(cooler)) < ALPHA
    assert len({tuple(t) for t, _ in spec}) > len(spec) // 2  # really sampled, not near-greedy


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


def _drafter_stats(worker: Any) -> dict[str, Any]:
    return worker.model_runner.drafter.stats()


def test_prompt_lookup_then_layers_is_lossless(monkeypatch: pytest.MonkeyPatch, prompts: list[str],
                                               plain_tokens: list[list[int]]) -> None:
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the drafter's stats from the worker
    llm = _spec_llm({"exit_layer": 8, "prompt_lookup": True, "max_drafting_requests": 64})
    try:
        got = tokens_of(llm, prompts)
        stats = llm.collective_rpc(_drafter_stats)[0]
    finally:
        close(llm)
    assert got == plain_tokens
    lookup, layers = stats["by_source"]["lookup"], stats["by_source"]["layers"]
    # both sources drafted, and vLLM accepted some of each
    assert lookup["drafted"] > 0 and layers["drafted"] > 0
    assert 0 < lookup["accepted"] <= lookup["drafted"] and 0 < layers["accepted"] <= layers["drafted"]
    assert stats["drafted"] == lookup["drafted"] + layers["drafted"]


def _record_paused_steps(worker: Any) -> None:
    """In the worker: note, after every step the proposer spends paused, how many requests it follows."""
    drafter = worker.model_runner.drafter
    drafter.followed_when_paused = []
    propose = drafter._propose

    def recorded(*args: Any) -> list[list[int]]:
        before = drafter.paused_steps
        drafts = propose(*args)
        if drafter.paused_steps > before:
            drafter.followed_when_paused.append(len(drafter.tracks))
        return drafts

    drafter._propose = recorded


def _followed_when_paused(worker: Any) -> list[int]:
    return worker.model_runner.drafter.followed_when_paused


def test_paused_drafting_follows_nobody_and_resumes_lossless(monkeypatch: pytest.MonkeyPatch, prompts: list[str],
                                                             plain_tokens: list[list[int]]) -> None:
    """Above ``max_drafting_requests`` the proposer drafts nothing and keeps no request state; two
    requests at a time draft again afresh; every token equals plain vLLM's."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the drafter's stats from the worker
    llm = _spec_llm({"exit_layer": 8, "max_drafting_requests": 2})
    try:
        llm.collective_rpc(_record_paused_steps)
        paused = tokens_of(llm, prompts[:6])
        during = llm.collective_rpc(_drafter_stats)[0]
        followed = llm.collective_rpc(_followed_when_paused)[0]
        few = [t for i in range(0, 6, 2) for t in tokens_of(llm, prompts[i:i + 2])]
        after = llm.collective_rpc(_drafter_stats)[0]
    finally:
        close(llm)
    assert paused == few == plain_tokens[:6]
    # nobody followed at any paused step (read per step: once the batch's tail falls to 2 requests,
    # drafting resumes and follows them, so a count read after the run is not about the paused steps)
    assert during["paused_steps"] > 0 and len(followed) == during["paused_steps"] and set(followed) == {0}
    assert after["drafted"] > during["drafted"] and after["accepted"] > during["accepted"]
