"""Per-forward bookkeeping shared by the LLM techniques: prefill vs decode, token counts, cache.

A ``ModelHook`` on the decoder stack reads the KV cache before any layer runs: an empty (or
absent) cache means *prefill*, otherwise *decode*. Without a cache every forward is a
prefill, so decode-only skipping never triggers with ``use_cache=False``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from .inject import CallGuard, SkipHandle
from .registry import DecoderAdapter


@dataclass
class ForwardState:
    phase: str = "prefill"  # "prefill" | "decode"
    batch: int = 0
    q_len: int = 0
    past_len: int = 0
    decode_step: int = 0  # decode forwards since the last prefill
    attention_mask: torch.Tensor | None = None  # 2-D padding mask of the call, if given
    listeners: list[Callable[[ForwardState], None]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.batch * self.q_len


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes the KV cache under (``cache`` in transformers >= 5.2x,
    ``past_key_values`` before)."""
    return _forward_cache_name(type(model))


@functools.cache
def _forward_cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class ArgumentsHook(ModelHook):
    """A hook that reads its module's call by parameter name: :meth:`arguments` binds ``args`` and
    ``kwargs`` to the original forward's signature (read once), with ``**kwargs`` flattened in."""

    _signature: inspect.Signature | None = None

    def arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._signature is None:
            self._signature = inspect.signature(self.fn_ref.original_forward)
        bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        return {**bound.pop("kwargs", {}), **bound}


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a decoder layer or stack (``cache`` in transformers >= 5)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class _PhaseHook(ModelHook):
    def __init__(self, state: ForwardState, handle: SkipHandle, layer_names: list[str], forward: Callable) -> None:
        super().__init__()
        self.state = state
        self.handle = handle
        self.layer_names = layer_names
        self.signature = inspect.signature(forward)
        self.guard = CallGuard(handle.config.technique)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        x = bound.get("input_ids")
        if x is None:
            x = bound.get("inputs_embeds")
        if x is None:
            raise ValueError("mmskip: the decoder was called without input_ids or inputs_embeds")
        cache = bound.get("cache", bound.get("past_key_values", extra.get("past_key_values")))
        past = cache.get_seq_length() if cache is not None else 0
        with self.guard.call(starts=past == 0):  # refuses a second thread before any state changes
            s = self.state
            s.batch, s.q_len, s.past_len = int(x.shape[0]), int(x.shape[1]), int(past)
            if past == 0:
                s.phase, s.decode_step = "prefill", 0
                s.attention_mask = bound.get("attention_mask")
            else:
                s.phase = "decode"
                s.decode_step += 1
            for name in self.layer_names:
                self.handle.counts.record(name, s.tokens)
            for fn in s.listeners:
                fn(s)
            return self.fn_ref.original_forward(*args, **kwargs)


class HeadCounter(ModelHook):
    """Counts the rows the LM head sees (generate only projects the last position)."""

    def __init__(self, handle: SkipHandle) -> None:
        super().__init__()
        self.handle = handle

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        x = args[0] if args else next(iter(kwargs.values()))
        self.handle.counts.fixed_units += x.shape[:-1].numel()
        return args, kwargs


def track_forwards(adapter: DecoderAdapter, handle: SkipHandle, costs: dict[str, float]) -> ForwardState:
    """Attach the phase tracker (and FLOPs bookkeeping for ``costs`` items) to ``adapter``'s model."""
    state = ForwardState()
    handle.counts.cost.update(costs)
    handle.counts.fixed_cost = adapter.head_flops()
    handle.add_hook(adapter.decoder, _PhaseHook(state, handle, list(costs), adapter.decoder.forward), ".phase")
    if adapter.head is not None:
        handle.add_hook(adapter.head, HeadCounter(handle), ".head")
    return state
