"""LAC, the rule of "Void in Language Models": which layers are void for a token, and which a prompt lets skip."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .state import VoidRecord

__all__ = ["lac_voids", "void_skip_set"]


def lac_voids(norms: torch.Tensor, alpha: float, lift_layers: int = 0) -> torch.Tensor:
    """LAC void mask. ``norms``: (L + 1, ...) residual L2 norms entering layer 0 and leaving each
    layer. Returns (L, ...) booleans: True where the layer is void for that token. The first
    ``lift_layers`` layers are never void and stay out of the threshold."""
    progress = (norms[1:] - norms[:-1])[lift_layers:]
    spread = progress.cummax(dim=0).values - progress.cummin(dim=0).values
    void = torch.zeros(norms.shape[0] - 1, *norms.shape[1:], dtype=torch.bool, device=norms.device)
    void[lift_layers:] = progress < alpha * spread
    return void


def void_skip_set(rec: VoidRecord, alpha: float, lift: int, min_fraction: float, max_layers: int) -> set[int]:
    """The layers a traced prompt ``rec`` (its ``norms`` and ``valid`` mask) lets generation skip: void for
    at least ``min_fraction`` of every sequence's valid tokens, most void first, at most
    ``max_layers``, never layer 0."""
    void = lac_voids(rec.norms, alpha, lift)  # (L, B, T)
    valid = rec.valid.unsqueeze(0)
    frac = (void & valid).sum(-1).float() / valid.sum(-1).clamp(min=1).float()  # (L, B)
    worst = frac.amin(dim=1)  # a layer is skipped only if void for every sequence in the batch
    worst[0] = -1.0  # layer 0 always runs: skipped layers copy their KV from a lower kept layer
    top = torch.argsort(worst, descending=True, stable=True)[:max_layers]
    return set(top[worst[top] >= min_fraction].tolist())  # one host read per prompt, not one per layer
