"""Session fixtures of the vLLM tests: held-out prompts, and plain vLLM's greedy tokens and seeded
samples, computed in one engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests_vllm.support import (
    ENGINE,
    SAMPLE_PROMPTS,
    SKIP_LM,
    close,
    greedy,
    held_out_prompts,
    seeded_samples,
)

# seeds of plain vLLM's samples; the speculative samples use others (independent samples)
PLAIN_SEED, COOLER_SEED = 0, 2000


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return held_out_prompts()


@pytest.fixture(scope="session")
def plain_runs(prompts: list[str]) -> Iterator[dict[str, Any]]:
    """Plain vLLM on ``stdlib-lm-skip``, the reference every mmskip path must reproduce: greedy
    tokens and text for ``prompts``; seeded samples at temperature 1 (and 0.8, the sampling
    test's power check) for the first ``SAMPLE_PROMPTS`` prompts."""
    from vllm import LLM

    llm = LLM(model=SKIP_LM, **ENGINE)
    try:
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        runs = {
            "greedy": [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs],
            "sampled": seeded_samples(llm, prompts[:SAMPLE_PROMPTS], PLAIN_SEED),
            "cooler": seeded_samples(llm, prompts[:SAMPLE_PROMPTS], COOLER_SEED, temperature=0.8),
        }
    finally:
        close(llm)
    yield runs


@pytest.fixture(scope="session")
def plain_outputs(plain_runs: dict[str, Any]) -> list[tuple[list[int], str]]:
    return plain_runs["greedy"]


@pytest.fixture(scope="session")
def plain_tokens(plain_outputs: list[tuple[list[int], str]]) -> list[list[int]]:
    return [tokens for tokens, _ in plain_outputs]
