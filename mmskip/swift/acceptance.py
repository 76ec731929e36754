"""Acceptance rules of speculative decoding: which drafted tokens the full model keeps."""

from __future__ import annotations

import torch

__all__ = ["greedy_accept", "speculative_accept"]


def greedy_accept(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """Greedy verification. ``target_logits``: (k + 1, V) full-model logits at the positions that
    predict the k drafted tokens and the one after; returns (drafts accepted, next token)."""
    target = target_logits.argmax(-1)
    k = int(draft_tokens.numel())
    mismatch = (target[:k] != draft_tokens).nonzero()
    m = int(mismatch[0]) if len(mismatch) else k
    return m, int(target[m])


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Speculative-sampling acceptance rule (Leviathan et al., 2023; Chen et al., 2023).

    ``p``: (k + 1, V) target probabilities, ``q``: (k, V) the draft probabilities the k
    ``draft_tokens`` were sampled from. Drafted token i is accepted with probability
    ``min(1, p_i(x) / q_i(x))``; at the first rejection the next token is sampled from
    ``norm(max(0, p_i - q_i))``; if all are accepted it is sampled from ``p_k``. The returned
    tokens are distributed exactly as samples from ``p``. Returns (accepted, next token).
    """
    k = int(draft_tokens.numel())
    if p.shape[0] != k + 1 or q.shape[0] != k:
        raise ValueError(f"expected p of {k + 1} rows and q of {k} rows for {k} drafts, got {p.shape[0]}, {q.shape[0]}")
    idx = torch.arange(k, device=p.device)
    px, qx = p[idx, draft_tokens], q[idx, draft_tokens]
    u = torch.rand(k, generator=generator, device=p.device) if k else px
    # accept when u < p/q, i.e. u * q < p (q(x) > 0 since x was sampled from q)
    rejected = (u * qx >= px).nonzero()
    if len(rejected) == 0:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    m = int(rejected[0])
    residual = (p[m] - q[m]).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[m]
    return m, int(torch.multinomial(residual, 1, generator=generator))
