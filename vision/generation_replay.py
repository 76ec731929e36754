"""The ``generate`` calls in flight on an applied vision technique, per thread.

``generate(use_cache=False)`` runs the prompt once and then, at every step, the prompt *and* the
tokens generated so far again, without a cache. A technique that decides per forward (p-MoD's
routing, MuE's decoder exits) would decide those recomputes afresh: from another last token
(p-MoD's attention signal) or from floating-point noise at a threshold (MuE). So while a
technique is applied, ``model.generate`` is bound (:class:`mmskip._bind_generate.BindGenerate`)
to open a :class:`Generation` for its thread; the hooks store the decisions of its first
no-cache forward there and replay them in its recomputes, which then reproduce the cached run.
The record is the calling thread's own (a second thread's ``generate`` cannot overwrite it) and
it is dropped when ``generate`` returns or raises (an interrupt leaves nothing behind).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin

from mmskip._bind_generate import BindGenerate
from mmskip.inject import SkipHandle

__all__ = ["Generation", "Generations", "bind_generations"]


@dataclass
class Generation:
    """One ``generate`` call on one thread: how many forwards of it have run, and the decisions
    (technique-specific tensors) that its no-cache recomputes replay."""

    forwards: int = 0
    decisions: Any = None


class Generations:
    """The :class:`Generation` of each thread that is inside ``generate`` (nested calls stack)."""

    def __init__(self) -> None:
        self._live: dict[int, Generation] = {}

    def current(self) -> Generation | None:
        """The calling thread's generation in progress, or None outside ``generate``."""
        return self._live.get(threading.get_ident())

    def run(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inner(*args, **kwargs)`` inside a fresh :class:`Generation` for this thread."""
        me = threading.get_ident()
        outer = self._live.get(me)
        self._live[me] = Generation()
        try:
            return inner(*args, **kwargs)
        finally:
            if outer is None:
                self._live.pop(me, None)
            else:
                self._live[me] = outer


def bind_generations(handle: SkipHandle, model: torch.nn.Module, generations: Generations) -> None:
    """Bind ``model.generate`` (when it has one) so each call runs inside ``generations``;
    ``handle.remove()`` restores it."""
    if not isinstance(model, GenerationMixin):
        return

    def wrap(module: torch.nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(generations.run, inner)

    handle.add_hook(model, BindGenerate(wrap), ".generate")
