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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ._phase import ForwardState, track_forwards
from .inject import SkipConfig, SkipHandle, TechniqueState
from .registry import get_adapter
from .schedules import AdaptiveSchedule

__all__ = ["FFNSkipConfig", "FFNSkipState"]

logger = logging.getLogger(__name__)


class _TokenState:
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
            self.active = s.phase == "decode" and s.decode_step > warmup
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


class _ResidualCapture(ModelHook):
    """Stores the residual stream entering the FFN (the input of its pre-norm)."""

    def __init__(self, tok: _TokenState) -> None:
        super().__init__()
        self.tok = tok

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.tok.residual = args[0] if args else next(iter(kwargs.values()))
        return args, kwargs


class _FFNSkipHook(ModelHook):
    def __init__(self, index: int, tok: _TokenState, schedule: AdaptiveSchedule, span: int, handle: SkipHandle) -> None:
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
        if n_skip < len(skip):
            # FFN-SkipLLM's saturation test on the rows that computed this FFN
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
        self.handle.counts.record(self.name, 0, int(skip.sum()) if not torch.compiler.is_compiling() else 0)
        return torch.cat([out[:, :a], seg], dim=1)


@dataclass
class FFNSkipState(TechniqueState):
    """State of an applied :class:`FFNSkipConfig`.

    ``log`` lists every skip decision as ``(decode_step, layer, skipped rows)``; ``reset()``
    empties it.
    """

    forward: ForwardState
    tokens: _TokenState
    hot: range

    @property
    def log(self) -> list[tuple[int, int, torch.Tensor]]:
        return self.tokens.log

    def reset(self) -> None:
        self.tokens.log.clear()

    def stats(self) -> dict[str, Any]:
        return {"hot_layers": [self.hot.start, self.hot.stop - 1]}


@dataclass(frozen=True)
class FFNSkipConfig(SkipConfig):
    """Input-adaptive FFN skipping during decoding (FFN-SkipLLM).

    Paper: Jaiswal et al., 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with
    Adaptive Feed Forward Skipping", https://arxiv.org/abs/2404.03865.

    Args:
        schedule: ``schedules.adaptive(threshold, "cosine", warmup, max_skip)``; default
            ``adaptive(0.95, "cosine", warmup=4, max_skip=0.25)``. After a hot FFN whose
            input/output cosine similarity is >= ``threshold`` the next ``span`` hot FFNs are
            skipped; the first ``warmup`` generated tokens run in full; at most ``max_skip`` of a
            token's FFN blocks are skipped (the paper's operating point is 25-30 %).
        cold: ``(first, last)`` numbers of layers at the bottom and top whose FFNs never skip;
            default ``None``: about 15 % at the bottom and 10 % at the top.
        span: hot FFNs skipped after each saturated one; default 2.
    """

    technique: ClassVar[str] = "ffn_skip"
    schedule: AdaptiveSchedule = AdaptiveSchedule(threshold=0.95, signal="cosine", warmup=4, max_skip=0.25)
    cold: tuple[int, int] | None = None
    span: int = 2

    def __post_init__(self) -> None:
        if self.schedule.signal != "cosine":
            raise ValueError("FFNSkipConfig.schedule must be schedules.adaptive(threshold, signal='cosine', ...)")
        if self.span < 1:
            raise ValueError(f"FFNSkipConfig.span must be >= 1, got {self.span}")
        if self.cold is not None and min(self.cold) < 0:
            raise ValueError(f"FFNSkipConfig.cold must be (first, last) non-negative layer counts, got {self.cold}")

    def hot_layers(self, num_layers: int) -> range:
        first, last = self.cold if self.cold is not None else (round(0.15 * num_layers), round(0.10 * num_layers))
        if first + last >= num_layers:
            raise ValueError(f"cold={first, last} leaves no hot layer in a {num_layers}-layer model")
        return range(first, num_layers - last)

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        adapter = get_adapter(model, "decoder")
        L = adapter.num_layers
        hot = self.hot_layers(L)
        costs = {f"attn.{i}": adapter.attn_flops(i) for i in range(L)}
        costs.update({f"mlp.{i}": adapter.mlp_flops(i) for i in range(L)})
        state = track_forwards(adapter, handle, costs)
        tok = _TokenState(budget=int(self.schedule.max_skip * L))
        state.listeners.append(lambda s: tok.reset(s, self.schedule.warmup))
        for i in hot:
            handle.add_hook(adapter.mlp_norm(i), _ResidualCapture(tok), ".residual")
            handle.add_hook(adapter.mlp(i), _FFNSkipHook(i, tok, self.schedule, self.span, handle), ".mlp")
        handle.state = FFNSkipState(state, tok, hot)
        logger.debug("FFN skipping on hot layers %d..%d of %d", hot.start, hot.stop - 1, L)
