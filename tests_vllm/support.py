"""Shared set-up of the vLLM tests (run in `.venv-vllm`, never by the main suite): the zoo's
LayerSkip-trained LM, held-out prompts, one engine configuration, and plain vLLM's greedy tokens
computed once per session by conftest.py (a vLLM engine takes ~20-40 s to start on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import mmskip.zoo  # noqa: E402
from mmskip.zoo.stdlib_data import read_texts  # noqa: E402

ZOO = Path(mmskip.zoo.__file__).parent / "models"
SKIP_LM = str(ZOO / "stdlib-lm-skip")
NUM_PROMPTS = 50
NEW_TOKENS = 24
# float32 so that equal greedy tokens are the claim; a small fixed KV pool, so that the check of
# free memory against gpu_memory_utilization (the CPU backend's share of RAM) does not apply
ENGINE: dict[str, Any] = dict(dtype="float32", max_model_len=256, enforce_eager=True,
                              kv_cache_memory_bytes=256 << 20, disable_log_stats=False)


def held_out_prompts(n: int = NUM_PROMPTS) -> list[str]:
    """``n`` prompts: 160 characters from the start of a line, every 3000 characters through the
    held-out standard-library modules."""
    out = []
    for text in read_texts("test"):
        for offset in range(0, len(text) - 400, 3000):
            start = text.index("\n", offset) + 1 if offset else 0
            out.append(text[start:start + 160])
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} held-out prompts, need {n}")
    return out[:n]


def greedy(max_tokens: int = NEW_TOKENS) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def tokens_of(llm: Any, prompts: list[str], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy(max_tokens), use_tqdm=False)]


def spec_counts(llm: Any) -> dict[str, int]:
    """vLLM's own speculative-decoding counters (drafts, draft tokens, accepted tokens)."""
    names = {"vllm:spec_decode_num_draft_tokens": "draft_tokens", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: int(m.value) for m in llm.get_metrics() if m.name in names}


def close(llm: Any) -> None:
    """Stop the engine's processes now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
