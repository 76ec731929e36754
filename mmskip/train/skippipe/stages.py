"""Cut a Llama-style causal LM into SkipPipe stages, and put it back together.

Stage 0 holds the token embedding, the final norm and the LM head (tied to the embedding in the
zoo's models): a path starts and ends there. Stages 1 … S−1 hold equal runs of decoder layers and
compute their own rotary position embeddings, so any of them can follow any other (skips, swaps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HomeStage", "LayerStage", "split", "layer_ranges", "join", "run_path"]


def layer_ranges(num_layers: int, stages: int) -> list[range]:
    """The decoder layers of middle stages 1 … S−1 (equal runs; the first ones get the remainder)."""
    middle = stages - 1
    if num_layers < middle:
        raise ValueError(f"{num_layers} decoder layers cannot fill {middle} middle stages; use fewer stages")
    base, extra = divmod(num_layers, middle)
    out, start = [], 0
    for i in range(middle):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class HomeStage(nn.Module):
    """Stage 0: embedding out, norm + head + loss back in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of one microbatch."""
        logits = self.lm_head(self.norm(hidden))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class LayerStage(nn.Module):
    """A middle stage: a run of decoder layers with their own rotary embedding."""

    def __init__(self, model: nn.Module, layers: range) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.rotary_emb = model.model.rotary_emb
        self.indices = list(layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        pe = self.rotary_emb(hidden, pos)
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe)
            hidden = out[0] if isinstance(out, tuple) else out  # causal attention without a mask (sdpa)
        return hidden


def split(model: nn.Module, stages: int) -> list[nn.Module]:
    """``[HomeStage, LayerStage × (stages − 1)]`` sharing ``model``'s modules (no copies)."""
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model, "lm_head"):
        raise TypeError(f"SkipPipe splits Llama-style causal LMs (model.model.layers, lm_head); got {type(model).__name__}")
    return [HomeStage(model), *[LayerStage(model, r) for r in layer_ranges(len(model.model.layers), stages)]]


def run_path(parts: list[nn.Module], ids: torch.Tensor, path: list[int]) -> torch.Tensor:
    """The loss of ``ids`` through the middle stages ``path`` (in that order) — a path in one process."""
    home = parts[0]
    h = home.embed(ids)
    for s in path:
        h = parts[s](h)
    return home.loss(h, ids)


def join(model: nn.Module, state: dict[int, dict[str, torch.Tensor]], stages: int) -> nn.Module:
    """Load each stage's ``state_dict`` (keyed by stage) back into ``model`` (in place)."""
    parts = split(model, stages)
    for s, sd in state.items():
        parts[s].load_state_dict(sd)
    return model
