"""LayerSkip's early-exit loss: every layer's output, read through the shared final norm and LM
head, is trained to predict the next token, under a curriculum that picks which layers count."""

from __future__ import annotations

import torch
from torch import nn

from mmskip.registry import get_adapter

from .base import Objective, StepContext
from .language_modeling import next_token_loss

__all__ = ["EarlyExitLoss", "exit_scales", "exit_layers"]

_CURRICULA = ("rotational", "gradual", "none")


def exit_scales(num_layers: int, e_scale: float) -> list[float]:
    """Unnormalised per-layer scales: ``e(k) = e_scale * sum_{i<=k} i`` for ``k < L - 1`` and
    ``e(L-1) = L - 1 + e_scale * sum_{i<=L-2} i`` (LayerSkip §4.2): later layers weigh more."""
    scales = [e_scale * (k * (k + 1) / 2) for k in range(num_layers - 1)]
    scales.append(num_layers - 1 + e_scale * ((num_layers - 2) * (num_layers - 1) / 2))
    return scales


def exit_layers(num_layers: int, step: int, total_steps: int, curriculum: str, rotation: int,
                gradual_steps: int | None) -> list[int]:
    """Layers whose exit loss counts at ``step`` (the last layer always does).

    ``"rotational"``: every ``rotation``-th layer, the set shifting by one each step;
    ``"gradual"``: from the last layer down, one more layer enabled every
    ``gradual_steps / (L - 1)`` steps; ``"none"``: every layer, every step."""
    last = num_layers - 1
    if curriculum == "none":
        on = range(num_layers)
    elif curriculum == "rotational":
        on = [k for k in range(last) if (k + step) % rotation == 0]
    elif curriculum == "gradual":
        span = gradual_steps if gradual_steps is not None else total_steps
        reached = last if span <= 0 else min(last, int(last * step / max(span, 1)))
        on = range(last - reached, last)
    else:
        raise ValueError(f"curriculum must be one of {_CURRICULA}, got {curriculum!r}")
    return sorted({*on, last})


class EarlyExitLoss(Objective):
    """Early-exit loss (Elhoushi et al., 2024, "LayerSkip: Enabling Early Exit Inference and
    Self-Speculative Decoding", https://arxiv.org/abs/2404.16710): the loss is
    ``sum_k ẽ(t, k) CE(head(norm(h_k)), next token)`` over the layers the curriculum enables at step
    ``t``, with ``ẽ`` the :func:`exit_scales` normalised over those layers. It includes the last
    layer's (the usual) loss, so use it instead of :class:`LanguageModeling`, not beside it.

    Needs a model whose final norm and LM head can read any layer (``*ForCausalLM``).

    Args:
        e_scale: how much early layers weigh against the last (0: the plain LM loss).
        curriculum: ``"rotational"`` (default), ``"gradual"`` or ``"none"`` (all layers every step;
            the paper finds this slows training and hurts the last layer).
        rotation: ``R`` of the rotational curriculum (about ``L / R`` exits per step).
        gradual_steps: steps over which the gradual curriculum reaches the first layer (default: all).
    """

    name = "early-exit"

    def __init__(self, e_scale: float = 1.0, curriculum: str = "rotational", rotation: int = 4,
                 gradual_steps: int | None = None) -> None:
        if e_scale < 0:
            raise ValueError(f"EarlyExitLoss.e_scale must be >= 0, got {e_scale}")
        if curriculum not in _CURRICULA:
            raise ValueError(f"EarlyExitLoss.curriculum must be one of {_CURRICULA}, got {curriculum!r}")
        if rotation < 1:
            raise ValueError(f"EarlyExitLoss.rotation must be >= 1, got {rotation}")
        self.e_scale, self.curriculum, self.rotation, self.gradual_steps = e_scale, curriculum, rotation, gradual_steps
        self._captured: dict[int, torch.Tensor] = {}
        self._enabled: list[int] = []

    def check(self, model: nn.Module) -> None:
        adapter = get_adapter(model, "decoder")
        if adapter.head is None or adapter.final_norm is None:
            raise ValueError(
                f"EarlyExitLoss reads every layer through the model's final norm and LM head; "
                f"{type(model).__name__} has no {'LM head' if adapter.head is None else 'final norm'}. "
                "Train the *ForCausalLM model (e.g. LlamaForCausalLM), not the bare decoder.")

    def attach(self, model: nn.Module) -> None:
        self.check(model)
        adapter = get_adapter(model, "decoder")
        self._adapter, self._scales = adapter, exit_scales(adapter.num_layers, self.e_scale)
        self._enabled = list(range(adapter.num_layers))
        for i, layer in enumerate(adapter.layers[:-1]):
            self._hook(layer.register_forward_hook(self._capture(i)))

    def detach(self) -> None:
        super().detach()
        self._captured = {}

    def begin_step(self, step: int, total_steps: int) -> None:
        self._enabled = exit_layers(self._adapter.num_layers, step, total_steps, self.curriculum, self.rotation,
                                    self.gradual_steps)


    def _capture(self, i: int):
        def hook(module, args, output):
            if self._active and module.training and i in self._enabled:
                self._captured[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        last = self._adapter.num_layers - 1
        captured, self._captured = self._captured, {}
        layers = [k for k in self._enabled if k == last or k in captured]
        total = sum(self._scales[k] for k in layers)
        early = ctx.logits.new_zeros((), dtype=torch.float32)
        for k in layers[:-1]:
            logits = self._adapter.head(self._adapter.final_norm(captured[k]))
            early = early + (self._scales[k] / total) * next_token_loss(logits, ctx.input_ids)
        return {"exit_last": (self._scales[last] / total) * next_token_loss(ctx.logits, ctx.input_ids),
                "exit_early": early}

    def __repr__(self) -> str:
        return (f"EarlyExitLoss(e_scale={self.e_scale}, curriculum={self.curriculum!r}, rotation={self.rotation}, "
                f"gradual_steps={self.gradual_steps})")
