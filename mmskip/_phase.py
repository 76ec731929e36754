"""Per-forward bookkeeping shared by the LLM techniques: prefill, decode or recompute; token counts.

A ``ModelHook`` on the decoder stack classifies every forward before any layer runs:

* ``"prefill"``: the prompt (an empty or absent KV cache, outside ``generate`` or its first call);
* ``"decode"``: new tokens on top of a filled cache;
* ``"recompute"``: a later step of ``generate(use_cache=False)``, which feeds prompt *and*
  generated tokens again; ``gen_from`` is where the generated ones start, so decode-phase
  techniques treat exactly those tokens as generated and ``use_cache=False`` gives the same
  sequences as ``use_cache=True``.

While a technique is applied, ``model.generate`` is bound to record where a generation starts
(the KV length it was given, read once, eagerly). That keeps the classification free of tensor
reads, so ``torch.compile(fullgraph=True)`` traces it with a static cache: inside ``generate``
the first forward is the prompt and every later one is a step. Outside ``generate`` the cache
length decides (under compilation, a static cache counts as filled once it was written).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ._bind_generate import BindGenerate
from .inject import CallGuard, SkipHandle
from .registry import DecoderAdapter


@dataclass
class ForwardState:
    phase: str = "prefill"  # "prefill" | "decode" | "recompute"
    batch: int = 0
    q_len: int = 0
    decode_step: int = 0  # decode forwards since the last prefill (eager forwards only)
    gen_from: int = 0  # "recompute": index of the first generated token in this forward
    attention_mask: torch.Tensor | None = None  # the prompt's 2-D padding mask, if one is known
    listeners: list[Callable[[ForwardState], None]] = field(default_factory=list)
    # set by the bound ``generate``: inside one, whether its first forward ran, and its start
    in_generate: bool = False
    generate_started: bool = False
    generate_past: int = 0
    prompt_len: int = 0
    prompt_left: int = 0  # prompt tokens not yet run (``prefill_chunk_size`` runs the prompt in chunks)

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

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Read the wrapped forward's signature now, at attach: written on the first call instead, it
        makes a compiled first call's graph guard on its absence, and later calls recompile."""
        self._signature = inspect.signature(module.forward)
        return module

    def arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:  # keywords only (how ``generate`` calls a model): already by name, nothing to bind
            return dict(kwargs)
        if self._signature is None:
            self._signature = inspect.signature(self.fn_ref.original_forward)
        bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        return {**bound.pop("kwargs", {}), **bound}


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a decoder layer or stack (``cache`` in transformers >= 5)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_length(cache: Any) -> int:
    """Tokens held by ``cache`` as a Python int, read eagerly (a static cache keeps a tensor)."""
    if cache is None:
        return 0
    n = cache.get_seq_length()
    return int(n) if isinstance(n, torch.Tensor) else n


