"""Teacher-forced agreement measured *while decoding*, under the same skip decisions a user gets.

A plain forward over prompt + continuation is a prefill, so decode-only techniques
(``LayerSkipConfig(phase="decode")``, ``VoidLayerConfig``, ``FFNSkipConfig``) would not skip
anything in it. Here ``generate`` runs as usual — prefill, then one cached decode step per
token — but each step records the model's own argmax and then forces the reference token, so
every step sees the reference context. The rate is what a self-speculative draft would have
accepted token by token, and it does not collapse after a first divergence the way free-running
position-wise agreement does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["decode_agreement"]


class _ForceReference(LogitsProcessor):
    """Records the argmax of the model's scores, then lets only the reference token through."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference
        self.predictions: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = len(self.predictions)
        self.predictions.append(scores.argmax(-1))
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.reference[:, step : step + 1].to(scores.device), 0.0)
        return forced


@torch.no_grad()
def decode_agreement(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, reference: torch.Tensor,
    pad_token_id: int = 0,
) -> float:
    """Fraction of decode steps where ``model``'s greedy token equals ``reference`` (B, T), the
    reference continuation (typically the unmodified model's greedy output) forced as context."""
    steps = reference.shape[1]
    force = _ForceReference(reference)
    model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, logits_processor=LogitsProcessorList([force]), pad_token_id=pad_token_id,
    )
    predicted = torch.stack(force.predictions, 1).to(reference.device)
    return float((predicted == reference).float().mean())
