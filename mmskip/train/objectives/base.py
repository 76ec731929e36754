"""What every training objective is: a loss term, the hooks it needs, and the checks that refuse
a model it does not fit before any training starts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Objective", "StepContext"]


@dataclass
class StepContext:
    """What an objective's loss sees for one micro-batch."""

    step: int
    total_steps: int
    input_ids: torch.Tensor
    logits: torch.Tensor
    _teacher: Callable[[], torch.Tensor] = field(repr=False)
    _teacher_logits: torch.Tensor | None = field(default=None, repr=False)

    def teacher_logits(self) -> torch.Tensor:
        """Logits of the unmodified model on the same input (every objective paused, LoRA off),
        computed once per micro-batch without gradients."""
        if self._teacher_logits is None:
            self._teacher_logits = self._teacher()
        return self._teacher_logits


class Objective:
    """Base class of the trainer's composable objectives.

    Lifecycle: ``check(model)`` (raise before training if the objective does not fit),
    ``attach(model)`` (install hooks), then per optimizer step ``begin_step(step, total)`` and per
    micro-batch ``loss(ctx)`` after the forward; ``detach()`` at the end. ``paused()`` turns the
    objective's effect on the forward off, for the teacher forward.
    """

    name = "objective"
    _active = True  # False while paused(): hooks then leave the forward alone

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError``/``TypeError`` saying what to change if this objective cannot train ``model``."""

    def attach(self, model: nn.Module) -> None:
        """Install what the objective needs on ``model`` (hooks, applied configs)."""

    def detach(self) -> None:
        """Undo :meth:`attach` exactly (removes the hooks added with :meth:`_hook`)."""
        for handle in self.__dict__.pop("_hooks", []):
            handle.remove()

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.__dict__.setdefault("_hooks", []).append(handle)

    def _rewrite_output(self, layer: nn.Module, fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any],
                        prepend: bool = False) -> None:
        """Let ``fn(layer, h, out)`` replace ``layer``'s output hidden states (``None`` keeps them),
        ``h`` being the layer's input; idle while :meth:`paused`. Other outputs of a tuple pass through."""
        slot: list[torch.Tensor] = []  # the input of the call in flight (a failed call's is overwritten by the next)

        def pre(module, args, kwargs):
            if self._active:
                slot[:] = [args[0] if args else kwargs["hidden_states"]]

        def post(module, args, kwargs, output):
            if not slot:
                return None
            h = slot.pop()
            out = output[0] if isinstance(output, tuple) else output
            new = fn(module, h, out)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        self._hook(layer.register_forward_pre_hook(pre, with_kwargs=True))
        self._hook(layer.register_forward_hook(post, with_kwargs=True, prepend=prepend))

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called once per optimizer step before its micro-batches (curricula live here)."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters the objective brings (e.g. routers)."""
        return []

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the forward as the unmodified model runs it (the teacher forward, evaluation)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named loss terms for one micro-batch; the trainer sums all objectives' terms."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Numbers about the last micro-batch to log beside the loss (not optimised)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
