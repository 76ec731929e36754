"""What an applied :class:`~mmskip.void_layers.VoidLayerConfig` remembers: the traced norms (typed
records, one per traced forward) and the skip plan the prompt decided.

Under ``torch.compile`` a finished trace leaves the graph through one side-effecting custom op,
``mmskip::void_record``: the graph only computes the norms, and the op, run when the compiled
forward runs, appends the record and decides the skip set in plain Python. Appending to the
list of records inside the graph would make its length a guard (a recompile per prompt), and
the skip set's host read would break the graph deep in the layer loop (a compiled generate on
the zoo's ``stdlib-lm`` took 11 graphs instead of the plain model's 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._graph_callback import Keyed, effectful_op
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


class NormTracer(Keyed):
    """Collects per-token residual norms of one forward, layer by layer."""

    def __init__(self, num_layers: int, state: ForwardState, trace_decode: bool) -> None:
        self.num_layers = num_layers
        self.state = state
        self.trace_decode = trace_decode
        self.norms: list[torch.Tensor] = []
        self.records: list[VoidRecord] = []  # one per traced forward
        self.on_complete: list[Callable[[VoidRecord], None]] = []
        self.register_key()  # how a compiled graph's ``mmskip::void_record`` finds this tracer

    @property
    def tracing(self) -> bool:
        return self.state.phase == "prefill" or self.trace_decode

    def add(self, hidden: torch.Tensor) -> None:
        self.norms.append(hidden.float().norm(dim=-1))
        if len(self.norms) == self.num_layers + 1:
            norms = torch.stack(self.norms)
            self.norms = []
            mask = self.state.attention_mask if self.state.phase == "prefill" else None
            valid = _valid(mask, norms)
            if _RECORD_OP is not None and torch.compiler.is_compiling():
                _RECORD_OP(norms.detach(), valid, self.key, self.state.phase)  # runs with the graph, eagerly
            else:
                self.complete(VoidRecord(phase=self.state.phase, norms=norms, valid=valid))

    def complete(self, rec: VoidRecord) -> None:
        """Keep a finished trace and hand it to the listeners (the skip-set decision)."""
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


def _void_record(norms: torch.Tensor, valid: torch.Tensor, key: int, phase: str) -> None:
    """``mmskip::void_record``: a finished trace, handed from a compiled graph to :meth:`NormTracer.complete`."""
    tracer = Keyed.find(key)
    if tracer is not None:  # copies: a compiled graph may reuse its buffers once this op returns
        tracer.complete(VoidRecord(phase=phase, norms=norms.clone(), valid=valid.clone()))


_RECORD_OP = effectful_op("mmskip::void_record", _void_record, lambda norms, valid, key, phase: None)


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
