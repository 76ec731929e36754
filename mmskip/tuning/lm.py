"""Tuning a causal LM: greedy agreement with the unmodified model, perplexity for the finalists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .space import Space, TuneContext, spaces_of
from .target import ModelTarget

__all__ = ["CausalLMTarget", "is_causal_lm", "agreement_of"]

logger = logging.getLogger(__name__)


def is_causal_lm(obj: Any) -> bool:
    """A transformers decoder-only LM the registry knows (what the LLM techniques apply to)."""
    from ..registry import UnsupportedModelError, get_adapter

    if not isinstance(obj, nn.Module):
        return False
    try:
        get_adapter(obj, "decoder")
    except UnsupportedModelError:
        return False
    return True


def agreement_of(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """``agreement``: mean fraction of each greedy continuation equal to the unmodified model's before
    the first divergence (1.0: identical, i.e. lossless); ``exact_match``: share of identical ones."""
    prefix, exact = 0.0, 0
    for out, ref in zip(outputs, reference, strict=True):
        n = min(len(out), len(ref))
        same = (out[:n] == ref[:n]).int()
        first = n if bool(same.all()) else int(same.argmin())
        prefix += first / max(1, len(ref))
        exact += int(first == len(ref) and len(out) >= len(ref))
    k = max(1, len(reference))
    return {"agreement": prefix / k, "exact_match": exact / k}


class CausalLMTarget(ModelTarget):
    """A causal LM: inputs are prompts (strings with ``tokenizer``, or 1-D token-id tensors); a
    candidate's outputs are greedy continuations of ``max_new_tokens`` tokens, scored by
    :func:`agreement_of` against the unmodified model's."""

    kind = "lm"
    metric = "agreement"

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_new_tokens: int = 32) -> None:
        super().__init__(model)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        from ..registry import get_adapter

        self.num_layers = get_adapter(model, "decoder").num_layers

    def spaces(self) -> list[Space]:
        from ..inject import SkipConfig

        return spaces_of(SkipConfig.registered(), TuneContext(self.model, "lm", num_layers=self.num_layers))

    def default_inputs(self, n: int, offset: int = 0, prompt_len: int = 48) -> list[torch.Tensor]:
        """Prompts of ``prompt_len`` tokens cut from the held-out stdlib text (mmskip's evaluation
        text, never trained on by the zoo), tokenized with ``tokenizer``."""
        if self.tokenizer is None:
            raise ValueError("stock prompts are tokenized text: pass tokenizer= (or give token-id prompts)")
        from ..eval.lm import heldout_ids

        ids = heldout_ids(self.tokenizer)
        stride = max(prompt_len, (len(ids) - prompt_len) // 64)  # 64 disjoint slots spread over the text
        prompts = [ids[i:i + prompt_len] for i in range(0, len(ids) - prompt_len, stride)][offset:offset + n]
        if len(prompts) < n:
            raise ValueError(f"the held-out text gives {len(prompts)} prompts from {offset}; ask for fewer")
        return prompts

    def check_inputs(self, inputs: Sequence[Any], name: str) -> list[torch.Tensor]:
        if isinstance(inputs, (str, torch.Tensor)) or not isinstance(inputs, Sequence):
            raise TypeError(f"{name} must be a list of prompts (strings or 1-D token-id tensors), "
                            f"got {type(inputs).__name__}")
        if not inputs:
            raise ValueError(f"{name} is empty; give at least one prompt")
        out = []
        for i, p in enumerate(inputs):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"{name}[{i}] is text: pass tokenizer= (or give token-id tensors)")
                p = torch.tensor(self.tokenizer(p)["input_ids"], dtype=torch.long)
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.is_floating_point() or len(p) == 0:
                raise TypeError(f"{name}[{i}] must be a non-empty string or 1-D token-id tensor")
            out.append(p)
        return out

    def generate(self, model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        from ..eval.language import greedy_generate

        return greedy_generate(model, inputs, self.max_new_tokens)

    def quality(self, outputs: Any, reference: Any) -> dict[str, float]:
        return agreement_of(outputs, reference)

    def extra_metrics(self, inputs: list[Any]) -> dict[str, float]:
        from ..eval.language import perplexity

        ids = torch.cat(inputs)
        if len(ids) < 3:
            return {}
        seq_len = min(256, len(ids) - 1)
        return {"perplexity": perplexity(self.model, ids, seq_len=seq_len, max_windows=16)}
