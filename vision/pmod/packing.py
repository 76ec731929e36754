"""p-MoD's packing: which tokens run a MoD layer, gathered with their positions and mask.

The kept tokens of a row (every always-running token plus the top ``trunc(n_g * ratio)`` of each
routing group) run the layer as one packed sequence: hidden states, rotary ``cos``/``sin`` and
``position_ids`` are gathered at the kept positions, and the attention mask's rows and columns too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["group_sizes", "select_kept", "take", "pack_mask", "rope"]


def group_sizes(groups: torch.Tensor) -> list[list[int]]:
    """Per row, the sizes of its routing groups (one host read per prefill chunk)."""
    out = []
    for row in groups.cpu():
        ids = row[row >= 0]
        out.append(torch.unique(ids, return_counts=True)[1].tolist() if ids.numel() else [])
    return out


def select_kept(score: torch.Tensor, groups: torch.Tensor, ratio: float, P: int) -> torch.Tensor:
    """(B, P) sorted positions that run a MoD layer: every token of group -1, the top
    ``trunc(n_g * ratio)`` of each group ``g`` by ``score``, and (in rows that keep fewer than
    ``P``) the best of the rest, so every row packs to ``P`` tokens."""
    B, L = score.shape
    by_score = score.argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, groups.gather(1, by_score).argsort(dim=1, stable=True))
    sorted_groups = groups.gather(1, order).contiguous()  # ascending; within a group, best first
    start = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    size = torch.searchsorted(sorted_groups, sorted_groups, right=True) - start
    rank = torch.arange(L, device=score.device) - start
    quota = torch.floor(size.double() * ratio).long()  # == int(n * ratio) in Python
    keep = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, (rank < quota) | (sorted_groups < 0))
    priority = torch.where(keep, math.inf, score.float())
    return priority.topk(P, dim=1).indices.sort(dim=1).values


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (b, L, ...) with b in {1, B} at positions ``idx`` (B, P) along dim 1."""
    B, P = idx.shape
    t = t.expand(B, *t.shape[1:])
    index = idx.view(B, P, *([1] * (t.dim() - 2))).expand(B, P, *t.shape[2:])
    return t.gather(1, index)


def pack_mask(mask: Any, rows: torch.Tensor | None, cols: torch.Tensor) -> Any:
    """The attention mask restricted to query positions ``rows`` (None: keep all) and key
    positions ``cols``, both (B, n) index tensors."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mmskip p-MoD supports the sdpa, eager and flash-attention masks (tensors), got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    B = cols.shape[0]
    if mask.dim() == 2:  # flash attention: (batch, kv) padding mask
        return mask.expand(B, -1).gather(1, cols)
    if mask.dim() != 4:
        raise TypeError(f"mmskip p-MoD: unexpected attention mask of shape {tuple(mask.shape)}")
    m = mask.expand(B, *mask.shape[1:])
    hm, Lq = m.shape[1], m.shape[2]
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(B, hm, rows.shape[1], m.shape[3]))
        Lq = rows.shape[1]
    return m.gather(3, cols[:, None, None, :].expand(B, hm, Lq, cols.shape[1]))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin
