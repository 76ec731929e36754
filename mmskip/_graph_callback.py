"""Hand values from inside a ``torch.compile`` graph to a technique's Python state, when the graph runs.

Appending to a list or reading a tensor on the host inside a compiled region either breaks the
graph or makes the Python state a guard (a recompile whenever it changes). A technique that must
record something per forward (void layers' finished traces, MuE's decoder exits) instead calls an
effectful custom op defined here: the graph keeps the call, and the op's Python body runs with the
compiled code and finds the state by an integer key (:class:`Keyed`).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Keyed", "effectful_op"]

logger = logging.getLogger(__name__)

_KEYS = itertools.count()
_OBJECTS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class Keyed:
    """Mixin: an object a graph callback can find by ``self.key`` (a copy gets a key of its own)."""

    key: int = -1

    def register_key(self) -> None:
        self.key = next(_KEYS)
        _OBJECTS[self.key] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy`` of an applied model, or unpickled) records into its own state."""
        self.__dict__.update(state)
        self.register_key()

    @staticmethod
    def find(key: int) -> Any:
        """The live object registered under ``key``, or None (it was collected)."""
        return _OBJECTS.get(key)


def effectful_op(name: str, fn: Callable[..., None], fake: Callable[..., None]) -> Callable[..., None] | None:
    """Define ``name`` (``"mmskip::..."``) as a custom op running ``fn``, registered as effectful
    (never dead-code eliminated, never reordered) and CUDA-graph unsafe (a replayed graph would skip
    it). ``None`` where this torch cannot (callers then record inside the graph, as in eager mode)."""
    tags = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
    try:
        op = torch.library.custom_op(name, fn, mutates_args=(), tags=tags)
        op.register_fake(fake)
        torch.library._register_effectful_op(op._opoverload, torch.library.EffectType.ORDERED)
    except (AttributeError, TypeError, RuntimeError) as err:  # an older torch; a reloaded module (defined twice)
        logger.debug("no %s op (%s); compiled forwards record inside the graph", name, err)
        return None
    return op._opoverload
