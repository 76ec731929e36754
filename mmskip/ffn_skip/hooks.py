"""FFN-SkipLLM: input-adaptive skipping of feed-forward sublayers during decoding.

FFN-SkipLLM (Jaiswal et al., 2024) observes that FFN blocks in the middle ("hot") layers
saturate: the residual stream barely turns across them. While decoding each token we measure
the cosine similarity of the residual stream before and after every computed hot FFN; when it
is at or above the threshold the next ``span`` hot FFNs are skipped (for that sequence), then
one is computed again to re-check. The first and last layers ("cold" regions) and the first
``warmup`` generated tokens always run in full, and ``max_skip`` caps the fraction of a
token's FFNs that may be skipped. Attention always runs, so the KV cache needs no handling.

Decisions are per sequence: in a batch, the FFN runs only on the rows that do not skip.

Two cases decide with tensors instead, computing every FFN and zeroing the skipped outputs
(the same decisions, no saving): a ``generate(use_cache=False)`` step, which recomputes the
prompt and every generated token (each generated position keeps its own skip state), and a
``torch.compile``d forward, where a data-dependent skip cannot be part of one graph.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from .._phase import track_forwards
from ..inject import SkipHandle
from ..registry import get_adapter
from ..schedules import AdaptiveSchedule
from .state import FFNSkipState, TokenState

if TYPE_CHECKING:
    from .config import FFNSkipConfig

__all__ = ["attach_ffn_skip"]

logger = logging.getLogger(__name__)


class _ResidualCapture(ModelHook):
    """Stores the residual stream entering the FFN (the input of its pre-norm)."""

    def __init__(self, tok: TokenState) -> None:
        super().__init__()
        self.tok = tok

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.tok.residual = args[0] if args else next(iter(kwargs.values()))
        return args, kwargs


class _FFNSkipHook(ModelHook):
    def __init__(self, index: int, tok: TokenState, schedule: AdaptiveSchedule, span: int, handle: SkipHandle) -> None:
        super().__init__()
        self.index = index
        self.tok = tok
        self.schedule = schedule
        self.span = span
        self.handle = handle
        self.name = f"mlp.{index}"

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tok, forward = self.tok, self.fn_ref.original_forward
        if not tok.active:
            return forward(x, *args, **kwargs)
        if tok.masked:
            return self._masked(forward(x, *args, **kwargs))
        skip = [r > 0 and b > 0 for r, b in zip(tok.run, tok.budget)]
        n_skip = sum(skip)
        if n_skip == 0:
            out = forward(x, *args, **kwargs)
        else:
            out = torch.zeros_like(x)
            if n_skip < len(skip):
                keep = torch.tensor([i for i, s in enumerate(skip) if not s], device=x.device)
                out[keep] = forward(x[keep], *args, **kwargs)
            tok.log.append((tok.step, self.index, torch.tensor(skip)))
            self.handle.counts.record(self.name, 0, n_skip * x.shape[1])
            for i, s in enumerate(skip):
                if s:
                    tok.run[i] -= 1
                    tok.budget[i] -= 1
        if n_skip < len(skip) and any(tok.budget):
            # FFN-SkipLLM's saturation test on the rows that computed this FFN (none left to skip: not needed)
            h = tok.residual[:, -1].float()
            cos = torch.nn.functional.cosine_similarity(h, h + out[:, -1].float(), dim=-1).tolist()
            for i, s in enumerate(skip):
                if not s and cos[i] >= self.schedule.threshold:
                    tok.run[i] = self.span
        return out

    def _masked(self, out: torch.Tensor) -> torch.Tensor:
        """The same rule per (row, position) from ``tok.start`` on, with tensors: zero the skipped
        outputs, then the saturation test where the FFN counted."""
        tok, a = self.tok, self.tok.start
        run, budget = tok.run_t.to(out.device), tok.budget_t.to(out.device)
        live = tok.live.to(out.device) if isinstance(tok.live, torch.Tensor) else tok.live
        skip = (run > 0) & (budget > 0) & live
        seg = out[:, a:].masked_fill(skip.unsqueeze(-1), 0)
        h = tok.residual[:, a:].float()
        saturated = torch.nn.functional.cosine_similarity(h, h + seg.float(), dim=-1) >= self.schedule.threshold
        tok.run_t = torch.where(skip, run - 1, torch.where(live & saturated, self.span, run))
        tok.budget_t = budget - skip.long()
        self.handle.counts.record(self.name, 0, skip.sum())  # read when the stats are asked for
        return torch.cat([out[:, :a], seg], dim=1)


def attach_ffn_skip(config: FFNSkipConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """What :meth:`FFNSkipConfig._attach` does: phase tracking, then the residual capture and the
    skip hook on every hot layer's FFN."""
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    hot = config.hot_layers(L)
    costs = {f"attn.{i}": adapter.attn_flops(i) for i in range(L)}
    costs.update({f"mlp.{i}": adapter.mlp_flops(i) for i in range(L)})
    state = track_forwards(adapter, handle, costs)
    # a cosine similarity never exceeds 1: above that threshold nothing can skip
    tok = TokenState(budget=int(config.schedule.max_skip * L) if config.schedule.threshold <= 1.0 else 0)
    handle.state = FFNSkipState(state, tok, hot)
    if tok.budget_per_token == 0:  # nothing can ever skip: no FFN is hooked, the model runs as is
        logger.debug("FFN skipping: max_skip %s / threshold %s can skip nothing; no FFN hooked",
                     config.schedule.max_skip, config.schedule.threshold)
        return
    state.listeners.append(lambda s: tok.reset(s, config.schedule.warmup))
    for i in hot:
        handle.add_hook(adapter.mlp_norm(i), _ResidualCapture(tok), ".residual")
        handle.add_hook(adapter.mlp(i), _FFNSkipHook(i, tok, config.schedule, config.span, handle), ".mlp")
    logger.debug("FFN skipping on hot layers %d..%d of %d", hot.start, hot.stop - 1, L)
