"""What an applied :class:`~mmskip.void_layers.VoidLayerConfig` remembers: the traced norms (typed
records, one per traced forward) and the skip plan the prompt decided."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..inject import TechniqueState

if TYPE_CHECKING:
    from .._phase import ForwardState
    from ..layer_skip.state import SkipPlan

__all__ = ["VoidLayerState", "VoidRecord"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoidRecord:
    """One traced forward: its ``phase`` (``"prefill"`` / ``"decode"``), the per-token residual L2
    ``norms`` entering layer 0 and leaving each layer, shape (L + 1, B, T), and the ``valid``
    (B, T) mask of the tokens that count (padding excluded)."""

    phase: str
    norms: torch.Tensor
    valid: torch.Tensor


class NormTracer:
    """Collects per-token residual norms of one forward, layer by layer."""

    def __init__(self, num_layers: int, state: ForwardState, trace_decode: bool) -> None:
        self.num_layers = num_layers
        self.state = state
        self.trace_decode = trace_decode
        self.norms: list[torch.Tensor] = []
        self.records: list[VoidRecord] = []  # one per traced forward
        self.on_complete: list[Callable[[VoidRecord], None]] = []

    @property
    def tracing(self) -> bool:
        return self.state.phase == "prefill" or self.trace_decode

    def add(self, hidden: torch.Tensor) -> None:
        self.norms.append(hidden.float().norm(dim=-1))
        if len(self.norms) == self.num_layers + 1:
            norms = torch.stack(self.norms)
            self.norms = []
            mask = self.state.attention_mask if self.state.phase == "prefill" else None
            rec = VoidRecord(phase=self.state.phase, norms=norms, valid=_valid(mask, norms))
            self.records.append(rec)
            for fn in self.on_complete:
                fn(rec)


def _valid(mask: torch.Tensor | None, norms: torch.Tensor) -> torch.Tensor:
    shape = norms.shape[1:]
    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(shape)):
        logger.warning("LAC: attention_mask of shape %s does not match the prompt %s; counting every position, "
                       "padding included", tuple(mask.shape), tuple(shape))
        mask = None
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=norms.device)
    return mask.bool().to(norms.device)


@dataclass
class VoidLayerState(TechniqueState):
    """State of an applied :class:`VoidLayerConfig`: the plan the prompt decided and the traces.

    ``records`` holds one :class:`VoidRecord` per traced forward; ``reset()`` empties it.
    """

    forward: ForwardState
    plan: SkipPlan
    tracer: NormTracer

    @property
    def records(self) -> list[VoidRecord]:
        return self.tracer.records

    def reset(self) -> None:
        self.tracer.records.clear()

    def stats(self) -> dict[str, Any]:
        return {"skipped_layers": sorted(self.plan.skip)}
