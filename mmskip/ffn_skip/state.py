"""What an applied :class:`~mmskip.ffn_skip.FFNSkipConfig` remembers: per-row skip counters and the log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..inject import TechniqueState

if TYPE_CHECKING:
    from .._phase import ForwardState

__all__ = ["FFNSkipState"]


class TokenState:
    """Per-forward decision state, reset by the phase tracker before the first layer runs.

    Eager decoding keeps per-row counters in plain Python lists: one small list update per hot
    layer costs less than the handful of tiny tensor ops it would take otherwise. The masked
    path (``use_cache=False`` steps, ``torch.compile``) keeps them as (batch, positions) tensors.
    """

    def __init__(self, budget: int) -> None:
        self.budget_per_token = budget
        self.active = False
        self.masked = False
        self.residual: torch.Tensor | None = None
        self.run: list[int] = []  # skips still owed per row
        self.budget: list[int] = []
        self.step = 0
        self.log: list[tuple[int, int, torch.Tensor]] = []  # (decode_step, layer, skipped rows)
        # masked path: positions from ``start`` on decide; ``steps`` counts decode forwards as a tensor
        self.start = 0
        self.live: torch.Tensor | bool = True
        self.run_t: torch.Tensor | None = None
        self.budget_t: torch.Tensor | None = None
        self.steps = torch.zeros((), dtype=torch.long)

    def reset(self, s: ForwardState, warmup: int) -> None:
        if s.phase == "prefill":
            self.steps.zero_()
        elif s.phase == "decode":
            self.steps.add_(1)
        self.masked = s.phase == "recompute" or torch.compiler.is_compiling()
        if not self.masked:
            # no budget (max_skip 0, or a threshold no cosine reaches): no bookkeeping at all
            self.active = s.phase == "decode" and s.decode_step > warmup and self.budget_per_token > 0
            self.run = [0] * s.batch
            self.budget = [self.budget_per_token] * s.batch
            self.step = s.decode_step
            return
        if s.phase == "recompute":  # generated position p is decode step p - gen_from + 1
            self.start, self.live = min(s.gen_from + warmup, s.q_len), True
            self.active = self.start < s.q_len
        else:
            self.start, self.live = 0, self.steps > warmup
            self.active = s.phase == "decode"
        shape = (s.batch, s.q_len - self.start)
        self.run_t = torch.zeros(shape, dtype=torch.long)
        self.budget_t = torch.full(shape, self.budget_per_token, dtype=torch.long)


@dataclass
class FFNSkipState(TechniqueState):
    """State of an applied :class:`FFNSkipConfig`.

    ``log`` lists every skip decision as ``(decode_step, layer, skipped rows)``; ``reset()``
    empties it.
    """

    forward: ForwardState
    tokens: TokenState
    hot: range

    @property
    def log(self) -> list[tuple[int, int, torch.Tensor]]:
        return self.tokens.log

    def reset(self) -> None:
        self.tokens.log.clear()

    def stats(self) -> dict[str, Any]:
        return {"hot_layers": [self.hot.start, self.hot.stop - 1]}