def padding_mask(mask: Any, q_len: int) -> torch.Tensor | None:
    """The prompt's (batch, q_len) padding mask from what the decoder was given: the 2-D mask, or
    what ``generate`` builds for static caches and compilation (a 4-D mask, or a dict of them per
    attention type): a key is padding when even the last query may not see it."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        return None
    if mask.dim() == 2:
        return mask
    last = mask[:, 0, -1, :q_len]
    return last if last.dtype == torch.bool else last == 0


def _cache_empty(cache: Any) -> bool:
    if cache is None:
        return True
    n = cache.get_seq_length()
    if not isinstance(n, torch.Tensor):
        return n == 0
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph: has it ever been written?
        return not all(getattr(layer, "is_initialized", True) for layer in cache.layers)
    return int(n) == 0


class _PhaseHook(ModelHook):
    def __init__(self, state: ForwardState, handle: SkipHandle, layer_names: list[str], forward: Callable,
                 guard: CallGuard) -> None:
        super().__init__()
        self.state = state
        self.handle = handle
        self.layer_names = layer_names
        self.signature = inspect.signature(forward)
        self.guard = guard

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if args:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
            extra = bound.get("kwargs", {})
        else:  # keywords only (how the task models and generate call a decoder): already by name
            bound, extra = kwargs, {}
        x = bound.get("input_ids")
        if x is None:
            x = bound.get("inputs_embeds")
        if x is None:
            raise ValueError("mmskip: the decoder was called without input_ids or inputs_embeds")
        cache = bound.get("cache", bound.get("past_key_values", extra.get("past_key_values")))
        if bound.get("use_cache", extra.get("use_cache")) is False:
            cache = None  # the model neither reads nor writes it
        s = self.state
        if s.in_generate and s.generate_started:
            phase = "recompute" if cache is None else "prefill" if s.prompt_left > 0 else "decode"
        elif s.in_generate:
            phase = "prefill" if s.generate_past == 0 else "decode"
        else:
            phase = "prefill" if _cache_empty(cache) else "decode"
        if torch.compiler.is_compiling():  # no thread ids: nothing a graph must guard on (counts stay on the device)
            self._classify(s, phase, x, bound)
            self.handle.counts.record_each(self.layer_names, s.tokens, like=x)
            return self.fn_ref.original_forward(*args, **kwargs)
        with self.guard.call(starts=phase == "prefill"):  # refuses a second thread before any state changes
            s.decode_step = 0 if phase == "prefill" else s.decode_step + (phase == "decode")
            self._classify(s, phase, x, bound)
            self.handle.counts.record_each(self.layer_names, s.tokens)
            return self.fn_ref.original_forward(*args, **kwargs)

    @staticmethod
    def _classify(s: ForwardState, phase: str, x: torch.Tensor, bound: dict[str, Any]) -> None:
        s.batch, s.q_len = x.shape[0], x.shape[1]
        if s.in_generate and not s.generate_started:
            s.generate_started, s.prompt_len = True, x.shape[1]
        if s.prompt_left > 0:  # one more chunk of the prompt has run
            s.prompt_left = max(s.prompt_left - x.shape[1], 0)
        if phase == "recompute" and s.q_len <= s.prompt_len:
            phase = "prefill"  # nothing generated yet in this call
        s.phase, s.gen_from = phase, s.prompt_len if phase == "recompute" else 0
        if phase == "prefill":
            s.attention_mask = padding_mask(bound.get("attention_mask"), s.q_len)
        for fn in s.listeners:
            fn(s)


def _scoped_generate(*args: Any, inner: Callable, state: ForwardState, guard: CallGuard, **kwargs: Any) -> Any:
    """``model.generate`` while a layer technique is applied: notes where the generation starts.

    The whole call holds ``guard``: the generation state written here is per model, so another
    thread's ``generate`` (or forward) while this one runs, even between two of its decode steps,
    is refused with :class:`ConcurrentUseError` before it changes anything."""
    with guard.call(starts=True):
        return _tracked_generate(args, kwargs, inner, state)


def _tracked_generate(args: tuple, kwargs: dict[str, Any], inner: Callable, state: ForwardState) -> Any:
    fields = ("in_generate", "generate_started", "generate_past", "prompt_len", "prompt_left")
    outer = [getattr(state, f) for f in fields]
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    past = cache_length(cache) if hasattr(cache, "get_seq_length") else 0
    prompt = next((x for x in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), kwargs.get("inputs"),
                               args[0] if args else None) if isinstance(x, torch.Tensor)), None)
    # a fresh generation's prompt is prefill however many forwards it takes; a continuation's new
    # tokens count as generated (the rule without generate: a filled cache means decode)
    left = prompt.shape[1] if prompt is not None and prompt.dim() >= 2 and past == 0 else 0
    state.in_generate, state.generate_started, state.generate_past, state.prompt_len, state.prompt_left = (
        True, False, past, 0, left)
    try:
        return inner(*args, **kwargs)
    finally:
        for f, v in zip(fields, outer):
            setattr(state, f, v)


class HeadCounter(ModelHook):
    """Counts the rows the LM head sees (generate only projects the last position)."""

    def __init__(self, handle: SkipHandle) -> None:
        super().__init__()
        self.handle = handle

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        x = args[0] if args else next(iter(kwargs.values()))
        self.handle.counts.record_fixed(x.shape[:-1].numel(), like=x)
        return args, kwargs


def track_forwards(adapter: DecoderAdapter, handle: SkipHandle, costs: dict[str, float]) -> ForwardState:
    """Attach the phase tracker (and FLOPs bookkeeping for ``costs`` items) to ``adapter``'s model;
    bind its ``generate`` (when it has one) so generations are tracked from their start."""
    state = ForwardState()
    guard = CallGuard(handle.config.technique)
    handle.counts.cost.update(costs)
    handle.counts.fixed_cost = adapter.head_flops()
    param = next(adapter.model.parameters(), None)
    handle.counts.declare(list(costs), param.device if param is not None else torch.device("cpu"))
    handle.add_hook(adapter.decoder, _PhaseHook(state, handle, list(costs), adapter.decoder.forward, guard), ".phase")
    if adapter.head is not None:
        handle.add_hook(adapter.head, HeadCounter(handle), ".head")
    if callable(getattr(adapter.model, "generate", None)):
        bind = BindGenerate(lambda model, inner: functools.partial(_scoped_generate, inner=inner, state=state,
                                                                               guard=guard))
        handle.add_hook(adapter.model, bind, ".generate")
    return state
