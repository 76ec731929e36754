"""What the zoo recipes share on top of the one training loop (:func:`mmskip.train.fit`).

Each recipe brings a :class:`RecipeTask` (its models, a batch per step, its loss); this module maps
the recipes' former ``OneCycleLR`` onto the loop's warm-up + cosine schedule (:func:`one_cycle`)
and turns the loop's EMA back into modules (:func:`ema_copies`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from mmskip.train import TrainConfig, TrainTask

__all__ = ["RecipeTask", "one_cycle", "ema_copies", "step_generator"]

logger = logging.getLogger(__name__)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for optimizer step ``step`` of a run seeded ``seed`` (so a resumed run draws
    what an uninterrupted one would)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def one_cycle(steps: int, lr: float, pct_start: float = 0.3, **kwargs: Any) -> TrainConfig:
    """The loop's stand-in for ``OneCycleLR(max_lr=lr, total_steps=steps, pct_start=pct_start)`` on AdamW.

    A warm-up over ``pct_start`` of the run to the peak ``lr``, then a cosine to 0 over the rest
    (``lr_schedule="cosine_after_warmup"``, ``min_lr_ratio=0``; OneCycle started at lr/25 and ended at
    lr/2.5e5). AdamW's default betas (0.9, 0.999) replace OneCycle's cycling of beta1 between 0.85
    and 0.95. No gradient clipping unless ``max_grad_norm`` is given; CPU unless ``cpu=False``.
    ``kwargs`` are further :class:`TrainConfig` fields.
    """
    settings: dict[str, Any] = {"betas": (0.9, 0.999), "max_grad_norm": 0.0, "cpu": True, "min_lr_ratio": 0.0,
                                "lr_schedule": "cosine_after_warmup", "warmup": max(1, round(pct_start * steps))}
    settings.update(kwargs)
    return TrainConfig(steps=steps, lr=lr, **settings)


class RecipeTask(TrainTask):
    """A recipe's training: ``modules`` (prefix -> module) all train; subclasses give ``draw`` and ``loss``."""

    def __init__(self, modules: dict[str, nn.Module], seed: int, desc: str) -> None:
        self.modules, self.seed, self.desc = modules, seed, desc

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": p for k, m in self.modules.items() for n, p in m.named_parameters() if p.requires_grad}

    def prepare(self, accelerator: Any) -> None:
        for m in self.modules.values():
            m.to(accelerator.device).train()
        self.device = accelerator.device

    def draw(self, g: torch.Generator) -> Any:
        """The batch, drawn from ``g`` (seeded by the step)."""
        raise NotImplementedError

    def batch(self, step: int) -> Any:
        return self.draw(step_generator(self.seed, step))

    def fingerprint(self) -> dict[str, Any]:
        return {"recipe": self.desc, "seed": self.seed}


def ema_copies(modules: dict[str, nn.Module], ema: dict[str, torch.Tensor] | None) -> dict[str, nn.Module]:
    """Copies of ``modules`` holding the EMA weights :func:`mmskip.train.fit` returned (eval, frozen)."""
    if ema is None:
        raise ValueError("fit kept no EMA: give TrainConfig(ema=...)")
    out = {}
    for k, m in modules.items():
        e = copy.deepcopy(m).eval().requires_grad_(False)
        with torch.no_grad():
            for n, p in e.named_parameters():
                if f"{k}.{n}" in ema:
                    p.copy_(ema[f"{k}.{n}"].to(p.device, p.dtype))
        out[k] = e
    return out
