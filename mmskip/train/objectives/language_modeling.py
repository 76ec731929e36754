"""Next-token cross-entropy and distillation from the unmodified model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective, StepContext

__all__ = ["LanguageModeling", "Distillation", "next_token_loss"]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position ``t``'s logits against token ``t + 1``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


class LanguageModeling(Objective):
    """Next-token cross-entropy of the model's final logits (with whatever the other objectives
    change in the forward active: a skip schedule, layer dropout).

    Args:
        weight: multiplies the term.
    """

    name = "lm"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"lm": self.weight * next_token_loss(ctx.logits, ctx.input_ids)}

    def __repr__(self) -> str:
        return f"LanguageModeling(weight={self.weight})"


class Distillation(Objective):
    """KL divergence from the unmodified model's next-token distribution to the trained one's
    (FiRST's quality term: Jain et al., 2024, https://arxiv.org/abs/2410.12513). The teacher is the
    same model with every objective paused and LoRA adapters off, so frozen weights make it exact.

    Args:
        weight: multiplies the term.
        temperature: softens both distributions (the term is scaled by ``temperature ** 2``).
    """

    name = "distill"

    def __init__(self, weight: float = 1.0, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"Distillation.temperature must be > 0, got {temperature}")
        self.weight, self.temperature = weight, temperature

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        t = self.temperature
        student = (ctx.logits.float() / t).log_softmax(-1)
        teacher = (ctx.teacher_logits().float() / t).log_softmax(-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
        return {"distill": self.weight * t * t * kl}

    def __repr__(self) -> str:
        return f"Distillation(weight={self.weight}, temperature={self.temperature})"
