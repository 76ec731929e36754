"""Session fixtures of the vLLM tests: held-out prompts and plain vLLM's greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests_vllm.support import ENGINE, SKIP_LM, close, held_out_prompts, tokens_of


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return held_out_prompts()


@pytest.fixture(scope="session")
def plain_tokens(prompts: list[str]) -> Iterator[list[list[int]]]:
    """Plain vLLM's greedy tokens for ``prompts`` on ``stdlib-lm-skip``: the reference every
    mmskip path must reproduce."""
    from vllm import LLM

    llm = LLM(model=SKIP_LM, **ENGINE)
    try:
        out = tokens_of(llm, prompts)
    finally:
        close(llm)
    yield out
