"""Language metrics: perplexity on held-out text, agreement with the baseline's greedy output."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["perplexity", "greedy_generate", "agreement"]


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, seq_len: int = 256, max_windows: int = 64,
               batch_size: int = 8) -> float:
    """Perplexity of a causal LM over non-overlapping ``seq_len`` windows of a 1-D token stream."""
    model.eval()
    n = min(max_windows, (len(input_ids) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"need more than {seq_len} tokens, got {len(input_ids)}")
    device = next(model.parameters()).device
    tot, cnt = 0.0, 0
    for i in range(0, n, batch_size):
        x = torch.stack([input_ids[j * seq_len:(j + 1) * seq_len] for j in range(i, min(n, i + batch_size))]).to(device)
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        tot += nll.item()
        cnt += x[:, 1:].numel()
    return math.exp(tot / cnt)


@torch.no_grad()
def greedy_generate(model: Any, prompts: list[torch.Tensor], max_new_tokens: int = 32) -> list[torch.Tensor]:
    """Greedy continuations (new tokens only) of each 1-D prompt, generated one prompt at a time."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = p.view(1, -1).to(device)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(g[0, ids.shape[1]:].cpu())
    return out


@torch.no_grad()
def agreement(model: Any, prompts: list[torch.Tensor], baseline: list[torch.Tensor],
              candidate: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Compare ``model`` with a baseline's greedy continuations.

    - ``token_agreement``: teacher-forced — on prompt + baseline continuation, how often the
      model's argmax equals the baseline's next token (what a self-speculative draft would accept).
    - ``exact_match``: fraction of prompts whose free-running greedy continuation (``candidate``,
      generated if not given) equals the baseline's token for token.
    - ``prefix_match``: mean fraction of the continuation matched before the first divergence.

    The teacher-forced pass is one prefill-style forward: a technique that skips only while
    decoding (e.g. ``LayerSkipConfig(phase="decode")``) skips nothing there and scores 1.0; judge it
    by ``exact_match``/``prefix_match`` (or apply it with ``phase="all"`` to measure draft agreement).
    """
    device = next(model.parameters()).device
    agree = total = 0
    for p, b in zip(prompts, baseline, strict=True):
        ids = torch.cat([p, b]).view(1, -1).to(device)
        pred = model(input_ids=ids).logits[0, len(p) - 1:-1].argmax(-1).cpu()
        agree += int((pred == b).sum())
        total += len(b)
    if candidate is None:
        candidate = greedy_generate(model, prompts, max_new_tokens=max(len(b) for b in baseline))
    exact, prefix = 0, 0.0
    for b, c in zip(baseline, candidate, strict=True):
        c = c[: len(b)]
        same = (c == b[: len(c)]).int()
        exact += int(len(c) == len(b) and bool(same.all()))
        first = int(same.argmin()) if not bool(same.all()) else len(c)
        prefix += first / max(1, len(b))
    n = max(1, len(prompts))
    return {"token_agreement": agree / max(1, total), "exact_match": exact / n, "prefix_match": prefix / n}
