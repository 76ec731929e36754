"""Evaluate a causal LM (zoo name or local folder), optionally with an mmskip config, against its baseline."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Iterable
from typing import Any

import torch

from ..timing import paired, repeated
from .decode_agreement import decode_agreement
from .language import agreement, greedy_generate, perplexity

__all__ = ["load_lm", "heldout_ids", "token_stream", "evaluate_lm", "perplexity_set", "SEQ_LEN", "MAX_WINDOWS"]


def load_lm(spec: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``, float32 and in eval mode, for a zoo name (``stdlib-lm``) or a local
    ``from_pretrained`` folder. Anything else raises ``FileNotFoundError`` (or ``ValueError`` for a
    zoo model that is not a language model) saying what is accepted."""
    from pathlib import Path

    from mmskip import zoo

    if spec in zoo.NAMES:
        loaded = zoo.load(spec)
        if not isinstance(loaded, tuple):
            raise ValueError(f"zoo model {spec!r} is not a language model; language models in the zoo: stdlib-lm, "
                             "stdlib-lm-skip")
        model, tokenizer = loaded
    elif spec and Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"{spec} has no config.json, so it is not a transformers model folder; pass a "
                                    "folder written by save_pretrained (model and tokenizer) or a zoo name")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
    else:
        raise FileNotFoundError(f"{spec!r} is neither a zoo name ({', '.join(zoo.NAMES)}) nor an existing folder; "
                                "pass a zoo name or a transformers from_pretrained folder")
    return model.float().eval(), tokenizer


def heldout_ids(tokenizer: Any, text_file: str | None = None) -> torch.Tensor:
    """Token stream of ``text_file``, or of the held-out stdlib modules (files joined by EOS)."""
    if text_file:
        texts = [open(text_file, encoding="utf-8").read()]
    else:
        from mmskip.zoo.stdlib_data import read_texts

        texts = read_texts("test")
    return token_stream(tokenizer, texts)


def token_stream(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """``texts`` tokenized and joined by the tokenizer's EOS token into one 1-D ``int64`` stream."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# The perplexity set: the first MAX_WINDOWS non-overlapping SEQ_LEN-token windows of the held-out
# stream, the same set the zoo recipe measures for the model card (mmskip.zoo.lm_model.perplexity).
SEQ_LEN = 256
MAX_WINDOWS = 200


def perplexity_set(n_tokens: int, seq_len: int = SEQ_LEN, max_windows: int = MAX_WINDOWS,
                   text_file: str | None = None) -> str:
    """Which tokens ``evaluate_lm``'s perplexity is on, in words (printed by the CLI, stored in the result)."""
    n = min(max_windows, (n_tokens - 1) // seq_len)
    source = text_file or "held-out stdlib modules (mmskip.zoo.stdlib_data test split)"
    return (f"first {n} windows x {seq_len} tokens = {n * seq_len} of the {n_tokens} tokens of {source}"
            + ("; the stdlib-lm model card's perplexity is on this same set" if text_file is None and (seq_len, max_windows)
               == (SEQ_LEN, MAX_WINDOWS) else ""))


def evaluate_lm(model: Any, tokenizer: Any, config: Any = None, n_prompts: int = 32, prompt_len: int = 64,
                max_new_tokens: int = 32, seq_len: int = SEQ_LEN, max_windows: int = MAX_WINDOWS,
                text_file: str | None = None, repeats: int = 5, time_prompts: int = 8) -> dict[str, Any]:
    """Perplexity and greedy generation speed of the baseline, and of ``config`` with agreement metrics.

    Perplexity is over the first ``max_windows`` non-overlapping ``seq_len``-token windows of the
    held-out stream (``result["perplexity_set"]`` says which); the defaults are the set the zoo
    recipe reports on the model card. ``perplexity`` and ``token_agreement`` come from plain
    forwards, which decode-only techniques treat as a prefill (nothing skipped);
    ``decode_agreement`` measures them as deployed.

    Speed: the config is applied once, to a copy of the model (so the copy keeps what the technique
    learns between calls, as deployed; it takes the model's memory a second time). Its first,
    untimed generation of all prompts gives the quality metrics and ``result["stats"]`` (with the
    FLOPs fraction). Then :func:`mmskip.timing.paired` times the first ``time_prompts`` prompts on
    the model and on the copy in ``repeats`` interleaved pairs after one warm-up pair:
    ``speedup`` is the median ratio, ``result["timing"]`` has its quartiles, the FLOPs bound and
    the bound warning (``None`` unless the speedup exceeds its bound by more than the spread allows).
    """
    ids = heldout_ids(tokenizer, text_file)
    stride = max(prompt_len, (len(ids) - prompt_len) // max(1, n_prompts))
    prompts = [ids[i:i + prompt_len] for i in range(0, len(ids) - prompt_len, stride)][:n_prompts]
    timed = prompts[:time_prompts]
    tokens = len(timed) * max_new_tokens

    def run_base() -> Any:
        return greedy_generate(model, timed, max_new_tokens)

    base = greedy_generate(model, prompts, max_new_tokens)  # untimed: the reference continuations
    result: dict[str, Any] = {
        "n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "heldout_tokens": len(ids),
        "perplexity_set": perplexity_set(len(ids), seq_len, max_windows, text_file),
        "baseline": {"perplexity": perplexity(model, ids, seq_len, max_windows)}}
    if config is None:
        secs = statistics.median(repeated(run_base, repeats, warmup=1))
        result["baseline"].update({"seconds": secs, "tokens_per_s": tokens / secs})
        result["timing"] = {"repeats": repeats, "warmup": 1, "timed_prompts": len(timed)}
        return result
    from mmskip.inject import apply

    fast = copy.deepcopy(model)
    handle = apply(fast, config)
    try:
        cand = greedy_generate(fast, prompts, max_new_tokens)  # untimed: quality and the FLOPs fraction
        stats = handle.stats()
        row: dict[str, Any] = {"perplexity": perplexity(fast, ids, seq_len, max_windows)}
        row.update(agreement(fast, prompts, base, cand))
        row["decode_agreement"] = sum(
            decode_agreement(fast, p[None], torch.ones_like(p[None]), b[None]) * len(b)
            for p, b in zip(prompts, base)
        ) / sum(len(b) for b in base)
        t = paired(run_base, {"accelerated": lambda: greedy_generate(fast, timed, max_new_tokens)},
                   repeats=repeats, warmup=1)["accelerated"]
    finally:
        handle.remove()
    fraction = stats.get("flops_fraction")
    result["baseline"].update({"seconds": t.baseline_seconds, "tokens_per_s": tokens / t.baseline_seconds})
    row.update({"seconds": t.seconds, "tokens_per_s": tokens / t.seconds, "speedup": t.speedup,
                "flops_bound": 1 / fraction if fraction else None})
    result["config"] = config.to_dict()
    result["accelerated"] = row
    result["timing"] = {**t.to_dict(fraction), "repeats": repeats, "warmup": 1, "timed_prompts": len(timed)}
    result["stats"] = stats
    return result

