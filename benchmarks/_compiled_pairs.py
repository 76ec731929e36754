"""The compiled mode of ``benchmarks/overhead.py``: how each kind of zoo target is compiled and timed.

- **Language models** decode on a static KV cache, each of the unmodified model and the candidate
  a deep copy whose ``forward`` is ``torch.compile``d (transformers' compiled decoding). SWIFT takes
  the dynamic cache only: its row and its baseline both decode on the dynamic cache, compiled.
- **Vision-language and encoder-decoder models** (p-MoD, VideoLLM-MoD, MuE): deep copies with a
  compiled ``forward``, generating as the target does (dynamic cache).
- **Pipelines**: the denoiser is compiled once, in place (``module.compile()``, what diffusers
  documents), and the target's own :meth:`timing_pair` alternates the baseline and the candidate on
  that one pipeline, so both share the compiled denoiser; hooks stay installed but inactive
  between calls. A config that compiled a new graph inside the timed rounds would be timing its
  compilation: the row records the graphs compiled during the rounds (``graphs_in_timed_rounds``).
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mmskip.tuning.space import Candidate

__all__ = ["compile_in_place", "compiled_copy", "compiled_pair", "eager_stance", "graphs_compiled", "static_batch",
           "static_generate"]


def static_batch(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations of a batch of prompts (``[batch, len]``) with a static KV cache. transformers'
    own auto-compile of the forward (on CUDA with a static cache) is off: the model's forward is already
    compiled by :func:`compiled_copy`, under a code object of its own."""
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           cache_implementation="static", disable_compile=True)
    return g[:, ids.shape[1]:]


def static_generate(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Greedy continuations of each prompt with a static KV cache (what compiled decoding needs)."""
    return [static_batch(model, p.view(1, -1), new_tokens)[0] for p in prompts]


def _own_code(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """``fn`` behind a function with a code object of its own. Dynamo keeps compiled graphs per code
    object: copies of one model compiled through the same ``forward`` would share one list of
    entries, and every call would check the guards of the other configs' graphs first."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    name = "forward_" + "".join(c if c.isalnum() else "_" for c in tag)
    code = call.__code__.replace(co_name=name)
    own = types.FunctionType(code, call.__globals__, name, call.__defaults__, call.__closure__)
    # ``generate`` checks its keyword arguments (``pixel_values``, ...) against the forward's signature
    own.__signature__ = inspect.signature(fn)
    return own


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_in_place(target: Any, backend: str) -> None:
    """Pipelines: compile the target's denoiser once, in place (baseline and candidates share it)."""
    target.denoiser.compile(backend=backend)


def compiled_copy(model: torch.nn.Module, configs: Sequence[Any], tag: str, backend: str, mode: str | None = None
                  ) -> tuple[torch.nn.Module, list[Any]]:
    """A deep copy of ``model`` with ``configs`` applied and its ``forward`` compiled under a code object of
    its own (``tag``), and the handles to remove. ``mode``: ``torch.compile``'s (``"reduce-overhead"``: CUDA graphs)."""
    from mmskip import apply

    copy_ = copy.deepcopy(model)
    handles = [apply(copy_, c) for c in configs]
    copy_.forward = torch.compile(_own_code(copy_.forward, tag), backend=backend, mode=mode)
    return copy_, handles


@contextmanager
def eager_stance(target: Any) -> Iterator[None]:
    """Run a compiled pipeline's denoiser eagerly (FLOP counting and reference outputs stay eager)."""
    if target.kind == "pipeline":
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


@contextmanager
def compiled_pair(target: Any, candidate: Candidate, inputs: list[Any], backend: str, static: bool
                  ) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
    """``timing_pair`` for the compiled mode: ``(baseline call, candidate call)``, both compiled."""
    if target.kind == "pipeline":  # the denoiser is already compiled in place (compile_in_place)
        with target.timing_pair(candidate, inputs) as pair:
            yield pair
        return
    base, _ = compiled_copy(target.model, (), "base", backend)
    fast, handles = compiled_copy(target.model, candidate.configs, candidate.label, backend)
    try:
        if static:
            n = target.max_new_tokens
            yield (lambda: static_generate(base, inputs, n)), (lambda: static_generate(fast, inputs, n))
        else:
            yield (lambda: target.generate(base, inputs)), (lambda: target.generate(fast, inputs))
    finally:
        for h in reversed(handles):
            h.remove()
