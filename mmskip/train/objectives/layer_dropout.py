"""LayerSkip's layer dropout: each sample skips each layer with a rate rising with depth."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmskip.registry import get_adapter

from .base import Objective

__all__ = ["LayerDropout", "dropout_rates"]

_CURRICULA = ("constant", "exponential")


def dropout_rates(num_layers: int, p_max: float, step: int = 0, total_steps: int = 1,
                  curriculum: str = "constant") -> list[float]:
    """``p(l, t) = S(t) D(l) p_max`` with ``D(l) = exp(l ln2 / (L - 1)) - 1`` (0 for the first
    layer, 1 for the last) and ``S(t) = 1`` (``"constant"``, for fine-tuning) or
    ``exp(t ln2 / (T - 1)) - 1`` (``"exponential"``, for pretraining from scratch); LayerSkip §4.1."""
    if curriculum not in _CURRICULA:
        raise ValueError(f"curriculum must be one of {_CURRICULA}, got {curriculum!r}")
    s = 1.0 if curriculum == "constant" else math.exp(step * math.log(2) / max(total_steps - 1, 1)) - 1
    depth = max(num_layers - 1, 1)
    return [s * (math.exp(i * math.log(2) / depth) - 1) * p_max for i in range(num_layers)]


class LayerDropout(Objective):
    """Layer dropout (Elhoushi et al., 2024, "LayerSkip: Enabling Early Exit Inference and
    Self-Speculative Decoding", https://arxiv.org/abs/2404.16710): while training, each sample
    of the batch skips decoder layer ``l`` (its output is its input) with probability
    :func:`dropout_rates`, so later layers learn to be optional. Off in ``eval()`` mode.

    Args:
        p_max: the last layer's drop rate.
        curriculum: ``"constant"`` (``S(t) = 1``) or ``"exponential"`` (rates grow from 0 over training).
        seed: with the step, seeds the draws (resumed runs drop the same layers).
    """

    name = "layer-dropout"

    def __init__(self, p_max: float = 0.2, curriculum: str = "constant", seed: int = 0) -> None:
        if not 0.0 <= p_max < 1.0:
            raise ValueError(f"LayerDropout.p_max must lie in [0, 1), got {p_max}")
        if curriculum not in _CURRICULA:
            raise ValueError(f"LayerDropout.curriculum must be one of {_CURRICULA}, got {curriculum!r}")
        self.p_max, self.curriculum, self.seed = p_max, curriculum, seed
        self._rates: list[float] = []
        self._step = 0
        self._micro = 0

    def check(self, model: nn.Module) -> None:
        get_adapter(model, "decoder")  # UnsupportedModelError names the supported families

    def attach(self, model: nn.Module) -> None:
        adapter = get_adapter(model, "decoder")
        self._rates = dropout_rates(adapter.num_layers, self.p_max, curriculum=self.curriculum)
        for i, layer in enumerate(adapter.layers):
            self._rewrite_output(layer, self._dropped(i))
        self._adapter = adapter

    def begin_step(self, step: int, total_steps: int) -> None:
        self._rates = dropout_rates(self._adapter.num_layers, self.p_max, step, total_steps, self.curriculum)
        self._step, self._micro = step, 0

    def _dropped(self, i: int):
        def fn(module: nn.Module, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
            if not (module.training and torch.is_grad_enabled()):
                return None
            if i == 0:  # one draw per micro-batch, for every layer at once
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self._step) * 64 + self._micro)
                self._micro += 1
                rates = torch.tensor(self._rates)
                self._drop = torch.rand(h.shape[0], len(rates), generator=g) < rates
            drop = self._drop[:, i].to(h.device)
            if not bool(drop.any()):
                return None
            return torch.where(drop.view(-1, *([1] * (out.dim() - 1))), h, out)
        return fn

    def __repr__(self) -> str:
        return f"LayerDropout(p_max={self.p_max}, curriculum={self.curriculum!r})"
