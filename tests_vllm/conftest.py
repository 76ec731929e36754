"""Session fixtures of the vLLM tests: held-out prompts and plain vLLM's greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests_vllm.support import ENGINE, SKIP_LM, close, greedy, held_out_prompts


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return held_out_prompts()


@pytest.fixture(scope="session")
def plain_outputs(prompts: list[str]) -> Iterator[list[tuple[list[int], str]]]:
    """Plain vLLM's greedy tokens and text for ``prompts`` on ``stdlib-lm-skip``: the reference
    every mmskip path must reproduce."""
    from vllm import LLM

    llm = LLM(model=SKIP_LM, **ENGINE)
    try:
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
    finally:
        close(llm)
    yield [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


@pytest.fixture(scope="session")
def plain_tokens(plain_outputs: list[tuple[list[int], str]]) -> list[list[int]]:
    return [tokens for tokens, _ in plain_outputs]
