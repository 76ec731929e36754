"""Peers of vision-token skipping built on hooks (baselines, not library techniques).

Shared by ``vision_tokens.py`` and ``video_tokens.py``: a 2x2 pooling hook on the projector, and two
rankings that replace p-MoD's on its applied layer hooks: one seeded random score per token
(dropped stays dropped) and FastV's one-time ranking by layer ``K-1``'s last-token attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def pool_2x2(module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook on a projector: average-pool its square grid of image features 2x2 (n -> n/4 tokens)."""
    B, n, d = out.shape
    s = math.isqrt(n)
    grid = out.transpose(1, 2).reshape(B, d, s, s)
    return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)


def random_ranking(hooks: dict[int, Any], seed: int) -> None:
    """Replace the MoD ranking by one seeded random score per token, drawn by a prefill's first MoD layer."""
    gen = torch.Generator().manual_seed(seed)
    first, shared = min(hooks), {}

    def score(i: int, layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if i == first or shared.get("score") is None or shared["score"].shape != h.shape[:2]:
            shared["score"] = torch.rand(h.shape[:2], generator=gen).to(h.device)
        return shared["score"]

    for i, hook in hooks.items():
        hook._score = lambda layer, h, kwargs, i=i: score(i, layer, h, kwargs)


def fastv_ranking(hooks: dict[int, Any], layers, k: int) -> list:
    """FastV: layer ``k`` ranks by layer ``k-1``'s attention of the last prompt token (computed once); every
    later layer reuses that ranking, so the same vision tokens are dropped from layer ``k`` on."""
    shared: dict[str, torch.Tensor | None] = {"input": None, "score": None}

    def capture(module, args, kwargs):
        shared["input"] = args[0] if args else kwargs["hidden_states"]
        shared["score"] = None

    def score(i: int, layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if i == k or shared["score"] is None:
            shared["score"] = hooks[i]._attention_score(layers[k - 1], shared["input"], kwargs)
            shared["input"] = None
        return shared["score"]

    for i, hook in hooks.items():
        hook._score = lambda layer, h, kwargs, i=i: score(i, layer, h, kwargs)
    return [layers[k - 1].register_forward_pre_hook(capture, with_kwargs=True)]
