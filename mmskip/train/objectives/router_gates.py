"""FiRST router training: each routed layer's output is gated by its router's keep probability,
and a sparsity term pays for every layer kept."""

from __future__ import annotations

import torch
from torch import nn

from mmskip.first_routers import Routers
from mmskip.registry import get_adapter

from .base import Objective, StepContext

__all__ = ["RouterGates"]


class RouterGates(Objective):
    """FiRST's router objective (Jain et al., 2024, "FiRST: Finetuning Router-Selective
    Transformers for Input-Adaptive Latency Reduction", https://arxiv.org/abs/2410.12513): routed
    layer ``i`` outputs ``h + p_i (layer(h) - h)`` with ``p_i`` its router's mean keep probability
    over the sequence, and the loss adds ``sparsity * mean_i p_i`` (latency). Pair it with
    :class:`Distillation` (quality: KL from the unmodified model); the routers are its trainable
    parameters, so ``TrainConfig(trainable="none")`` trains only them.

    Args:
        routers: the :class:`mmskip.first_routers.Routers` to train (``Routers.for_model(model)``).
        sparsity: weight of the mean keep probability.
        straight_through: the forward uses the hard decision inference uses (keep iff p >= 0.5);
            gradients flow through p.
    """

    name = "routers"

    def __init__(self, routers: Routers, sparsity: float = 0.5, straight_through: bool = False) -> None:
        if not isinstance(routers, Routers):
            raise TypeError(f"RouterGates takes mmskip.first_routers.Routers, got {type(routers).__name__}")
        self.routers, self.sparsity, self.straight_through = routers, sparsity, straight_through
        self._probs: list[torch.Tensor] = []

    def check(self, model: nn.Module) -> None:
        adapter = get_adapter(model, "decoder")
        if self.routers.num_layers != adapter.num_layers:
            raise ValueError(f"the routers were built for {self.routers.num_layers} layers; the model has "
                             f"{adapter.num_layers}. Build them with Routers.for_model(model).")

    def attach(self, model: nn.Module) -> None:
        adapter = get_adapter(model, "decoder")
        self.routers.to(next(model.parameters()).device).train()
        for i in self.routers.routed:
            self._rewrite_output(adapter.layers[i], self._gated(i), prepend=True)

    def detach(self) -> None:
        super().detach()
        self.routers.eval()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def _gated(self, i: int):
        def fn(module: nn.Module, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            p = self.routers[i].sequence_keep(h, None)
            self._probs.append(p)
            gate = p + ((p >= 0.5).to(p.dtype) - p).detach() if self.straight_through else p
            return h + gate.to(h.dtype)[:, None, None] * (out - h)
        return fn

    @property
    def probabilities(self) -> list[torch.Tensor]:
        """Each routed layer's (batch,) keep probability, in forward order, since the last loss."""
        return self._probs

    def begin_step(self, step: int, total_steps: int) -> None:
        self._probs.clear()  # whatever evaluation forwards left

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        keep = torch.stack(self._probs).mean()
        self._probs.clear()
        self._keep = float(keep.detach())
        return {"sparsity": self.sparsity * keep}

    def metrics(self) -> dict[str, float]:
        return {"keep": self._keep} if hasattr(self, "_keep") else {}

    def __repr__(self) -> str:
        return f"RouterGates(sparsity={self.sparsity}, straight_through={self.straight_through})"
